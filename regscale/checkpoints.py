"""A run's checkpoints/ directory: manifest, verification, publication and retention.

Layout under <run_dir>/checkpoints/:
    step_00001000/                 a published checkpoint: the engine's files + manifest.json
    .tmp_step_00002000/            being written (never loaded; removed on the next start)
    step_00000500.broken-<time>/   failed verification, set aside (never deleted by regscale)
    latest                         text: the newest published directory's name (moved last)

A checkpoint exists only once complete. Each rank writes its own files into the temporary
directory and records their size and xxh3-128 hash as it writes them (`file_entry`, after the
fsync); rank 0 merges the tables into manifest.json, renames the directory to its final name and
then replaces `latest`. Verification reads every listed file back, in parallel threads (and, in
training, split over the ranks: `shares`). Manifests of format 1 (sha256) still verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import xxhash

from regscale.fsutil import fsync_dir, write_atomic
from regscale.rundir import step_name, step_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = 2
HASH = "xxh3_128"  # ~14x sha256's speed here (bench/bench_checkpoint.py); format 1 used sha256
_HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHUNK = 1 << 23
_TMP = ".tmp_"
_BROKEN = ".broken-"


def verify_threads() -> int:
    """Threads that read files back at once (reads and hashing release the interpreter lock)."""
    return min(8, os.cpu_count() or 1)


def file_entry(path: Path, algo: str = HASH) -> dict[str, Any]:
    """{size, <algo>: hex} of a file just written, made durable (fsync) on the way."""
    h = _HASHERS[algo]()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, algo: h.hexdigest()}


def file_table(directory: Path, rels: Optional[Iterable[str]] = None) -> dict[str, dict[str, Any]]:
    """{relative path: file_entry} of `rels` (default: every file under `directory` but the
    manifest), hashed in parallel threads."""
    if rels is None:
        rels = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    rels = sorted(r for r in rels if r != MANIFEST)
    with ThreadPoolExecutor(verify_threads()) as pool:
        return dict(zip(rels, pool.map(lambda rel: file_entry(directory / rel), rels)))


# ---------------------------------------------------------------------------------------------
# finding and verifying


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def manifest_problem(path: Path) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(manifest, None) when `path`'s manifest is whole and names it; else (None, why not)."""
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return None, "no manifest.json"
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest.json ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") not in (1, FORMAT) \
            or not isinstance(manifest.get("files"), dict) or type(manifest.get("step")) is not int:
        return None, "manifest.json lacks format/step/files"
    if not all(isinstance(info, dict) and type(info.get("size")) is int for info in manifest["files"].values()):
        return None, "manifest.json lists a file without its size"
    if step_name(int(manifest["step"])) != path.name:
        return None, f"manifest says step {manifest['step']}"
    return manifest, None


def file_problem(path: Path, rel: str, info: dict[str, Any]) -> Optional[str]:
    """None when file `rel` of checkpoint `path` has the size and hash the manifest lists."""
    file = path / rel
    if not file.is_file():
        return f"missing file {rel}"
    if file.stat().st_size != info["size"]:
        return f"{rel} has {file.stat().st_size} bytes, manifest says {info['size']}"
    algo = next((a for a in _HASHERS if a in info), None)
    if algo is None:
        return f"{rel} has no hash in the manifest"
    h = _HASHERS[algo]()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return None if h.hexdigest() == info[algo] else f"{rel} does not match its {algo}"


def shares(files: dict[str, dict[str, Any]], n: int) -> list[list[str]]:
    """The listed files split into n lists of about equal bytes (largest first, each to the
    lightest list): who verifies what, the same on every rank."""
    out: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for rel in sorted(files, key=lambda r: (-files[r]["size"], r)):
        i = load.index(min(load))
        out[i].append(rel)
        load[i] += files[rel]["size"]
    return out


def files_problem(path: Path, manifest: dict[str, Any], rels: list[str]) -> Optional[str]:
    """The first problem among files `rels` of checkpoint `path`, read in parallel threads."""
    files = manifest["files"]
    with ThreadPoolExecutor(verify_threads()) as pool:
        problems = pool.map(lambda rel: file_problem(path, rel, files[rel]), rels)
        return next((p for p in problems if p), None)


