"""The node agent (regscale.launch.agent) on this machine, through `regscale submit --local`: a
training process that dies (rank 0 here) or hangs (a stopped rank) restarts the group inside the
job from the newest checkpoint, with no human, and the run ends with the weights of the same
recipe run uninterrupted by torchrun. Every attempt's end is recorded with the rank, host and
signal or error that ended it, `regscale status` shows it and `regscale logs` prints that rank's
log; a hang leaves every rank's stack in the run directory.

The same faults on the SLURM dev cluster (also a whole node lost) are in tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regscale.launch import runs
from regscale.rundir import ATTEMPTS
from regscale.train.heartbeat import Heartbeat, read_beat
from tests.fixtures.train import (HANG_GUARD_S, SMOKE, assert_same_weights, launch_train, logged_step, ok,
                                  rank_process)

STEPS = ["train.max_steps=16", "train.ckpt_every=4", "train.log_every=1"]
EVAL = ["eval.num_samples=8", "eval.batch_size=8", "eval.steps=2"]


def _wait(predicate, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) while waiting for {what}")
        if time.monotonic() > end:
            pytest.fail(f"still waiting after {HANG_GUARD_S:.0f} s: {what}")
        time.sleep(0.1)


def test_a_killed_rank_0_and_a_stopped_rank_1_restart_in_job_and_finish_the_uninterrupted_run(
        smoke_data: Path, tmp_path: Path) -> None:
    reference = launch_train(tmp_path / "runs" / "torchrun", smoke_data, STEPS)
    assert reference.returncode == 0, ok(reference)
    run_dir = tmp_path / "runs" / "faults"
    env = {**os.environ, "REGSCALE_FAULT_SLOW_STEP_S": "0.3", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "regscale.cli", "submit", str(SMOKE), "--local", f"run.dir={run_dir.parent}",
           "run.name=faults", f"data.path={smoke_data}", "train.hang_timeout_s=5", *STEPS, *EVAL]
    with open(tmp_path / "submit.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: logged_step(run_dir) >= 6 and runs.latest_step(run_dir) >= 4, "step 6", proc)
        os.kill(rank_process(run_dir, 0), signal.SIGKILL)
        _wait(lambda: len(runs.read_attempts(run_dir)) >= 2 and logged_step(run_dir) >= 10
              and runs.latest_step(run_dir) >= 8, "the restarted group at step 10", proc)
        stopped = rank_process(run_dir, 1)
        os.kill(stopped, signal.SIGSTOP)
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "submit.log").read_text()
    assert proc.returncode == 0, output[-4000:]

    attempts = runs.read_attempts(run_dir)
    assert [a.end for a in attempts] == ["failed", "hung", "completed"], attempts
    killed, hung, done = attempts
    assert (killed.cause.rank, killed.cause.signal, killed.cause.error) == (0, "SIGKILL", "killed by SIGKILL")
    assert all(e.secondary for e in killed.ends if e.rank != 0)  # rank 1 only went down with its group
    assert hung.cause.rank == 1 and hung.cause.error.startswith("stopped (SIGSTOP), no heartbeat for")
    assert [a.round for a in attempts] == [0, 1, 2] and len({a.job_id for a in attempts}) == 1
    assert hung.start_step >= 4 and done.start_step >= 8  # each restart resumed from a checkpoint
    assert_same_weights(reference.run_dir, run_dir)

    stacks = (run_dir / "stacks" / "rank00001.txt").read_text()
    assert "the group hung; process state T" in stacks and "File " in stacks  # continued, then dumped
    assert "the group hung" in (run_dir / "stacks" / "rank00000.txt").read_text()

    status = subprocess.run([sys.executable, "-m", "regscale.cli", "status", str(run_dir)], capture_output=True,
                            text=True, check=True).stdout
    assert "rank 0 on" in status and "killed by SIGKILL" in status and "stopped (SIGSTOP)" in status
    shown = subprocess.run([sys.executable, "-m", "regscale.cli", "logs", str(run_dir), "--attempt", "2"],
                           capture_output=True, text=True, check=True)
    assert f"attempt 2 (job {hung.job_id} round 1), rank 1" in shown.stderr
    assert shown.stdout == (run_dir / hung.cause.log).read_text()


def test_heartbeat_bound_is_ten_times_the_p99_step_with_a_floor(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path, 0, floor_s=60.0, first_step_s=900.0)
    beat.starting()
    first = read_beat(tmp_path / "rank0.json")
    assert first.phase == "start" and first.bound_s == 900.0
    beat.intervals.extend([1.0] * 99 + [30.0])  # one slow step in a hundred: not the p99
    assert beat.bound_s() == 60.0
    beat.intervals.extend([8.0] * 10)
    assert beat.bound_s() == 80.0
    beat.ended("preempted", 12)
    last = read_beat(tmp_path / "rank0.json")
    assert (last.outcome, last.end_step, last.silent_until) == ("preempted", 12, float("inf"))
    Heartbeat(None, 0, 60.0, 900.0).beat(3)  # no agent: nothing written, nothing raised


def test_an_attempts_cause_is_the_earliest_end_that_is_not_a_consequence(tmp_path: Path) -> None:
    runs.record_start(tmp_path, "7", 0, 4, round=1, world_size=4, nodes=2, logs="logs/7.0.1")
    runs.record_end(tmp_path, "failed", 4, "rank 0 waited for every rank to agree, in vain", rank=0, secondary=True)
    runs.record_end(tmp_path, "failed", 4, "killed by SIGKILL", rank=3, host="n2", signal="SIGKILL")
    runs.record_end(tmp_path, "failed", 4, "stopped with its group after another process failed", rank=2,
                    secondary=True)
    with open(tmp_path / ATTEMPTS, "a") as f:
        f.write('{"event": "end", "end": "fai')  # torn by a crash: ignored
    (attempt,) = runs.read_attempts(tmp_path)
    assert (attempt.end, attempt.cause.rank, attempt.cause.host, attempt.round) == ("failed", 3, "n2", 1)
    assert len(attempt.ends) == 3 and attempt.logs == "logs/7.0.1"
    old = {"event": "start", "job_id": "5", "restart": 0, "start_step": 0, "started_at": 1.0}  # before rounds
    (tmp_path / ATTEMPTS).write_text(json.dumps(old) + "\n")
    (attempt,) = runs.read_attempts(tmp_path)
    assert attempt.round == 0 and attempt.end is None and attempt.logs is None


def test_fork_is_safe_only_where_cpython_fixed_gh_112275() -> None:
    from regscale.data.stream import fork_is_safe

    assert not fork_is_safe((3, 11, 7)) and not fork_is_safe((3, 10, 14))
    assert fork_is_safe((3, 11, 8)) and fork_is_safe((3, 12, 0)) and fork_is_safe((3, 13, 1))
