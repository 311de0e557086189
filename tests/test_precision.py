"""bf16 and fp16 training compute what the official code computes: fp32 parameters under
torch.autocast (accelerate's mixed precision), where the residual stream, the timestep and the norms
stay fp32; fp16 adds accelerate's GradScaler (torch's defaults).

Both engines, on 1 and 2 gloo processes, give the official forward and gradients bit for bit:
FSDP's blocks gather half copies of Linear weights (which autocast would make itself), DeepSpeed
keeps fp32 weights. The engines run in forked processes (the real engine code, the real
collectives), each on the same batch, so the reduced gradient equals one rank's. The old way
(FSDP casting the inputs and every weight to bf16) was 2.6x further from fp32 than the official.
In fp16 a few steps also follow the official loss scale: a forced overflow is skipped and halves
it, and (FSDP, 2 processes) an inf in one rank's gradient shard alone skips the step on both."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.multiprocessing as mp

from regscale.faults import OVERFLOW_FACTOR
from regscale.models.sit import SiT
from tests.fixtures.train import SMOKE

BATCH = 4


def _model() -> SiT:
    """A small SiT with every part non-zero (the zero-initialised heads and adaLN too)."""
    torch.manual_seed(0)
    model = SiT(input_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=4, encoder_depth=2,
                num_classes=10, projector_dim=256, cls_token_dim=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 4, 16, 16, generator=g), torch.rand(BATCH, generator=g),
            torch.randint(0, 10, (BATCH,), generator=g), torch.randn(BATCH, 64, generator=g))


def _loss(out: tuple) -> torch.Tensor:
    v, zs, v_cls = out
    return v.float().square().mean() + sum(z.float().square().mean() for z in zs) + v_cls.float().square().mean()


def _official(model: SiT, amp: bool) -> dict[str, torch.Tensor]:
    """The official step's numerics: the plain module, fp32 parameters, autocast(bf16) when amp."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(*_batch())
    _loss(out).backward()
    return {"output": out[0].detach().float(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    from regscale import dist
    from regscale.config import batch_plan, load_config
    from regscale.engine import build_engine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = dist.setup()
    try:
        cfg = load_config(SMOKE, ["train.precision=bf16", f"train.batch_size={BATCH * world}", *overrides])
        engine = build_engine(cfg.engine, cfg.train, _model(), env, batch_plan(cfg.train, world))
        with engine.autocast():
            output = engine.module(*_batch())
        engine.backward(_loss(output), last_micro=True, accumulation=1)
        result = {"output": output[0].detach().float()}
        for name, p in _model_of(engine).named_parameters():
            result[name] = _full_grad(p).float()
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.teardown()


def _model_of(engine) -> torch.nn.Module:
    return engine.module.module if engine.kind == "deepspeed" else engine.module


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(p.grad, DTensor):
        return p.grad.full_tensor()
    if p.grad is not None:
        return p.grad
    from deepspeed.utils import safe_get_full_grad  # ZeRO keeps gradients in its own partitions

    return safe_get_full_grad(p)


def _run(tmp_path: Path, world: int, *args, worker=None) -> dict[str, torch.Tensor]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"engine-{world}.pt"
    # fork: the children inherit the imports; the parent runs torch with one thread (one_thread)
    mp.start_processes(worker or _worker, args=(world, port, *args, str(out)), nprocs=world, start_method="fork")
    return torch.load(out)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


ENGINES = {"fsdp": ["engine.kind=fsdp"], "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine,world", [("fsdp", 1), ("fsdp", 2), ("zero2", 2), ("zero3", 2)])
def test_bf16_is_the_official_mixed_precision_bit_for_bit(engine: str, world: int, tmp_path: Path,
                                                          one_thread) -> None:
    official = _official(_model(), amp=True)
    ours = _run(tmp_path, world, ENGINES[engine])
    assert ours.keys() == official.keys()
    different = [name for name in official if not torch.equal(ours[name], official[name])]
    assert not different, f"differ from the official mixed precision: {different}"
    fp32 = _official(_model(), amp=False)["output"]
    assert _relative(ours["output"], fp32) > 1e-4  # bf16 did run: not a silent fp32 forward


# fp16 steps: the fourth only on 2 FSDP processes, where rank 1 alone finds an inf in its shard
STEPS, OVERFLOW_AT, ONE_RANK_INF_AT = 4, 1, 3
INF_PARAM, INF_ROW = "blocks.0.attn.qkv.weight", 192  # [384, 128]: rank 1's shard of 2 starts at row 192
LR, CLIP = 1e-3, 1e9  # clipping inactive: the weights after each step can be compared bit for bit
FP16 = ["train.precision=fp16", "engine.adamw=for-loop", f"train.lr={LR}", f"train.grad_clip={CLIP}"]


def _official_fp16(inf_at: Optional[int]) -> list[dict]:
    """The official fp16 steps (train.py with accelerate's Accelerator(mixed_precision="fp16")):
    fp32 parameters, the forward under autocast(fp16), torch.amp.GradScaler() as accelerate makes
    it (no arguments), scale -> backward -> unscale_ -> clip -> step -> update; AdamW as upstream
    builds it (on CPU torch's default is the for-loop). Per step: output, loss, the scale, every
    gradient after unscaling and their norm, whether the step was applied, the weights after it."""
    model = _model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = []
    for step in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(*_batch(step))
        loss = _loss(out) * (OVERFLOW_FACTOR if step == OVERFLOW_AT else 1.0)
        scaler.scale(loss).backward()
        if step == inf_at:
            dict(named)[INF_PARAM].grad[INF_ROW, 0] = math.inf
        scale = scaler.get_scale()
        scaler.unscale_(opt)
        grads = {f"grad.{n}": p.grad.clone() for n, p in named}
        before = [p.detach().clone() for _, p in named]
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        applied = any(not torch.equal(b, p) for b, (_, p) in zip(before, named))
        steps.append({"output": out[0].detach().float(), "loss": loss.detach(), "scale": scale, "applied": applied,
                      "grad_norm": float(norm), **grads, **{f"weight.{n}": p.detach().clone() for n, p in named}})
    return steps


def _fp16_worker(rank: int, world: int, port: int, overrides: list[str], inf_at: Optional[int], out: str) -> None:
    """The same steps through the engine (rank 0 saves them): gradients are read scaled, as the
    engine holds them before its step, and multiplied by 1/scale, which is exact (a power of 2);
    the engine's own unscaling shows in the weights after the step."""
    from deepspeed.utils import safe_get_full_fp32_param
    from torch.distributed.tensor import DTensor

    from regscale import dist
    from regscale.config import batch_plan, load_config
    from regscale.engine import build_engine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = dist.setup()
    try:
        cfg = load_config(SMOKE, [*FP16, f"train.batch_size={BATCH * world}", *overrides])
        engine = build_engine(cfg.engine, cfg.train, _model(), env, batch_plan(cfg.train, world))
        named = [(n, p) for n, p in _model_of(engine).named_parameters() if p.requires_grad]
        steps = []
        for step in range(STEPS):
            with engine.autocast():
                output = engine.module(*_batch(step))
            loss = _loss(output) * (OVERFLOW_FACTOR if step == OVERFLOW_AT else 1.0)
            engine.backward(loss, last_micro=True, accumulation=1)
            if step == inf_at and rank == 1:  # FSDP: one element of rank 1's local shard only
                dict(named)[INF_PARAM].grad.to_local()[0, 0] = math.inf
            scale = engine.scaler.get_scale()
            grads = {f"grad.{n}": _full_grad(p).float() * (1.0 / scale) for n, p in named}
            result = engine.step(LR)
            assert result.loss_scale == scale
            weights = {f"weight.{n}": (safe_get_full_fp32_param(p) if engine.kind == "deepspeed" else
                                       p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
                       for n, p in named}
            steps.append({"output": output[0].detach().float(), "loss": loss.detach(), "scale": scale,
                          "applied": result.applied, "grad_norm": result.grad_norm, **grads, **weights})
        if rank == 0:
            torch.save(steps, out)
    finally:
        dist.teardown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine,world", [("fsdp", 1), ("fsdp", 2), ("zero2", 2), ("zero3", 2)])
def test_fp16_is_the_official_mixed_precision_and_loss_scale_bit_for_bit(engine: str, world: int, tmp_path: Path,
                                                                         one_thread) -> None:
    inf_at = ONE_RANK_INF_AT if (engine, world) == ("fsdp", 2) else None
    official = _official_fp16(inf_at)
    ours = _run(tmp_path, world, ENGINES[engine], inf_at, worker=_fp16_worker)
    assert [s["scale"] for s in ours] == [s["scale"] for s in official] == [65536.0, 65536.0, 32768.0, 32768.0]
    applied = [s["applied"] for s in official]
    assert [s["applied"] for s in ours] == applied == [True, False, True, inf_at is None]
    for step, (mine, theirs) in enumerate(zip(ours, official)):
        assert mine.keys() == theirs.keys()
        different = [k for k in theirs if k.startswith(("output", "loss", "grad.", "weight."))
                     and not _bitwise(mine[k], theirs[k])]
        assert not different, f"step {step}: differ from the official fp16 numerics: {different}"
        if theirs["applied"]:  # clipping sees the unscaled gradients (their norm: engines reduce in their order)
            assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
    assert _relative(ours[0]["output"], _official(_model(), amp=False)["output"]) > 1e-5  # fp16 did run


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaNs (an overflowed step's gradients) in the same places."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(0.0, math.inf, -math.inf), b.nan_to_num(0.0, math.inf, -math.inf))


def _legacy_worker(rank: int, world: int, port: int, precision: str, out: str) -> None:
    """Train one step with regscale's DeepSpeed bf16 or fp16 engine as it was (DeepSpeed's own
    bf16 or fp16 mode: half weights, its own loss scale), save it, load it into today's engine;
    rank 0 saves both engines' full fp32 weights, Adam moments and EMA."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    import regscale.engine.deepspeed as zero
    from regscale import dist
    from regscale.config import batch_plan, load_config
    from regscale.engine import build_engine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env = dist.setup()

    def state(engine) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in _model_of(engine).named_parameters():
            out[f"{name}.fp32"] = safe_get_full_fp32_param(p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).clone()
        return out

    try:
        cfg = load_config(SMOKE, [f"train.precision={precision}", f"train.batch_size={BATCH * world}",
                                  *ENGINES["zero2"]])
        plan = batch_plan(cfg.train, world)
        today = zero.ds_config
        mode = {"enabled": True, "initial_scale_power": 16} if precision == "fp16" else {"enabled": True}
        zero.ds_config = lambda *args: {**today(*args), precision: mode}  # the engine as it was
        try:
            old = build_engine(cfg.engine, cfg.train, _model(), env, plan)
        finally:
            zero.ds_config = today
        old.scaler = None  # DeepSpeed's fp16 mode scaled the loss itself
        with old.autocast():
            output = old.module(*_batch())
        old.backward(_loss(output), last_micro=True, accumulation=1)
        assert old.step(1e-3).applied
        old.update_ema(0.5)
        path = Path(out) / "step_00000001"
        old.save(path, blocking=True).written.result()
        half = next(p for p in _model_of(old).parameters()).dtype
        assert half == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision], "not DeepSpeed's half mode"
        new = build_engine(cfg.engine, cfg.train, _model(), env, plan)
        new.load(path, {"world_size": world, "engine": {"kind": "deepspeed", "precision": precision}})  # an old one
        states = {"old": state(old), "new": state(new), "old_ema": dict(old.ema), "new_ema": dict(new.ema)}
        if rank == 0:
            torch.save(states, Path(out) / "states.pt")
    finally:
        dist.teardown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_checkpoint_of_deepspeeds_half_mode_resumes_with_nothing_lost(precision: str, tmp_path: Path,
                                                                        one_thread) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_legacy_worker, args=(2, port, precision, str(tmp_path)), nprocs=2, start_method="fork")
    states = torch.load(tmp_path / "states.pt")
    old, new = states["old"], states["new"]
    assert old.keys() == new.keys() and len(old) == 3 * len(list(_model().parameters()))
    assert [k for k in old if not torch.equal(old[k], new[k])] == []
    assert [k for k in states["old_ema"] if not torch.equal(states["old_ema"][k], states["new_ema"][k])] == []
