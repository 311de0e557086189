"""Parallelism engines behind one small interface (`Engine`): FSDP2 and DeepSpeed ZeRO."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from regscale.config import BatchPlan, Config
from regscale.dist import DistEnv
from regscale.engine.base import Engine, StepResult

__all__ = ["Engine", "StepResult", "build_engine", "consolidate"]


def build_engine(cfg: Config, model: nn.Module, env: DistEnv, plan: BatchPlan) -> Engine:
    """Wrap the plain SiT in the engine `engine.kind` names (model must hold no frozen encoder)."""
    if cfg.engine.kind == "fsdp":
        from regscale.engine.fsdp import FSDPEngine

        return FSDPEngine(cfg, model, env)
    from regscale.engine.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg, model, env, plan)


def consolidate(kind: str, path: Path, weights: str) -> dict[str, torch.Tensor]:
    """Full fp32 tensors in the SiT's parameter names from one engine checkpoint directory."""
    if kind == "fsdp":
        from regscale.engine.fsdp import consolidate as from_dcp

        return from_dcp(path, weights)
    from regscale.engine.deepspeed import consolidate as from_deepspeed

    return from_deepspeed(path, weights)
