"""FSDP2: `fully_shard` per SiT block and at the root, checkpoints through torch.distributed.checkpoint.

Mixed precision is the official code's, bit for bit: fp32 parameters (the optimizer's master
weights) and torch.autocast (bf16 or fp16) around the forward, so the residual stream, the
timestep, the norms and the losses stay fp32. The blocks gather their parameters in the autocast
dtype (half the traffic): they hold only Linears, which autocast runs in that dtype anyway, and
norms without weights, so their results are unchanged (with model.qk_norm their norms have
weights: they gather in fp32). The root's parameters (embeddings, an affine norm, heads) gather in
fp32. Gradients are reduced in fp32. fp16 adds accelerate's loss scale (base.LossScaler): the
loss is scaled before backward, the gradients unscaled before clipping, and a step whose gradients
hold inf/nan on any rank is skipped on every rank.
The EMA is a set of DTensors with the parameters' placements, so it is sharded exactly like them
and DCP saves and reshards it.
On one process sharding is the identity and only adds per-block copies of every parameter and
gradient (0.33 s of a 4.6 s SiT-B/2 fp32 step on CPU, bench/bench_model.py --parts step): the
model then runs unwrapped, with the same math, and its checkpoints are the same DCP files (DCP
reshards between plain tensors and DTensors either way).
Async saves stage the state into (pinned, on CUDA) host buffers in a background thread that the
engine keeps between saves, then write from another one; each rank hashes the files it wrote.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from regscale.checkpoints import file_entry
from regscale.config import EngineConfig, TrainConfig
from regscale.dist import DistEnv
from regscale.engine.base import (DTYPES, Engine, SaveHandle, StepResult, adamw, apply_block_options,
                                  host_stager, loss_scaler, trainable)


def _own_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    """The root's outputs as tensors of their own. FSDP2 hooks them for backward, and an in-place op
    on a view would skip that hook (it warns about it): the REPA projector's output is such a view,
    since nn.Linear computes a [B, T, h] input as one 2-D matmul viewed back to 3-D."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t, output)


def _linear_parameters_only(module: nn.Module) -> bool:
    """Every parameter of `module` belongs to an nn.Linear: half-precision copies of them give
    autocast's results exactly (it casts a Linear's weight and bias to its dtype itself)."""
    owners = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    return all(isinstance(m, nn.Linear) for m in owners)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FSDPEngine(Engine):
    kind = "fsdp"

    def __init__(self, engine: EngineConfig, train: TrainConfig, model: nn.Module, env: DistEnv) -> None:
        self.grad_clip = train.grad_clip
        self.device = env.device
        model.to(env.device)
        apply_block_options(model, engine)
        self.precision = train.precision
        self.scaler = loss_scaler(train.precision, env.device)
        self.sharded = env.world_size > 1
        if self.sharded:
            half = train.precision != "fp32" and all(_linear_parameters_only(b) for b in model.blocks)
            blocks = MixedPrecisionPolicy(param_dtype=DTYPES[train.precision] if half else None,
                                          reduce_dtype=torch.float32, cast_forward_inputs=False)
            for block in model.blocks:
                fully_shard(block, mp_policy=blocks)
            model.register_forward_hook(_own_outputs)  # runs before FSDP's own post-forward hook
            fully_shard(model, mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False))
        self.module = model
        named = trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = adamw(train, engine.adamw, self.params)
        with torch.no_grad():
            self.ema = {n: p.detach().clone().float() for n, p in named}
        # async saves write from a thread: give them their own gloo group so their collectives
        # never interleave with the loop's; their stager (and its host buffers) lives as long
        self._save_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._stager: DefaultStager | None = None

    def backward(self, loss: torch.Tensor, *, last_micro: bool, accumulation: int) -> None:
        if self.sharded:
            self.module.set_requires_gradient_sync(last_micro)
        loss = loss / accumulation
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr: float) -> StepResult:
        scaler, clip = self.scaler, self.grad_clip
        if scaler:
            scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm=clip if clip > 0 else math.inf)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if scaler is None:
            value, scale = float(norm), None
            applied = math.isfinite(value)
            if applied:
                self.optimizer.step()
        else:  # one read: the norm, GradScaler's inf check (over all ranks) and its scale
            value, found_inf, scale = torch.cat([norm.float().reshape(1),
                                                 scaler.found_inf_and_scale(self.optimizer)]).tolist()
            applied = not found_inf
            scaler.step(self.optimizer)  # skipped on found_inf
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied=applied, grad_norm=value, loss_scale=scale)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        ema = [_local(self.ema[n]) for n in self.names]
        torch._foreach_lerp_(ema, [_local(p) for p in self.params], 1.0 - decay)

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema}

    def save(self, path: Path, *, blocking: bool) -> SaveHandle:
        state = self._state()
        writer = _HashingWriter(path)
        if blocking:
            dcp.save(state, storage_writer=writer)
            return SaveHandle.finished(writer.files)
        if self._stager is None:
            self._stager = host_stager(self.device)
        response = dcp.async_save(state, storage_writer=writer, process_group=self._save_group,
                                  async_stager=self._stager)
        written: Future = Future()

        def uploaded(upload: Future) -> None:
            err = upload.exception()
            if err is not None:
                written.set_exception(err)
            else:
                written.set_result(writer.files)

        response.upload_completion.add_done_callback(uploaded)
        return SaveHandle(response.staging_completion, written)

    def load(self, path: Path, manifest: dict[str, Any]) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(path))  # DCP reshards to this world size by itself
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._save_group is not None:
            dist.destroy_process_group(self._save_group)
            self._save_group = None


class _HashingWriter(FileSystemWriter):
    """DCP's file writer, recording the size and hash of every file this rank writes (after the
    writer's fsync), and of the metadata file on the coordinator."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.root = Path(path)
        self.files: dict[str, dict[str, Any]] = {}

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        for result in future.wait():
            rel = result.storage_data.relative_path
            if rel not in self.files:
                self.files[rel] = file_entry(self.root / rel)
        return future

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)
        for meta in self.root.glob("*.metadata"):
            self.files[meta.name] = file_entry(meta)


def consolidate(path: Path, weights: str) -> dict[str, torch.Tensor]:
    """Full tensors of `model.*` (and `ema.*` over them for weights='ema') from a DCP checkpoint,
    read in this process alone, whatever world size wrote it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    wanted = ("model.", "ema.") if weights == "ema" else ("model.",)
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(wanted) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    out = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if weights == "ema":
        out.update({k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")})
    return out
