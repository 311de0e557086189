"""DeepSpeed ZeRO stage 1, 2 or 3 with DeepSpeed's own sharded checkpoints.

The client optimizer is torch AdamW (no JIT-built op), DeepSpeedCPUAdam with optimizer offload.
bf16 and fp16 are the official code's mixed precision: DeepSpeed keeps fp32 weights and the
forward runs under torch.autocast, which gives the official forward and gradients bit for bit,
reduced in fp32 as the official DDP does. (DeepSpeed's own bf16 and fp16 modes would hold half
weights, rounding the embeddings and the affine norm, and communicate gradients in half; ZeRO-3's
memory-efficient Linear adds the bias after the matmul, another rounding, so it is off.)
Gradient clipping, accumulation and the non-finite check (a skipped step, over all ranks) are
DeepSpeed's. fp16's loss scale is accelerate's GradScaler (base.LossScaler): its scale is handed
to the ZeRO optimizer as an external loss scale, with which it scales the loss and unscales the
gradients (one multiplication by 1/scale, fused with clipping: with train.grad_clip=1 the same
result as unscaling and then clipping); after each step the scaler updates on whether the step
was skipped. (DeepSpeed's own torch_autocast mode clips the gradients while they are still
scaled, and its scaler never learns of the overflows the ZeRO optimizer skips.)
The EMA shadows this rank's fp32 master fragments: a piece of every parameter's flattened fp32
copy, at an offset, so it is partitioned like the optimizer (ZeRO-1/2) or the weights (ZeRO-3).
Each rank writes its fragments to ema/rank*.pt; they are assembled by offset on load or export.
On another number of ranks, the checkpoint is converted to DeepSpeed's universal format (per
parameter: fp32 weights, Adam moments, step) and loaded from there, so nothing is lost.
Saves go through `_Writer`, DeepSpeed's checkpoint engine slot: each state dict DeepSpeed hands
over is copied to host memory in a staging thread and written, fsynced and hashed in a writer
thread (inline for blocking saves), so ZeRO saves are as asynchronous as FSDP's.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

# told before its first import which accelerator we run on: its auto-detection warns in every CPU process
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.staging import DefaultStager  # noqa: E402

from regscale.checkpoints import file_entry
from regscale.config import BatchPlan, EngineConfig, TrainConfig
from regscale.dist import DistEnv
from regscale.engine.base import (Engine, SaveHandle, StepResult, adamw, apply_block_options,
                                  deepspeed_fp16_mode, host_stager, loss_scaler, trainable)


BF16_MODE_PREFIX = "bf16_zero_pp_rank_"  # optimizer files of DeepSpeed's own bf16 mode


def ds_config(engine: EngineConfig, train: TrainConfig, plan: BatchPlan) -> dict[str, Any]:
    """DeepSpeed's configuration for this recipe and batch plan."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage == 3:  # its own Linear adds the bias after the matmul: other bf16 rounding
        zero["memory_efficient_linear"] = False
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _fp32_fragment(param: nn.Parameter) -> Optional[tuple[int, torch.Tensor]]:
    """(offset in the flattened parameter, live fp32 view) of this rank's master copy, or None."""
    if hasattr(param, "ds_id"):  # ZeRO-3: a contiguous partition of the padded flat parameter
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param)
        return param.ds_tensor.ds_numel * _rank(), local.view(-1)
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2: a fragment of the fp32 partition
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.hp_fragment.view(-1)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, engine: EngineConfig, train: TrainConfig, model: nn.Module, env: DistEnv,
                 plan: BatchPlan) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.precision, self.device = train.precision, env.device
        self.scaler = loss_scaler(train.precision, torch.device("cpu"))  # host-side: no device reads
        self.env = env
        model.to(env.device)
        apply_block_options(model, engine)
        named = trainable(model)
        params = [p for _, p in named]
        if engine.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                         weight_decay=train.weight_decay, adamw_mode=True)
        else:
            optimizer = adamw(train, engine.adamw, params)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(engine, train, plan),
            dist_init_required=False)
        self.writer = _Writer(env.device)
        self.ds.checkpoint_engine = self.writer
        self.module = self.ds
        self.names = [n for n, _ in named]
        self.shapes = {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in named}
        self.numels = {n: math.prod(s) for n, s in self.shapes.items()}
        self._bind()
        with torch.no_grad():
            self.ema = {n: frag.detach().clone().float() for n, (_, frag) in self.fragments.items()}

    def _bind(self) -> None:
        """Find the live fp32 master fragments (again after a load, which may replace them)."""
        self.fragments: dict[str, tuple[int, torch.Tensor]] = {}
        for name, param in trainable(self.ds.module):
            frag = _fp32_fragment(param)
            if frag is not None:
                self.fragments[name] = frag

    def backward(self, loss: torch.Tensor, *, last_micro: bool, accumulation: int) -> None:
        if self.scaler:
            self.ds.optimizer.override_loss_scale(self.scaler.get_scale())
        self.ds.backward(loss)  # DeepSpeed divides by the accumulation steps itself, then scales
        if not last_micro:
            self.ds.step()  # counts the micro-step; the update happens on the boundary

    def step(self, lr: float) -> StepResult:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        applied = bool(self.ds.was_step_applied())
        norm = self.ds.get_global_grad_norm()
        value = float(norm) if applied and norm is not None else math.nan
        if self.scaler is None:
            return StepResult(applied=applied, grad_norm=value)
        scale = self.scaler.get_scale()
        self.scaler.settle(skipped=not applied)
        return StepResult(applied=applied, grad_norm=value, loss_scale=scale)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        names = list(self.fragments)
        torch._foreach_lerp_([self.ema[n] for n in names],
                             [self.fragments[n][1].float() for n in names], 1.0 - decay)

    def save(self, path: Path, *, blocking: bool) -> SaveHandle:
        self.writer.begin(path, blocking=blocking)
        self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        shard = {"fragments": {n: (off, self.ema[n]) for n, (off, _) in self.fragments.items()},
                 "shapes": self.shapes}
        (path / "ema").mkdir(exist_ok=True)
        self.writer.save(shard, str(path / "ema" / f"rank{self.env.rank:05d}.pt"))
        return self.writer.end()

    def load(self, path: Path, manifest: dict[str, Any]) -> None:
        # DeepSpeed's bf16 and fp16 modes (what regscale used before its fp32 weights + autocast):
        # the universal format carries their fp32 master weights and Adam moments over to this
        # mode (and leaves their own loss scaler behind). bf16's optimizer files are bf16_zero_*.
        half_mode = any(path.glob(f"{BF16_MODE_PREFIX}*")) or deepspeed_fp16_mode(manifest)
        if manifest.get("world_size") == self.env.world_size and not half_mode:
            self.ds.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        else:
            self._load_resharded(path)
        self._bind()
        full = assemble_ema(path)
        with torch.no_grad():
            self.ema = {}
            for name, (off, frag) in self.fragments.items():
                self.ema[name] = torch.zeros_like(frag, dtype=torch.float32)
                _copy_slice(self.ema[name], full[name], off)

    def _load_resharded(self, path: Path) -> None:
        """Weights, fp32 master copy, Adam moments and step from a checkpoint that another number
        of ranks (or DeepSpeed's bf16 or fp16 mode) wrote: rank 0 converts it to a universal
        checkpoint in a scratch directory (the `.trash_` prefix makes the next start remove it,
        should this one die), all ranks load it."""
        import torch.distributed as dist

        scratch = path.parent / f".trash_universal_{path.name}"
        if self.env.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            to_universal(path, scratch / path.name)
        dist.barrier()
        # DeepSpeed reads this flag of its config only while loading; setting it here, instead of
        # at initialize, keeps same-world-size loads on the native (bit-exact) path
        config = self.ds._config
        config.load_universal_checkpoint = True
        try:
            self.ds.load_checkpoint(str(scratch), tag=path.name, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = False
        dist.barrier()
        if self.env.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)

    def close(self) -> None:
        self.writer.close()


