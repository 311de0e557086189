"""Errors a user can fix: the CLI prints their message as one line and exits 2."""

from __future__ import annotations

import errno
import os
import unicodedata
from typing import Optional


class UserError(RuntimeError):
    """Bad input (a path, a shard, a checkpoint, a cluster answer) with a message naming it."""


class RunHalted(UserError):
    """Training stopped itself after saving a checkpoint, for a reason a retry would meet again
    (fp16's loss scale collapsed): the job stops instead of being requeued; the message says why."""


def debug() -> bool:
    """REGSCALE_DEBUG=1: show the traceback behind an expected failure too."""
    return os.environ.get("REGSCALE_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """A message as a single line: newlines (a tool's stderr, a parser's context) become '; '."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def has_control_character(text: str) -> bool:
    """A character that would break a line, a path or a batch script: C0/C1 controls, DEL, line
    and paragraph separators (such a value is refused, never cut or folded)."""
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an error (at most `limit` characters), or its type's name when
    it says nothing (`str(err)` may be empty)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return type(err).__name__ if isinstance(err, BaseException) else "no details"


def os_error_message(err: OSError) -> str:
    """What an OSError means for the user, naming the path: 'no space left on /x', ..."""
    where = err.filename if err.filename is not None else "?"
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {where if err.filename is not None else 'the device being written'} (disk or quota full)"
    reason = err.strerror or type(err).__name__
    return f"{where}: {reason}" if err.filename is not None else reason


def expected_failure(err: BaseException) -> Optional[str]:
    """The one-line message of a failure the user can act on, or None for a bug (a traceback).

    UserError is bad input named by the code that found it; OSError is the file system or the
    network refusing (read-only, full, not a directory, unreachable), named by its path; a missing
    third-party package (a database driver for a tracking URI) is the environment's to fix.
    """
    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, OSError):
        return one_line(os_error_message(err))
    if isinstance(err, ModuleNotFoundError) and err.name and not err.name.startswith("regscale"):
        return f"the Python package '{err.name}' is not installed here, and this needs it: install it"
    return None
