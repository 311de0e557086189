"""Durable files: the one way regscale replaces a file that someone may read meanwhile.

A file is written under a temporary name beside its target, fsynced, renamed over the target and
the directory fsynced: a reader sees the old content or the new one, never a mix, and an error
leaves the old file as it was. A full disk is reported as one line naming the directory. Logs that
are appended to instead (metrics.jsonl, attempts.jsonl) are read skipping a line torn by a crash.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from regscale.errors import UserError


class NoSpaceError(UserError):
    """The disk (or quota) holding a file being written is full."""


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def no_space(err: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT error behind `err` (following its causes), or None."""
    seen: set[int] = set()
    stack: list[Optional[BaseException]] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        stack += [e.__cause__, e.__context__, *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


def no_space_message(where: Path) -> str:
    return f"no space left on {where} (disk or quota full): free space there and start again"


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary path to write `path`'s new content into (any writer: torch.save, PIL, zip).

    On success it is fsynced and renamed over `path`; on an error it is removed and `path` keeps
    its old content. The temporary name keeps the suffix (writers that pick a format by it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        if no_space(err):
            raise NoSpaceError(no_space_message(path.parent)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Replace `path` with `data` (text is written as UTF-8) atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of an appended .jsonl log, skipping torn or foreign lines ([] without it)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
