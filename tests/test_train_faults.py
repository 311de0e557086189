"""Faults a training process meets, each ending in one clear line with the right exit code and no
traceback, nothing lost: a full disk while an async checkpoint is written, a changed experiment
key on resume without tracking, Ctrl-C, a directory of only unreadable checkpoints, and a stray
WORLD_SIZE/RANK without peers. Real `regscale train` processes (one process, gloo, FSDP)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from regscale.checkpoints import verify
from regscale.dist import RENDEZVOUS_S
from regscale.rundir import CHECKPOINTS, METRICS, step_name
from tests.fixtures.train import launch_train, ok

BASE = ["train.max_steps=8", "train.ckpt_every=2", "train.keep_last=2", "engine.async_checkpoint=true",
        "slurm.gpus_per_node=1"]


def _clean_failure(launch, code: int) -> None:
    assert launch.returncode == code, ok(launch)
    assert "Traceback" not in launch.stderr, ok(launch)


def _latest(run: Path) -> str:
    return (run / CHECKPOINTS / "latest").read_text().strip()


def test_training_faults_end_in_one_line(smoke_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    full = launch_train(run, smoke_data, BASE, nproc=0, env={"REGSCALE_FAULT_NO_SPACE": "4"})
    _clean_failure(full, 2)
    assert (f"regscale train: error: no space left on {run / CHECKPOINTS} while writing the checkpoint "
            f"of step 4: it is not saved; the newest saved one ({step_name(2)}) is kept") in full.stderr, ok(full)
    assert _latest(run) == step_name(2) and verify(run / CHECKPOINTS / step_name(2)) is None
    assert not list((run / CHECKPOINTS).glob(".tmp_*")), "the partial write is removed"

    changed = launch_train(run, smoke_data, BASE + ["train.lr=2e-4"], nproc=0)
    _clean_failure(changed, 2)
    assert "'train.lr' was '0.0001', now '0.0002'" in changed.stderr and "new run" in changed.stderr, ok(changed)

    stopped = launch_train(run, smoke_data, BASE, nproc=0, sigint_at=4)
    _clean_failure(stopped, 130)
    saved = int(re.search(r"interrupted at step (\d+): checkpoint step \1 saved", stopped.stderr).group(1))
    assert "regscale train: interrupted" in stopped.stdout and saved >= 4, ok(stopped)
    assert _latest(run) == step_name(saved) and verify(run / CHECKPOINTS / step_name(saved)) is None
    assert "bit-exact" in stopped.stderr and "NOT bit-exact" not in stopped.stderr  # resumed from step 2

    for path in (run / CHECKPOINTS).glob("step_*/*.distcp"):  # every checkpoint unreadable
        path.write_bytes(b"\0" * path.stat().st_size)
    lines = len((run / METRICS).read_text().splitlines())
    broken = launch_train(run, smoke_data, BASE, nproc=0)
    _clean_failure(broken, 2)
    assert "no checkpoint is readable" in broken.stderr and "training would restart from step 0" in broken.stderr
    assert re.search(r"step_\d{8}\.broken-\d+", broken.stderr), ok(broken)
    assert len((run / METRICS).read_text().splitlines()) == lines, "nothing was trained"
    assert len(list((run / CHECKPOINTS).glob("step_*.broken-*"))) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stray_world_size_fails_within_the_rendezvous_bound(smoke_data: Path, tmp_path: Path) -> None:
    assert RENDEZVOUS_S <= 60
    stray = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
             "REGSCALE_RENDEZVOUS_S": "5"}
    alone = launch_train(tmp_path / "alone", smoke_data, BASE, nproc=0, env=stray)
    _clean_failure(alone, 2)
    # the rendezvous bound fired (5 s here), not the 30-minute collective timeout
    assert "no rendezvous of 2 processes at MASTER_ADDR:MASTER_PORT=127.0.0.1:" in alone.stderr, ok(alone)
    assert "within 5 s (this is RANK=0 of WORLD_SIZE=2" in alone.stderr and "unset RANK/WORLD_SIZE" in alone.stderr
    unset = launch_train(tmp_path / "half", smoke_data, BASE, nproc=0,
                         env={**stray, "MASTER_ADDR": "", "MASTER_PORT": ""})
    _clean_failure(unset, 2)
    assert "RANK=0 WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT not" in unset.stderr, ok(unset)