def verify(path: Path) -> Optional[str]:
    """None when `path` is a complete checkpoint; else why not (for the warning)."""
    manifest, problem = manifest_problem(path)
    if manifest is None:
        return problem
    return files_problem(path, manifest, list(manifest["files"]))


def published(root: Path) -> list[Path]:
    """Published checkpoint directories, newest step first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def set_aside(root: Path) -> list[Path]:
    """Checkpoints that failed verification and were renamed aside."""
    return sorted(p for p in root.glob(f"step_*{_BROKEN}*") if p.is_dir()) if root.is_dir() else []


def put_aside(path: Path, reason: str) -> Path:
    """Rename a broken checkpoint to `<name>.broken-<time>` (so a later save of the same step can
    take the name), with a warning naming both."""
    aside = path.with_name(f"{path.name}{_BROKEN}{int(time.time())}")
    os.replace(path, aside)
    log.warning("checkpoint %s is broken (%s): moved aside to %s", path, reason, aside)
    return aside


def _warn_broken(path: Path, reason: str) -> None:
    log.warning("checkpoint %s is broken (%s): skipping it", path, reason)


def find_valid(root: Path, step: Optional[int] = None,
               skipped: Callable[[Path, str], None] = _warn_broken) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest valid checkpoint (or the one of `step`) for a reader in one process; broken
    ones are skipped, each handed to `skipped` with the reason (a warning), and left where they are."""
    for path in published(root):
        if step is not None and path.name != step_name(step):
            continue
        reason = verify(path)
        if reason is None:
            return path, read_manifest(path)
        skipped(path, reason)
    return None


# ---------------------------------------------------------------------------------------------
# writing


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


class CheckpointStore:
    """The checkpoints/ directory of a run: temp dirs, publication, retention."""

    def __init__(self, root: Path, *, keep_last: int, keep_every: int, protect: tuple[int, ...] = ()):
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.protect = set(protect)

    def tmp_dir(self, step: int) -> Path:
        return self.root / f"{_TMP}{step_name(step)}"

    def clean_stale(self) -> None:
        """Remove temporary directories of saves that never finished (rank 0, at start)."""
        for path in self.root.glob(f"{_TMP}*"):
            log.warning("removing unfinished checkpoint write %s", path)
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".trash_*"):
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, tmp: Path, manifest: dict[str, Any], files: dict[str, dict[str, Any]]) -> Path:
        """Make `tmp` visible as step_XXXXXXXX with its manifest, then move `latest` (rank 0).

        `files` are the writers' tables; a file no writer reported (a small one an engine writes
        on the side) is hashed here."""
        final = self.root / step_name(int(manifest["step"]))
        on_disk = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()} - {MANIFEST}
        files = {**{k: v for k, v in files.items() if k in on_disk},
                 **file_table(tmp, on_disk - set(files))}
        missing = sorted(set(files) - on_disk)
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: written files vanished before publication: {missing[:3]}")
        manifest = dict(manifest, format=FORMAT, files=dict(sorted(files.items())))
        manifest["total_bytes"] = sum(f["size"] for f in files.values())
        for sub in sorted({(tmp / rel).parent for rel in files}):
            fsync_dir(sub)
        write_atomic(tmp / MANIFEST, json.dumps(_jsonable(manifest), indent=1))
        if final.exists():  # the same step saved again (after a rollback): replace it whole
            self._discard(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_atomic(self.root / LATEST, final.name + "\n")
        self.retain(newest=final)
        return final

    def retain(self, newest: Path) -> None:
        """Delete checkpoints beyond keep_last, except every keep_every-th step, protected
        steps and `newest` (just published, so valid)."""
        dirs = published(self.root)
        keep = {p.name for p in dirs[: self.keep_last]} | {newest.name}
        for path in dirs:
            step = step_of(path.name)
            if (self.keep_every and step % self.keep_every == 0) or step in self.protect:
                keep.add(path.name)
        for path in dirs:
            if path.name not in keep:
                self._discard(path)

    def _discard(self, path: Path) -> None:
        """Rename a checkpoint out of sight at once and delete its files in the background (what
        is left when the process ends, `clean_stale` removes at the next start)."""
        aside = self.root / f".trash_{path.name}_{time.time_ns()}"
        os.replace(path, aside)
        threading.Thread(target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True},
                         name="regscale-retention", daemon=True).start()
