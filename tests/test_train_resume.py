"""Crash-proof training on 2 gloo processes, per engine: an uninterrupted run, and the same run
killed with SIGKILL at a random step (and, for FSDP, in the middle of a checkpoint write), its
newest checkpoint corrupted, stopped by SIGUSR2 (or its deadline), and resumed each time, ending
with bit-identical weights. A NaN loss injected at step 3 is skipped and counted in both."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from tests.fixtures.train import assert_same_weights, launch_train, ok

ENGINES = {
    "fsdp": ["engine.kind=fsdp"],
    "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"],
}
BASE = ["train.max_steps=8", "train.ckpt_every=2", "train.keep_last=2"]
NAN = {"REGSCALE_FAULT_NAN": "3"}


def _newest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


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
def test_interrupted_run_is_bit_identical(engine: str, smoke_data: Path, tmp_path: Path) -> None:
    overrides = BASE + ENGINES[engine]
    ref = launch_train(tmp_path / "ref", smoke_data, overrides, env=NAN)
    assert ref.returncode == 0, ok(ref)
    manifest = _manifest(ref.run_dir)
    assert manifest["step"] == 8 and manifest["images"] == 64 and manifest["world_size"] == 2
    assert manifest["health"]["nonfinite_total"] == 1, "the NaN step is counted"
    assert "step 4: non-finite gradient norm, step skipped" in ref.stderr
    assert sorted(p.name for p in (ref.run_dir / "checkpoints").glob("step_*")) == [
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
        assert (run / "checkpoints" / ".tmp_step_00000006").is_dir()
        assert not (run / "checkpoints" / "step_00000006").exists()

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
    assert not (run / "checkpoints" / ".tmp_step_00000006").exists(), "unfinished write cleaned"

    last = launch_train(run, smoke_data, overrides, env=NAN)
    assert last.returncode == 0, ok(last)
    assert "bit-exact" in last.stderr
    final = assert_same_weights(ref.run_dir, run)
    assert final["health"]["nonfinite_total"] == 1
    if engine == "fsdp":
        _export_and_reshard(run, smoke_data, tmp_path)


def _export_and_reshard(run: Path, data: Path, tmp_path: Path) -> None:
    """`regscale export` writes the consolidated weights; the 2-process FSDP checkpoint resumes on
    1 process (a reshard, reported as not bit-exact)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from regscale.cli import main
    from regscale.engine.export import load_consolidated

    out = tmp_path / "ema.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported = load_file(str(out))
    with safe_open(str(out), "pt") as f:  # the export carries its config: sampling needs no recipe
        assert f.metadata()["config"] == (run / "config.yaml").read_text()
    state, manifest = load_consolidated(run)
    assert manifest["step"] == 8 and exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    assert main(["export", str(run), "--step", "7", "--out", str(out)]) == 2  # no such checkpoint

    one = launch_train(run, data, BASE + ["train.max_steps=9"], nproc=1)
    assert one.returncode == 0, ok(one)
    assert "resharded from 2 to 1 processes: NOT bit-exact" in one.stderr
    assert _manifest(run)["step"] == 9 and _manifest(run)["world_size"] == 1
