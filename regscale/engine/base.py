"""The one small interface the training loop sees, and what both engines share.

An engine owns wrapping, backward, optimizer step (with clipping and non-finite skipping), fp16's
loss scale, the fp32 EMA, and saving/loading its own sharded checkpoint files (each rank writes,
fsyncs and hashes its own files, in the background for async saves). It knows nothing about data,
losses, schedules of checkpoints or preemption: that is the loop's and the Checkpointer's job.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from regscale.config import EngineConfig, TrainConfig

if TYPE_CHECKING:
    from torch.distributed.checkpoint.staging import DefaultStager

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# what train.precision=bf16 means, recorded in every checkpoint's manifest: fp32 weights under
# autocast, the official code's mixed precision (checkpoints without it had bf16 weights)
BF16_NUMERICS = "fp32-weights+autocast"
LOSS_SCALER = "loss_scaler"  # the manifest's key for fp16's LossScaler state (GradScaler.state_dict)


def host_stager(device: torch.device) -> "DefaultStager":
    """What async saves copy the state with before writing it: a background thread into host
    buffers kept from one save to the next (pinned, with non-blocking copies, on CUDA)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=True, use_non_blocking_copy=cuda))


def precision_autocast(precision: str, device: torch.device) -> ContextManager:
    """torch.autocast in `train.precision` on any device (off for fp32): what the model's forward
    and the frozen encoder's run under."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class LossScaler(torch.amp.GradScaler):
    """fp16's dynamic loss scale, the official one: accelerate's GradScaler, which it builds with no
    arguments, so torch's defaults: 2**16 at first, halved and the optimizer step skipped when a
    gradient holds inf/nan, doubled after 2000 steps in a row without.

    FSDP uses it as GradScaler is meant to be used (scale, unscale_, clip, step, update): FSDP2's
    gradients are DTensors, and DTensor all-reduces (max) the inf check of their local shards over
    the mesh, so every rank skips the same steps. DeepSpeed's ZeRO optimizers scale the loss, check
    every rank's gradients and unscale them themselves at the scale they are given; `settle` then
    applies GradScaler's own update to what they found. Its state_dict goes into every checkpoint's
    manifest (a few numbers, the same on every rank), so it resumes on any number of processes.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__(device.type, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                         growth_interval=2000)
        self._lazy_init_scale_growth_tracker(device)

    def found_inf_and_scale(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """[1 if a gradient held inf/nan on any rank else 0, the scale] of the step being taken
        (after unscale_), on the device: to be read with the gradient norm, in one transfer."""
        found = sum(self._found_inf_per_device(optimizer).values())
        return torch.stack([torch.as_tensor(found, dtype=torch.float32, device=self._scale.device), self._scale])

    def settle(self, skipped: bool) -> None:
        """update() after a step whose inf/nan check the engine made itself (DeepSpeed): GradScaler's
        rule, by its own kernel, on whether that step was skipped."""
        torch._amp_update_scale_(self._scale, self._growth_tracker,
                                 torch.full((), float(skipped), device=self._scale.device),
                                 self._growth_factor, self._backoff_factor, self._growth_interval)


def loss_scaler(precision: str, device: torch.device) -> Optional[LossScaler]:
    """The LossScaler for train.precision=fp16; None for bf16 and fp32, which need none."""
    return LossScaler(device) if precision == "fp16" else None


def deepspeed_fp16_mode(manifest: dict[str, Any]) -> bool:
    """A checkpoint of DeepSpeed's own fp16 mode, regscale's fp16 before it was the official mixed
    precision (fp16 weights, DeepSpeed's loss scaler): a DeepSpeed fp16 manifest without LossScaler
    state (FSDP refused fp16 then)."""
    engine = manifest.get("engine", {})
    return (engine.get("kind"), engine.get("precision")) == ("deepspeed", "fp16") and LOSS_SCALER not in manifest


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False: a gradient was not finite, nothing changed but the skip count (and fp16's scale)
    grad_norm: float  # before clipping, over all ranks
    loss_scale: Optional[float] = None  # fp16: the scale this step's gradients were computed with


@dataclass(frozen=True)
class SaveHandle:
    """One rank's part of a checkpoint save.

    staged: done once the state is copied aside, so the weights may change again (the loop waits
    for it before the next optimizer step). written: done once this rank's files are durable; its
    result is their table, {relative path: checkpoints.file_entry}."""

    staged: Future
    written: Future

    @staticmethod
    def finished(files: dict[str, dict[str, Any]]) -> "SaveHandle":
        """The handle of a save that already completed (a blocking one)."""
        staged: Future = Future()
        staged.set_result(None)
        written: Future = Future()
        written.set_result(files)
        return SaveHandle(staged, written)


class Engine(ABC):
    """What the loop calls. `module` is called like the plain SiT: module(x, t, y, cls_t)."""

    kind: str
    module: nn.Module
    precision: str  # train.precision
    device: torch.device
    scaler: Optional[LossScaler]  # fp16's loss scale; None in bf16 and fp32

    def autocast(self) -> ContextManager:
        """Context for the forward pass: torch.autocast in `train.precision` over fp32 weights, the
        official code's mixed precision (off for fp32)."""
        return precision_autocast(self.precision, self.device)

    @abstractmethod
    def backward(self, loss: torch.Tensor, *, last_micro: bool, accumulation: int) -> None:
        """Accumulate gradients of one micro-batch's mean loss; reduce them on the last one."""

    @abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip and apply the accumulated gradients, or skip when their norm is not finite."""

    @abstractmethod
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, in fp32, on this rank's shard."""

    @abstractmethod
    def save(self, path: Path, *, blocking: bool) -> SaveHandle:
        """Write this rank's part of a checkpoint into `path` (a directory every rank sees); with
        blocking=False the copy and the writes continue in the background."""

    @abstractmethod
    def load(self, path: Path, manifest: dict[str, Any]) -> None:
        """Restore weights, optimizer and EMA from a checkpoint directory, resharding when the
        world size differs from manifest['world_size']."""

    def close(self) -> None:
        """Release background resources."""


def apply_block_options(model: nn.Module, engine: EngineConfig) -> None:
    """Activation checkpointing and torch.compile per SiT block, from outside the model.

    Both keep parameter names unchanged (no wrapper modules), so checkpoints and exports read the
    same whatever the options.
    """
    if engine.activation_checkpointing:
        for block in model.blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if engine.compile:
        for block in model.blocks:
            block.compile()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adamw(train: TrainConfig, implementation: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """torch AdamW with the recipe's hyper-parameters, in the `engine.adamw` implementation (fused:
    one kernel for every tensor, on CUDA and CPU alike; 2.5x faster than the for-loop over FSDP's
    DTensors on CPU, bench figures in recipes/sit_xl_4m.yaml)."""
    choice = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                             weight_decay=train.weight_decay, **choice[implementation])
