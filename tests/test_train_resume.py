"""Crash-proof training on 2 gloo processes, per engine: an uninterrupted run, and the same run
killed with SIGKILL at a random step (and, for FSDP, in the middle of a checkpoint write), its
newest checkpoint corrupted, stopped by SIGUSR2 (or its deadline), and resumed each time, ending
with bit-identical weights. A NaN loss injected at step 3 is skipped and counted in both.

Elastic (FSDP, ZeRO-2): the run killed on 2 processes, resumed on 1, preempted and resumed on 2
draws the same samples with the same noise at every step as the uninterrupted run; its losses,
weights and Adam moments stay within ELASTIC_RTOL of it (only the reduction order differs).

fp16 (FSDP, ZeRO-2): a forced overflow is skipped, counted and recovered from, and a run resumed
after it is bit-identical, loss scale included; on another number of processes it keeps the scale."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from regscale.engine.export import load_consolidated
from regscale.rundir import CHECKPOINTS, CONFIG, METRICS
from tests.fixtures.train import (ELASTIC_RTOL, Launch, adam_state, assert_same_weights, launch_train,
                                  losses, max_relative_difference, ok, traced_draws)

ENGINES = {
    "fsdp": ["engine.kind=fsdp"],
    "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
}
BASE = ["train.max_steps=8", "train.ckpt_every=2", "train.keep_last=2"]
NAN = {"REGSCALE_FAULT_NAN": "3"}


@pytest.fixture(scope="module")
def reference(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """engine -> its uninterrupted 2-process run (draws traced), made once per module."""
    made: dict[str, Launch] = {}

    def get(engine: str) -> Launch:
        if engine not in made:
            run = tmp_path_factory.mktemp(f"reference-{engine}") / "ref"
            made[engine] = launch_train(run, smoke_data, BASE + ENGINES[engine],
                                        env={**NAN, "REGSCALE_TRACE_DRAWS": "1"})
            assert made[engine].returncode == 0, ok(made[engine])
        return made[engine]

    return get


def _newest(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS / (run_dir / CHECKPOINTS / "latest").read_text().strip()


def _manifest(run_dir: Path) -> dict:
    return json.loads((_newest(run_dir) / "manifest.json").read_text())


def _corrupt_newest(run_dir: Path) -> Path:
    """Flip one byte in the newest checkpoint's largest file; returns that checkpoint."""
    newest = _newest(run_dir)
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return newest


@pytest.mark.parametrize("engine", list(ENGINES))
def test_interrupted_run_is_bit_identical(engine: str, reference, smoke_data: Path, tmp_path: Path) -> None:
    overrides = BASE + ENGINES[engine]
    ref = reference(engine)
    manifest = _manifest(ref.run_dir)
    assert manifest["step"] == 8 and manifest["images"] == 64 and manifest["world_size"] == 2
    assert manifest["health"]["nonfinite_total"] == 1, "the NaN step is counted"
    assert "step 4: non-finite gradient norm, step skipped" in ref.stderr
    assert sorted(p.name for p in (ref.run_dir / CHECKPOINTS).glob("step_*")) == [
        "step_00000006", "step_00000008"], "retention keeps the last 2"

    seed = int(os.environ.get("REGSCALE_TEST_SEED", random.randrange(1 << 30)))
    kill_step = random.Random(seed).randint(3, 6)
    print(f"{engine}: SIGKILL at step {kill_step} (REGSCALE_TEST_SEED={seed})")
    run = tmp_path / "run"  # killed once two checkpoints are published, so the newest may break
    first = launch_train(run, smoke_data, overrides, env=NAN, kill_at=kill_step, published=4)
    assert first.returncode != 0 and first.killed_at is not None, ok(first)

    if engine == "fsdp":  # die in the middle of writing the step-6 checkpoint: never published
        mid = launch_train(run, smoke_data, overrides, env={**NAN, "REGSCALE_FAULT_KILL_IN_SAVE": "6"})
        assert mid.returncode != 0, ok(mid)
        assert (run / CHECKPOINTS / ".tmp_step_00000006").is_dir()
        assert not (run / CHECKPOINTS / "step_00000006").exists()

    broken = _corrupt_newest(run)
    if engine == "zero3":  # the time limit instead of a signal
        stop = launch_train(run, smoke_data, overrides, env={**NAN, "REGSCALE_DEADLINE": "1"})
        status = "deadline"
    else:
        resumed = int(re.search(r"step_(\d+)", _newest(run).name).group(1))
        stop = launch_train(run, smoke_data, overrides, env=NAN, usr2_at=resumed + 1)
        status = "preempted"
    # each rank exits with the requeue code; torchrun reports any non-zero exit as a failure
    assert stop.stdout.count(f"regscale train: {status}") == 2, ok(stop)
    assert f"checkpoint {broken} is broken" in stop.stderr, "the corrupted checkpoint is named"
    stops = re.findall(rf"\[rank (\d)\] INFO regscale.train: {status} at step (\d+)", stop.stderr)
    assert sorted(r for r, _ in stops) == ["0", "1"], ok(stop)
    assert len({s for _, s in stops}) == 1, f"ranks stopped at different steps: {stops}"
    assert _manifest(run)["step"] == int(stops[0][1]), "a checkpoint of the stop step exists"
    assert not (run / CHECKPOINTS / ".tmp_step_00000006").exists(), "unfinished write cleaned"

    last = launch_train(run, smoke_data, overrides, env=NAN)
    assert last.returncode == 0, ok(last)
    assert "bit-exact" in last.stderr
    final = assert_same_weights(ref.run_dir, run)
    assert final["health"]["nonfinite_total"] == 1
    if engine == "fsdp":
        _export(run, tmp_path)


