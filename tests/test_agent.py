"""The parts of the node agent's fault handling that need no cluster: the heartbeat's bound, the
attempt records (which end is the cause), closing an attempt ended from outside, `regscale logs`
following a run across restarts, and which interpreters fork DataLoader workers.

The faults themselves (a killed rank 0 or 1, a stopped rank, a dead-locked DataLoader worker, a
node lost), end to end on the SLURM dev cluster, are in tests/test_slurm.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regscale.config import load_config, to_yaml
from regscale.launch import runs
from regscale.launch.agent import NodeJob
from regscale.launch.job import RunStopped, check_round_start, close_unrecorded
from regscale.rundir import ATTEMPTS, CONFIG, LOGS, STOP_REPORT
from regscale.train.heartbeat import Heartbeat, read_beat
from tests.fixtures.train import SMOKE

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


def test_a_rounds_own_start_is_not_counted_as_a_failure_by_the_other_agents(tmp_path: Path) -> None:
    """Node 0's agent records a round's start; node 1's agent checks the same round a moment later
    and must not count that start (no end yet) as a second failure at the step."""
    cfg = load_config(SMOKE, ["slurm.max_failures_at_step=2", "run.name=t"])
    node1 = NodeJob("7", 0, 1, 2, "127.0.0.1", 1)
    runs.record_start(tmp_path, "7", 0, 0, round=0)
    runs.record_end(tmp_path, "failed", 0, "ShardError: changed", rank=1)
    runs.record_start(tmp_path, "7", 0, 0, round=1)  # node 0, first to the round
    check_round_start(tmp_path, cfg, node1, 0, 0, 1)  # node 1: one failure so far, go on
    assert not (tmp_path / STOP_REPORT).exists()
    runs.record_end(tmp_path, "failed", 0, "ShardError: changed", rank=0)
    with pytest.raises(RunStopped, match="2 attempts in a row failed from the checkpoint at step 0"):
        check_round_start(tmp_path, cfg, node1, 0, 0, 2)
    assert "ShardError" in json.loads((tmp_path / STOP_REPORT).read_text())["reason"]


def test_fork_is_safe_only_where_cpython_fixed_gh_112275() -> None:
    from regscale.data.stream import fork_is_safe

    assert not fork_is_safe((3, 11, 7)) and not fork_is_safe((3, 10, 14))
    assert fork_is_safe((3, 11, 8)) and fork_is_safe((3, 12, 0)) and fork_is_safe((3, 13, 1))


def test_an_attempt_nobody_closed_is_recorded_as_ended_from_outside(tmp_path: Path) -> None:
    runs.record_start(tmp_path, "999999", 0, 0)  # the job vanished: no agent wrote its end
    close_unrecorded(tmp_path, runs.read_attempts(tmp_path))
    (attempt,) = runs.read_attempts(tmp_path)
    assert attempt.end == "lost" and attempt.error.startswith("ended from outside")
    close_unrecorded(tmp_path, runs.read_attempts(tmp_path))  # closed once
    assert len(runs.read_attempts(tmp_path)[0].ends) == 1


def test_logs_follow_a_run_across_a_restart_until_it_stops(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG).write_text(to_yaml(load_config(SMOKE)))
    runs.record_start(run_dir, "7", 0, 0, world_size=2, logs="logs/7.0.0")
    first = run_dir / LOGS / "7.0.0" / "rank00001.log"
    first.parent.mkdir(parents=True)
    first.write_text("step 1: loss 1.0\n")
    runs.record_end(run_dir, "failed", 0, "killed by SIGKILL", rank=1, host="n2", signal="SIGKILL",
                    log="logs/7.0.0/rank00001.log")
    follow = subprocess.Popen([sys.executable, "-m", "regscale.cli", "logs", str(run_dir), "--follow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        runs.record_start(run_dir, "7", 0, 0, round=1, world_size=2, logs="logs/7.0.1")
        second = run_dir / LOGS / "7.0.1" / "rank00000.log"
        second.parent.mkdir(parents=True)
        second.write_text("step 1: loss 0.9\n")
        time.sleep(2)
        with open(second, "a") as f:
            f.write("step 2: loss 0.8\n")
        runs.record_end(run_dir, "failed", 0, "UserError: a shard changed", rank=0)
        (run_dir / STOP_REPORT).write_text("{}")
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, err
    assert out == "step 1: loss 1.0\nstep 1: loss 0.9\nstep 2: loss 0.8\n"
    assert "attempt 1 (job 7), rank 1" in err and "attempt 2 (job 7 round 1), rank 0" in err