def to_universal(path: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint (ds_to_universal) of the checkpoint directory `path`."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    # inject_missing_state: the universal-checkpoint info of a data-parallel-only model (no tensor or
    # pipeline parallelism) is the format version alone, which DeepSpeed saves only for models
    # that declare it
    args = argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        ds_to_universal(args)  # it prints progress bars


def _store(state: Any, path: Path, root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write one state dict and record its file (durable, hashed) under `root`."""
    torch.save(state, path)
    files[path.relative_to(root).as_posix()] = file_entry(path)


class _Writer(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine slot, filled by regscale: every `save(state_dict, path)`
    between `begin` and `end` is written (torch.save, fsync, hash) in a background thread after
    the engine's stager copied it to host memory, or at once for a blocking save (the weights do
    not change meanwhile, so nothing is copied). Loading is TorchCheckpointEngine's."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._stager: Optional[DefaultStager] = None
        self._write = ThreadPoolExecutor(1, thread_name_prefix="regscale-ds-write")
        self._root: Optional[Path] = None
        self._blocking = True
        self._files: dict[str, dict[str, Any]] = {}
        self._staged: list[Future] = []
        self._writes: list[Future] = []

    def preserves_storage_sharing(self) -> bool:
        return False  # nothing to clone first: a blocking save writes as is, an async one stages

    def begin(self, root: Path, *, blocking: bool) -> None:
        self._root, self._blocking, self._files, self._staged, self._writes = root, blocking, {}, [], []

    def save(self, state_dict: Any, path: str) -> None:
        if self._root is None:
            raise RuntimeError("DeepSpeed saved outside DeepSpeedEngine.save")
        root, files, target = self._root, self._files, Path(path)
        if self._blocking:
            _store(state_dict, target, root, files)
            return
        if self._stager is None:
            self._stager = host_stager(self.device)
        staged = self._stager.stage(state_dict)
        self._staged.append(staged)
        self._writes.append(self._write.submit(lambda: _store(staged.result(), target, root, files)))

    def end(self) -> SaveHandle:
        """The handle of the save since `begin` (stager and writer each work in order, so their
        last task finishes after all the others)."""
        files, staged, writes = self._files, self._staged, self._writes
        self._root = None
        if self._blocking:
            return SaveHandle.finished(files)

        def written() -> dict[str, dict[str, Any]]:
            for w in writes:
                w.result()
            return files

        return SaveHandle(staged[-1], self._write.submit(written))

    def close(self) -> None:
        self._write.shutdown(wait=True)
        if self._stager is not None:
            self._stager.close()


def _copy_slice(dst: torch.Tensor, full: torch.Tensor, offset: int) -> None:
    """dst <- full.flatten()[offset : offset + len(dst)] (zero padding past the end)."""
    flat = full.reshape(-1)
    n = max(0, min(dst.numel(), flat.numel() - offset))
    dst.zero_()
    dst[:n].copy_(flat[offset:offset + n].to(dst.dtype))


def assemble_ema(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors from every rank's fragments in `path/ema`."""
    files = sorted((path / "ema").glob("rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: no ema/rank*.pt files")
    full: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for f in files:
        shard = torch.load(f, map_location="cpu", weights_only=True)
        for name, shape in shard["shapes"].items():
            shapes[name] = shape
            full.setdefault(name, torch.zeros(math.prod(shape), dtype=torch.float32))
        for name, (off, frag) in shard["fragments"].items():
            flat = full[name]
            n = max(0, min(frag.numel(), flat.numel() - off))
            flat[off:off + n] = frag[:n]
    return {n: t.view(shapes[n]) for n, t in full.items()}


def consolidate(path: Path, weights: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights (EMA over them for weights='ema') from a DeepSpeed checkpoint directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # it prints progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    state = {k: v.float().contiguous() for k, v in state.items()}
    if weights == "ema":
        state.update(assemble_ema(path))
    return state
