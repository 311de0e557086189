"""Parallelism engines behind one small interface (`Engine`): FSDP2 and DeepSpeed ZeRO."""

from __future__ import annotations

from torch import nn

from regscale.config import BatchPlan, EngineConfig, TrainConfig
from regscale.dist import DistEnv
from regscale.engine.base import Engine, SaveHandle, StepResult
from regscale.engine.export import consolidate, export_safetensors, load_consolidated

__all__ = ["Engine", "SaveHandle", "StepResult", "build_engine", "consolidate", "export_safetensors",
           "load_consolidated"]


def build_engine(engine: EngineConfig, train: TrainConfig, model: nn.Module, env: DistEnv,
                 plan: BatchPlan) -> Engine:
    """Wrap the plain SiT in the engine `engine.kind` names (model must hold no frozen encoder)."""
    if engine.kind == "fsdp":
        from regscale.engine.fsdp import FSDPEngine

        return FSDPEngine(engine, train, model, env)
    from regscale.engine.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(engine, train, model, env, plan)
