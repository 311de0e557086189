"""Checkpoints that survive anything: publish-by-rename, a verified manifest, retention, export.

Layout under <run_dir>/checkpoints/:
    step_00001000/          one published checkpoint: the engine's files + manifest.json
    .tmp_step_00002000/     being written (never loaded; removed on the next start)
    latest                  text: the newest published directory's name (moved last)

A checkpoint exists only once complete: every rank writes into the temporary directory, rank 0
fsyncs the files, hashes them into manifest.json, fsyncs, renames the directory to its final name,
then replaces `latest`. On start the newest directory whose manifest and file hashes check out is
used; broken ones are renamed aside with a warning that names them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from regscale.errors import UserError
from regscale.fsutil import atomic_path, fsync_dir, fsync_file, write_atomic
from regscale.rundir import CHECKPOINTS, CONFIG, step_name, step_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `directory` but the manifest."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            table[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return table


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------
# finding and verifying


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def verify(path: Path) -> Optional[str]:
    """None when `path` is a complete checkpoint; else why not (for the warning)."""
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as err:
        return f"unreadable manifest.json ({err})"
    if manifest.get("format") != FORMAT or "files" not in manifest or "step" not in manifest:
        return "manifest.json lacks format/step/files"
    if step_name(int(manifest["step"])) != path.name:
        return f"manifest says step {manifest['step']}"
    for rel, info in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            return f"missing file {rel}"
        if file.stat().st_size != info["size"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest says {info['size']}"
        if sha256_file(file) != info["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def published(root: Path) -> list[Path]:
    """Published checkpoint directories, newest step first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def find_valid(root: Path, step: Optional[int] = None, *, quarantine: bool = False
               ) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest valid checkpoint (or the one of `step`); broken ones are skipped with a warning
    naming them, and with `quarantine` renamed to `<name>.broken-<time>` so a later save of the
    same step can take the name."""
    for path in published(root):
        if step is not None and path.name != step_name(step):
            continue
        reason = verify(path)
        if reason is None:
            return path, read_manifest(path)
        log.warning("checkpoint %s is broken (%s): skipping it", path, reason)
        if quarantine:
            aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
            os.replace(path, aside)
            log.warning("moved the broken checkpoint aside to %s", aside)
    return None


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class PendingSave:
    tmp: Path
    manifest: dict[str, Any]
    future: Optional[Future]
    started: float

    def state(self) -> int:
        """0 written, 1 still writing, 2 failed (this rank)."""
        if self.future is None:
            return 0
        if not self.future.done():
            return 1
        return 2 if self.future.exception() is not None else 0


class CheckpointStore:
    """The checkpoints/ directory of a run: temp dirs, publication, retention."""

    def __init__(self, root: Path, *, keep_last: int, keep_every: int, protect: tuple[int, ...] = ()):
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.protect = set(protect)

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp_{step_name(step)}"

    def clean_stale(self) -> None:
        """Remove temporary directories of saves that never finished (rank 0, at start)."""
        for path in self.root.glob(f".tmp_{step_name(0)[:5]}*"):
            log.warning("removing unfinished checkpoint write %s", path)
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".trash_*"):
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, tmp: Path, manifest: dict[str, Any]) -> Path:
        """Make `tmp` durable and visible as step_XXXXXXXX, then move `latest` (rank 0 only)."""
        final = self.root / step_name(int(manifest["step"]))
        manifest = dict(manifest, format=FORMAT, files=file_table(tmp))
        manifest["total_bytes"] = sum(f["size"] for f in manifest["files"].values())
        for rel in manifest["files"]:
            fsync_file(tmp / rel)
        for sub in sorted({(tmp / rel).parent for rel in manifest["files"]}):
            fsync_dir(sub)
        write_atomic(tmp / MANIFEST, json.dumps(_jsonable(manifest), indent=1).encode())
        if final.exists():  # the same step saved again (after a rollback): replace it whole
            aside = self.root / f".trash_{final.name}_{int(time.time() * 1e6)}"
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.root)
        write_atomic(self.root / LATEST, (final.name + "\n").encode())
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
                aside = self.root / f".trash_{path.name}"
                os.replace(path, aside)
                shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading for evaluation and export


def load_consolidated(run_dir: Path | str, step: Optional[int] = None, weights: str = "ema"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, manifest): full fp32 SiT weights in our parameter names from the newest valid
    checkpoint (or `step`), whatever engine and world size wrote it. weights: 'ema' or 'model'."""
    from regscale.engine import consolidate

    if weights not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model'; got {weights!r}")
    root = Path(run_dir) / CHECKPOINTS
    found = find_valid(root, step)
    if found is None:
        what = f"step {step}" if step is not None else "any step"
        raise UserError(f"{root}: no valid checkpoint for {what} (expected step_XXXXXXXX/ with "
                        "manifest.json, written by `regscale train`)")
    path, manifest = found
    state = consolidate(manifest["engine"]["kind"], path, weights)
    return state, manifest


def export_safetensors(run_dir: Path | str, out: Path | str, step: Optional[int] = None,
                       weights: str = "ema") -> dict[str, Any]:
    """Write one consolidated safetensors file (atomically); returns the checkpoint's manifest."""
    from safetensors.torch import save_file

    state, manifest = load_consolidated(run_dir, step, weights)
    meta = {"step": str(manifest["step"]), "images": str(manifest["images"]), "weights": weights,
            "config_hash": str(manifest["config_hash"]), "engine": manifest["engine"]["kind"]}
    config = Path(run_dir) / CONFIG
    if config.is_file():  # lets `regscale sample FILE.safetensors` rebuild the model without a recipe
        meta["config"] = config.read_text()
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    return manifest
