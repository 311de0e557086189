"""A run's weights out of its checkpoints, whatever engine and world size wrote them: consolidated
fp32 tensors in the SiT's own parameter names (sampling, evaluation) and one safetensors file
(`regscale export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from regscale.checkpoints import find_valid
from regscale.errors import UserError, first_line
from regscale.fsutil import atomic_path
from regscale.rundir import CHECKPOINTS, CONFIG, step_name

WEIGHTS = ("ema", "model")
ENGINES = ("fsdp", "deepspeed")


def consolidate(kind: str, path: Path, weights: str) -> dict[str, torch.Tensor]:
    """Full fp32 tensors in the SiT's parameter names from one engine checkpoint directory."""
    if kind == "fsdp":
        from regscale.engine.fsdp import consolidate as from_dcp

        return from_dcp(path, weights)
    from regscale.engine.deepspeed import consolidate as from_deepspeed

    return from_deepspeed(path, weights)


def load_consolidated(run_dir: Path | str, step: Optional[int] = None, weights: str = "ema"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, manifest): full fp32 SiT weights in our parameter names from the newest valid
    checkpoint (or `step`), whatever engine and world size wrote it. weights: 'ema' or 'model'."""
    if weights not in WEIGHTS:
        raise UserError(f"weights must be 'ema' or 'model'; got {weights!r}")
    root = Path(run_dir) / CHECKPOINTS
    found = find_valid(root, step)
    if found is None:
        what = f"step {step}" if step is not None else "any step"
        raise UserError(f"{root}: no valid checkpoint for {what} (expected {step_name(0)[:5]}XXXXXXXX/ "
                        "with manifest.json, written by `regscale train`)")
    path, manifest = found
    engine = manifest.get("engine")
    kind = engine.get("kind") if isinstance(engine, dict) else None
    if kind not in ENGINES:
        raise UserError(f"{path}: its manifest.json names no engine ({' or '.join(ENGINES)}); not a checkpoint "
                        "written by `regscale train`")
    try:
        return consolidate(kind, path, weights), manifest
    except Exception as err:  # the engine's reader on files that are not its own: name the checkpoint
        raise UserError(f"{path}: cannot read its {kind} checkpoint files ({type(err).__name__}: "
                        f"{first_line(err)})") from err


def export_safetensors(run_dir: Path | str, out: Path | str, step: Optional[int] = None,
                       weights: str = "ema") -> dict[str, Any]:
    """Write one consolidated safetensors file (atomically); returns the checkpoint's manifest.
    The run's config travels in the metadata, so sampling the file needs no recipe."""
    from safetensors.torch import save_file

    state, manifest = load_consolidated(run_dir, step, weights)
    meta = {"step": str(manifest["step"]), "images": str(manifest.get("images")), "weights": weights,
            "config_hash": str(manifest.get("config_hash")), "engine": manifest["engine"]["kind"]}
    config = Path(run_dir) / CONFIG
    if config.is_file():
        meta["config"] = config.read_text()
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    return manifest
