"""Output paths, checked before any work is done.

An output never replaces one of the command's inputs, never lands inside a run's checkpoints/
(only training writes there), never overwrites a file (or fills a folder) that regscale did not
write as that same kind of output, and must be writable: every refusal is one line naming the path.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from regscale.errors import UserError, has_control_character
from regscale.fsutil import NoSpaceError, no_space, no_space_message
from regscale.rundir import CHECKPOINTS, CONFIG, JOB_FOLDER


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def checkpoints_of(path: Path) -> Optional[Path]:
    """The run's checkpoints/ folder that `path` is in (or is), if any."""
    for folder in (path, *path.parents):
        if folder.name == CHECKPOINTS and (folder.parent / CONFIG).is_file():
            return folder
    return None


def check_writable(folder: Path, what: str) -> None:
    """`folder`, or the nearest of its ancestors that exists (the rest will be created), is a
    directory that accepts a new file."""
    base = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    if not base.is_dir():
        raise UserError(f"{what}: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".regscale-write-probe-")
    except OSError as err:
        raise UserError(f"{what}: cannot write in {base}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def check_output(path: str | os.PathLike, what: str, *, inputs: Iterable[str | os.PathLike] = (),
                 kind: str = "file", suffixes: tuple[str, ...] = (),
                 ours: Optional[Callable[[Path], bool]] = None) -> Path:
    """Refuse an output path that would destroy something, before any work; returns it resolved.

    what: how the message names it (e.g. "--out"); inputs: paths the command reads; kind: "file"
    or "dir"; suffixes: accepted file name endings; ours(existing) says whether an existing file
    (or non-empty folder) is a previous output of this kind, which may be replaced (or resumed).
    """
    text = os.fspath(path)
    if not text or has_control_character(text):
        raise UserError(f"{what}: {text!r} is not a usable path")
    out = Path(text).expanduser().resolve()
    if suffixes and not out.name.endswith(suffixes):
        raise UserError(f"{what} {text}: expected a file name ending in {' or '.join(suffixes)}")
    for source in inputs:
        source_path = Path(source).expanduser().resolve()
        if _same(out, source_path):
            raise UserError(f"{what} {text} is also an input of this command; choose another path")
    ckpt = checkpoints_of(out)
    if ckpt is not None:
        raise UserError(f"{what} {text} is inside the run's checkpoints folder {ckpt}, which only "
                        "training writes; choose a path outside it")
    if out.exists():
        if kind == "file" and out.is_dir():
            raise UserError(f"{what} {text} is a directory; expected a file path")
        if kind == "dir" and not out.is_dir():
            raise UserError(f"{what} {text} exists and is not a directory")
        occupied = out.is_file() or any(out.iterdir())
        if occupied and (ours is None or not ours(out)):
            thing = "file" if kind == "file" else "folder holds files that"
            raise UserError(f"{what} {text}: this {thing} regscale did not write as this kind of "
                            "output; refusing to overwrite it (choose another path)")
    check_writable(out if kind == "dir" else out.parent, f"{what} {text}")
    return out


def run_of(path: Path) -> Optional[Path]:
    """The run directory that `path` is inside (not: is), if any."""
    return next((folder for folder in path.parents if (folder / CONFIG).is_file()), None)


def check_run_dir(run_dir: Path, data: Optional[str] = None) -> Path:
    """A folder a run may live in (new, or its own run directory): outside every other run and its
    checkpoints, outside the local dataset `data`, a run directory or a folder that is still empty,
    writable. Returns it resolved."""
    def ours(folder: Path) -> bool:  # a run's, or one whose submission made the job folder and stopped
        return (folder / CONFIG).is_file() or all(p.name == JOB_FOLDER for p in folder.iterdir())

    out = check_output(run_dir, "run directory", kind="dir", ours=ours)
    other = run_of(out)
    if other is not None:
        raise UserError(f"run directory {run_dir} is inside the run directory {other}; choose another run.dir")
    if data is not None and "://" not in data:
        dataset = Path(data).expanduser().resolve()
        if _inside(out, dataset) and (dataset / "index.json").exists():
            raise UserError(f"run directory {run_dir} is inside the dataset data.path={data}; choose "
                            "another run.dir")
    return out


def check_disjoint(a: str | os.PathLike, a_what: str, b: str | os.PathLike, b_what: str) -> None:
    """Two folders neither of which contains the other (e.g. prepare's SRC and OUT)."""
    pa, pb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    if _inside(pa, pb) or _inside(pb, pa):
        raise UserError(f"{a_what} {a} and {b_what} {b} overlap (one is inside the other); "
                        "choose separate folders")


@contextmanager
def writing_into(folder: str | os.PathLike) -> Iterator[None]:
    """A disk that fills up while a command writes into `folder`: one line naming the folder."""
    try:
        yield
    except OSError as err:
        if no_space(err):
            raise NoSpaceError(no_space_message(Path(folder))) from None
        raise
