"""Checkpoint publication, verification (parallel shares, format 1 still read), fallback,
set-aside and retention; the distributed layout, batch plan, stop flag and deadline; per-sample
draws and thread pinning. In-process and fast (no training)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from regscale.checkpoints import CheckpointStore, file_entry, find_valid, published, shares, verify
from regscale.config import ConfigError, batch_plan, load_config
from regscale.dist import DistEnv, Layout, read_layout
from regscale.errors import UserError
from regscale.fsutil import write_atomic
from regscale.rundir import step_name
from regscale.train.checkpoint import Checkpointer
from regscale.train.noise import SampleNoise
from regscale.train.preempt import Deadline, StopFlag, job_deadline


def _save(store: CheckpointStore, step: int, payload: bytes = b"weights", reported: bool = True) -> Path:
    """Publish a checkpoint of one file; `reported`: its writer hashed it (else publication does)."""
    tmp = store.tmp_dir(step)
    (tmp / "shard").mkdir(parents=True)
    (tmp / "shard" / "rank0.bin").write_bytes(payload + bytes([step % 256]))
    files = {"shard/rank0.bin": file_entry(tmp / "shard" / "rank0.bin")} if reported else {}
    return store.publish(tmp, {"step": step, "images": step * 8}, files)


def test_publish_writes_manifest_and_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=0)
    for reported in (True, False):
        final = _save(store, 5 + reported, reported=reported)
        assert final.name == step_name(5 + reported) and not store.tmp_dir(5 + reported).exists()
        assert (tmp_path / "latest").read_text().strip() == final.name
        manifest = json.loads((final / "manifest.json").read_text())
        assert manifest["files"]["shard/rank0.bin"]["size"] == 8 and manifest["total_bytes"] == 8
        assert manifest["format"] == 2 and len(manifest["files"]["shard/rank0.bin"]["xxh3_128"]) == 32
        assert verify(final) is None


def test_format_1_manifests_still_verify(tmp_path: Path) -> None:
    final = _save(CheckpointStore(tmp_path, keep_last=2, keep_every=0), 3)
    manifest = json.loads((final / "manifest.json").read_text())
    data = (final / "shard" / "rank0.bin").read_bytes()
    manifest.update(format=1, files={"shard/rank0.bin": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
    (final / "manifest.json").write_text(json.dumps(manifest))
    assert verify(final) is None
    (final / "shard" / "rank0.bin").write_bytes(data[:-1] + b"X")
    assert verify(final) == "shard/rank0.bin does not match its sha256"


def test_shares_split_the_bytes_evenly_and_the_same_everywhere() -> None:
    files = {f"f{i}": {"size": size} for i, size in enumerate([90, 50, 40, 30, 20, 10, 10])}
    split = shares(files, 3)
    assert sorted(sum(split, [])) == sorted(files) and split == shares(dict(reversed(files.items())), 3)
    loads = [sum(files[f]["size"] for f in part) for part in split]
    assert max(loads) - min(loads) <= 10, loads


def _checkpointer(run_dir: Path) -> Checkpointer:
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"))
    return Checkpointer(run_dir, engine=None, env=env, keep_last=5, keep_every=0)  # type: ignore[arg-type]


def test_broken_newest_is_set_aside_and_all_broken_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _checkpointer(tmp_path)
    store = ckpt.store
    _save(store, 2)
    _save(store, 4)
    newest = _save(store, 6)
    (newest / "shard" / "rank0.bin").write_bytes(b"weightsX")  # same size, other bytes
    store.tmp_dir(8).mkdir()  # an unfinished write: never a candidate
    with caplog.at_level(logging.WARNING):
        path, manifest = ckpt.newest_valid(at_start=True)
    assert path.name == step_name(4) and manifest["step"] == 4
    assert f"checkpoint {newest} is broken (shard/rank0.bin does not match its xxh3_128)" in caplog.text
    assert not newest.exists() and list(store.root.glob("step_00000006.broken-*"))
    (store.root / step_name(4) / "manifest.json").unlink()
    assert find_valid(store.root)[0].name == step_name(2)  # a reader skips it and leaves it
    assert "no manifest.json" in caplog.text and (store.root / step_name(4)).is_dir()
    ckpt.prepare()
    assert not store.tmp_dir(8).exists()
    (store.root / step_name(2) / "shard" / "rank0.bin").unlink()
    for _ in range(2):  # every checkpoint broken: refused, and again on the next start
        with pytest.raises(UserError, match=r"no checkpoint is readable \(step_00000002.broken-\d+, "
                                             r"step_00000004.broken-\d+, step_00000006.broken-\d+ failed"):
            ckpt.newest_valid(at_start=True)
    assert ckpt.newest_valid(at_start=False) is None


def test_retention_keeps_last_every_nth_protected_and_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=4, protect=(3,))
    for step in range(1, 10):
        _save(store, step)
    assert [p.name for p in published(tmp_path)] == [step_name(s) for s in (9, 8, 4, 3)]
    store = CheckpointStore(tmp_path, keep_last=1, keep_every=0)
    newest = _save(store, 10)
    assert [p.name for p in published(tmp_path)] == [newest.name]


def test_write_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_batch_plan_keeps_the_global_batch(recipes: Path) -> None:
    cfg = load_config(recipes / "smoke.yaml", ["train.batch_size=16", "train.micro_batch_size=2"])
    plan = batch_plan(cfg.train, 4)
    assert (plan.per_rank, plan.micro, plan.accumulation) == (4, 2, 2)
    assert batch_plan(cfg.train, 2).accumulation == 4
    with pytest.raises(ConfigError, match=r"divisible by the world size \(3 processes\)"):
        batch_plan(cfg.train, 3)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        batch_plan(cfg.train, 16)


def test_read_layout_prefers_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(key, raising=False)
    assert read_layout() == Layout(0, 0, 1, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    assert read_layout() == Layout(5, 1, 8, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert read_layout() == Layout(2, 0, 4, 4)


def test_signal_only_sets_a_flag() -> None:
    flag = StopFlag().install()
    try:
        assert not flag.raised
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.raised and flag.signum == signal.SIGUSR2
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR2) is not flag._handler


def test_deadline_leaves_room_for_a_step_and_a_save(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGSCALE_DEADLINE", "1000")
    assert job_deadline() == 1000.0
    deadline = Deadline(job_deadline(), margin_s=10)
    deadline.observe(step_s=5, save_s=20)
    assert not deadline.reached(now=1000 - 5 - 30 - 10 - 1)
    assert deadline.reached(now=1000 - 5 - 30 - 10 + 1)
    assert not Deadline(None).reached()


def _rows(noise: SampleNoise, step: int, indices: list[int]) -> dict[int, list[torch.Tensor]]:
    """{dataset index: [posterior noise, drop, t, image noise, class-token noise]} of one call."""
    eps, draws = noise(step, torch.tensor(indices), (4, 2, 2))
    return {index: [eps[i], *(d[i] for d in draws)] for i, index in enumerate(indices)}


def test_sample_draws_depend_on_seed_step_and_index_only(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """However a global batch is cut into ranks and micro-batches, a sample gets the same draws."""
    monkeypatch.setenv("REGSCALE_TRACE_DRAWS", "1")
    trace = tmp_path / "draws" / "rank00000.jsonl"
    noise = SampleNoise(0, 8, "uniform", torch.device("cpu"), trace=trace)
    whole = _rows(noise, 7, [5, 9, 2, 11])
    parts = {**_rows(noise, 7, [11, 2]), **_rows(noise, 7, [9]), **_rows(noise, 7, [5])}
    assert all(torch.equal(a, b) for i in whole for a, b in zip(whole[i], parts[i]))
    others = [_rows(SampleNoise(1, 8, "uniform", torch.device("cpu")), 7, [5])[5],
              _rows(noise, 8, [5])[5], _rows(noise, 7, [6])[6]]
    assert all(not torch.equal(whole[5][-1], o[-1]) for o in others)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in lines[:2]] == [(7, [5, 9, 2, 11]), (7, [11, 2])]
    assert lines[0]["draws"][3] == lines[1]["draws"][0] != lines[0]["draws"][0]


def test_threads_come_from_the_recipe_not_the_launcher() -> None:
    from regscale.train.threads import pin_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what srun leaves a process on this 2-core machine
        slurm = load_config(None, ["run.name=x", "slurm.cpus_per_task=1"]).slurm
        assert pin_threads(slurm) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