def _export(run: Path, tmp_path: Path) -> None:
    """`regscale export` writes the consolidated weights."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from regscale.cli import main

    out = tmp_path / "ema.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported = load_file(str(out))
    with safe_open(str(out), "pt") as f:  # the export carries its config: sampling needs no recipe
        assert f.metadata()["config"] == (run / CONFIG).read_text()
    state, manifest = load_consolidated(run)
    assert manifest["step"] == 8 and exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    assert main(["export", str(run), "--step", "7", "--out", str(out)]) == 2  # no such checkpoint


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_resume_on_another_world_size_keeps_samples_noise_and_adam(engine: str, reference, smoke_data: Path,
                                                                   tmp_path: Path) -> None:
    ref = reference(engine).run_dir
    run = tmp_path / "run"
    env = {**NAN, "REGSCALE_TRACE_DRAWS": "1"}
    overrides = BASE + ENGINES[engine]
    killed = launch_train(run, smoke_data, overrides, env=env, kill_at=4)  # after step 2's checkpoint
    assert killed.returncode != 0 and killed.killed_at is not None, ok(killed)
    one = launch_train(run, smoke_data, overrides, env=env, nproc=1, usr2_at=5)
    assert one.returncode != 0 and "regscale train: preempted" in one.stdout, ok(one)
    last = launch_train(run, smoke_data, overrides, env=env)
    assert last.returncode == 0, ok(last)
    assert _manifest(run)["step"] == 8 and _manifest(run)["health"]["nonfinite_total"] == 1
    for launch, change in ((one, "2 to 1"), (last, "1 to 2")):
        assert f"resharded from {change} processes: same samples and noise; reduction order differs" in launch.stderr

    draws, ref_draws = traced_draws(run), traced_draws(ref)
    assert {step for step, _ in draws} == set(range(8)) and draws.keys() == ref_draws.keys()
    assert draws == ref_draws, "a step drew other samples or other noise than the uninterrupted run"
    ref_losses, run_losses = losses(ref), losses(run)  # the loop logs no loss for the step it stops at
    assert run_losses.keys() <= ref_losses.keys() and len(run_losses) >= 7
    loss_diff = max(abs(run_losses[s] - ref_losses[s]) / abs(ref_losses[s])
                    for s in run_losses if ref_losses[s] == ref_losses[s])  # NaN step excluded
    weights = {w: max_relative_difference(load_consolidated(ref, weights=w)[0],
                                          load_consolidated(run, weights=w)[0]) for w in ("model", "ema")}
    ref_adam, run_adam = adam_state(ref), adam_state(run)
    steps = {k: float(v) for k, v in run_adam.items() if k.endswith(".step")}
    assert steps == {k: float(v) for k, v in ref_adam.items() if k.endswith(".step")} and set(steps.values()) == {7.0}
    adam = max_relative_difference(ref_adam, run_adam)
    print(f"{engine}: relative difference to the uninterrupted run: losses {loss_diff:.2e}, "
          f"weights {weights['model']:.2e}, EMA {weights['ema']:.2e}, Adam moments {adam:.2e}")
    assert max(loss_diff, *weights.values(), adam) <= ELASTIC_RTOL


FP16 = ["train.precision=fp16", "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=2"]
OVERFLOW = {"REGSCALE_FAULT_OVERFLOW": "2"}  # the third step's gradients overflow fp16


def _from_step_4(run: Path, where: Path) -> Path:
    """A copy of a finished 6-step run as a kill after step 5 leaves it: checkpoints 2 and 4."""
    copy = shutil.copytree(run, where / run.name)
    shutil.rmtree(copy / CHECKPOINTS / "step_00000006")
    (copy / CHECKPOINTS / "latest").write_text("step_00000004\n")
    return copy


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_fp16_overflow_is_skipped_and_a_resumed_run_is_bit_identical(engine: str, smoke_data: Path,
                                                                      tmp_path: Path) -> None:
    """The kill itself is the fp32 tests' (above); here what a checkpoint must carry in fp16."""
    overrides = FP16 + ENGINES[engine]
    ref = launch_train(tmp_path / "ref" / "run", smoke_data, overrides, env=OVERFLOW)
    assert ref.returncode == 0, ok(ref)
    assert "step 3: gradients overflowed at loss scale 65536: step skipped, scale halved" in ref.stderr
    rows = {r["step"]: r for r in map(json.loads, (ref.run_dir / METRICS).read_text().splitlines())
            if "loss" in r}
    assert [rows[s]["loss_scale"] for s in range(1, 7)] == [65536, 65536, 65536, 32768, 32768, 32768]
    assert rows[6]["nonfinite_total"] == 1 and all(rows[s]["loss"] == rows[s]["loss"] for s in (4, 5, 6))
    final = _manifest(ref.run_dir)
    assert final["health"]["nonfinite_total"] == 1
    assert final["loss_scaler"] == {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 3}

    resumed = launch_train(_from_step_4(ref.run_dir, tmp_path / "resumed"), smoke_data, overrides, env=OVERFLOW)
    assert resumed.returncode == 0 and "(step 4, 32 images; bit-exact)" in resumed.stderr, ok(resumed)
    manifest = assert_same_weights(ref.run_dir, resumed.run_dir)
    assert manifest["loss_scaler"] == final["loss_scaler"] and manifest["health"] == final["health"]
    if engine == "fsdp":  # on one process: the scale goes on
        one = launch_train(_from_step_4(ref.run_dir, tmp_path / "elastic"), smoke_data, overrides, nproc=1)
        assert one.returncode == 0 and "resharded from 2 to 1 processes" in one.stderr, ok(one)
        assert _manifest(one.run_dir)["loss_scaler"] == final["loss_scaler"]
