"""Stale shared memory of a killed StreamingDataset must not break the next run on the node.

StreamingDataset registers a numeric prefix per dataset on a node: /dev/shm/000NNN_* segments and
<tmp>/000NNN_*_filelock files. A kill -9 leaves them behind (streaming's clean_stale_shared_memory
does not remove them); the next run then skips the prefix, or refuses a reused local cache
directory. So each run holds a shared flock on /dev/shm/regscale-stream-000NNN.lock while it
uses prefix NNN (the kernel drops it when the process dies, however it dies) and stamps the lock's
mtime when taking it. Before creating a dataset, the node's first rank removes a prefix's shared
memory (its filelocks stay: `_remove_prefix`) when:
its lock exists, nobody holds it, and its `locals` segment is not newer than the lock (a newer
one belongs to a run that is registering the reused prefix right now); or it has no lock file
and claims our own local directory (only a dead run can). Other programs' prefixes are left alone.

A run registers its prefix and takes its lock under a shared lock of the host's registry, and the
cleaner takes that registry lock exclusively, without waiting: it never mistakes a run that has
registered but not yet locked its prefix for a dead one (another job on the host starting at the
same time), and when a registration is under way it leaves the cleaning to the next start (a
blocking wait could deadlock two jobs that share two hosts).
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from streaming.base.constant import BARRIER_FILELOCK

SHM_DIR = Path("/dev/shm")
PREFIX_RE = re.compile(r"^(\d{6})_")


def _lock_dir() -> Path:
    return SHM_DIR if SHM_DIR.is_dir() else Path(tempfile.gettempdir())


def _lock_path(prefix: int) -> Path:
    return _lock_dir() / f"regscale-stream-{prefix:06d}.lock"


def _prefixes() -> set[int]:
    found = set()
    for folder in (SHM_DIR, Path(tempfile.gettempdir())):
        if folder.is_dir():
            found |= {int(m.group(1)) for name in os.listdir(folder) if (m := PREFIX_RE.match(name))}
    return found


def _locals_of(prefix: int) -> Optional[list[str]]:
    """Local directories recorded in a prefix's `locals` segment (streaming's packing), or None."""
    path = SHM_DIR / f"{prefix:06d}_locals"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    size = int.from_bytes(data[:4], "little")
    return data[4:size].decode("utf-8", "replace").split("\0")[:-1]


def _remove_prefix(prefix: int) -> list[str]:
    """A dead run's shared memory segments. Its barrier filelock stays (made if it is not there), as
    a tombstone: streaming skips a prefix that has one, so the number is never reused, and the dead
    run's resource tracker, which unlinks the segment names its processes attached once the last of
    them is gone (seconds later: a DataLoader worker outlives its killed rank by up to 5 s), can
    never unlink a new run's segment of the same name (a spawned worker attaching it would find it
    gone)."""
    removed = []
    for name in os.listdir(SHM_DIR) if SHM_DIR.is_dir() else []:
        if name.startswith(f"{prefix:06d}_"):
            try:
                os.unlink(SHM_DIR / name)
                removed.append(str(SHM_DIR / name))
            except OSError:
                pass
    (Path(tempfile.gettempdir()) / f"{prefix:06d}_{BARRIER_FILELOCK}").touch()
    return removed


def _is_dead(prefix: int, our_locals: list[str]) -> bool:
    lock = _lock_path(prefix)
    if not lock.exists():
        theirs = _locals_of(prefix)
        return theirs is not None and bool(set(theirs) & set(our_locals))
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live process holds it
    finally:
        os.close(fd)
    try:
        return (SHM_DIR / f"{prefix:06d}_locals").stat().st_mtime_ns <= lock.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _registry() -> int:
    return os.open(_lock_dir() / "regscale-stream-registry.lock", os.O_RDWR | os.O_CREAT, 0o666)


@contextmanager
def registering() -> Iterator[None]:
    """While a dataset registers its prefix and `hold_prefix` takes it: no cleaner runs."""
    fd = _registry()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def clean_stale(our_locals: list[str]) -> list[str]:
    """Remove the shared memory of dead runs; returns the paths removed (none when another run is
    registering a dataset on this host right now)."""
    fd = _registry()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        removed = []
        for prefix in sorted(_prefixes()):
            if _is_dead(prefix, our_locals):
                removed += _remove_prefix(prefix)
                _lock_path(prefix).unlink(missing_ok=True)
        return removed
    finally:
        os.close(fd)


def hold_prefix(prefix: int) -> int:
    """Take a shared lock marking `prefix` as in use by this process; keep the fd open."""
    fd = os.open(_lock_path(prefix), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.utime(fd)
    return fd
