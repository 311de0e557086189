"""bf16 training computes what the official code computes: fp32 parameters under torch.autocast(bf16)
(accelerate's mixed precision), where the residual stream, the timestep and the norms stay fp32.

Both engines, on 1 and 2 gloo processes, give the official forward and gradients bit for bit:
FSDP's blocks gather bf16 copies of Linear weights (which autocast would make itself), DeepSpeed
keeps fp32 weights. The engines run in forked processes (the real engine code, the real
collectives), each on the same batch, so the reduced gradient equals one rank's. The old way
(FSDP casting the inputs and every weight to bf16) was 2.6x further from fp32 than the official."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

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


def _batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
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


def _run(tmp_path: Path, world: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"engine-{world}.pt"
    # fork: the children inherit the imports; the parent runs torch with one thread (one_thread)
    mp.start_processes(_worker, args=(world, port, overrides, str(out)), nprocs=world, start_method="fork")
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


def _legacy_worker(rank: int, world: int, port: int, out: str) -> None:
    """Train one step with regscale's DeepSpeed bf16 engine as it was (DeepSpeed's own bf16 mode),
    save it, load it into today's engine; rank 0 saves both engines' full fp32 weights, Adam
    moments and EMA."""
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
        cfg = load_config(SMOKE, ["train.precision=bf16", f"train.batch_size={BATCH * world}", *ENGINES["zero2"]])
        plan = batch_plan(cfg.train, world)
        today = zero.ds_config
        zero.ds_config = lambda *args: {**today(*args), "bf16": {"enabled": True}}  # the engine as it was
        try:
            old = build_engine(cfg.engine, cfg.train, _model(), env, plan)
        finally:
            zero.ds_config = today
        with old.autocast():
            output = old.module(*_batch())
        old.backward(_loss(output), last_micro=True, accumulation=1)
        assert old.step(1e-3).applied
        old.update_ema(0.5)
        path = Path(out) / "step_00000001"
        old.save(path, blocking=True).written.result()
        assert list(path.glob(f"{zero.BF16_MODE_PREFIX}*")), "not a checkpoint of DeepSpeed's bf16 mode"
        new = build_engine(cfg.engine, cfg.train, _model(), env, plan)
        new.load(path, {"world_size": world})
        states = {"old": state(old), "new": state(new), "old_ema": dict(old.ema), "new_ema": dict(new.ema)}
        if rank == 0:
            torch.save(states, Path(out) / "states.pt")
    finally:
        dist.teardown()


@pytest.mark.timeout(300)
def test_a_checkpoint_of_deepspeeds_bf16_mode_resumes_with_nothing_lost(tmp_path: Path, one_thread) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_legacy_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    states = torch.load(tmp_path / "states.pt")
    old, new = states["old"], states["new"]
    assert old.keys() == new.keys() and len(old) == 3 * len(list(_model().parameters()))
    assert [k for k in old if not torch.equal(old[k], new[k])] == []
    assert [k for k in states["old_ema"] if not torch.equal(states["old_ema"][k], states["new_ema"][k])] == []
