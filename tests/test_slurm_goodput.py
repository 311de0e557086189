"""Goodput on the real single-host SLURM cluster (slurm/start.sh, as tests/test_slurm.py): one run of
the smoke recipe on 2 nodes x 1 task with rank 1 slowed (REGSCALE_FAULT_SLOW_STEP_S, _SLOW_RANK),
preempted once (USR2: save, requeue, resume) and then hit by a fault (rank 1's processes SIGKILLed,
as a node failure would, after a checkpoint and some steps past it: those steps are lost), then
trained to the end and evaluated by its chained job. Then:

  - the breakdown from its records and SLURM's accounting adds up to the wall time of its
    allocations (what sacct alone says), and what no part explains (`other`) stays within
    OTHER_SHARE of it: start-up, checkpoint stalls, the recomputed steps, the fault's detection and
    restart, the stop and the evaluation each show up;
  - `regscale status RUN` shows the breakdown and names rank 1 as the straggler;
  - the lineage's MLflow run carries the ratio (logged by the evaluation job), and `compare` shows it.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from regscale.config import load_config
from regscale.data.synthetic import ensure_synthetic_dataset
from regscale.launch import runs
from regscale.launch.goodput import PARTS, run_goodput, sacct_allocations
from tests.fixtures.slurm import TERMINAL, job_state, regscale, wait_until
from tests.test_slurm import SMOKE, last_step, submit

OTHER_SHARE = 0.05  # of the allocated GPU time: the per-step agreement, logging, estimates of unlogged steps
MAX_STEPS = 80


def rank_processes(job_id: str, rank: int) -> list[psutil.Process]:
    """The processes of one rank of a running job (this host runs every fake node): their initial
    environment says the job and the rank (RANK from an elastic agent, else srun's SLURM_PROCID)."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("RANK", env.get("SLURM_PROCID")) == str(rank):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def faulted(slurm_cluster: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix="regscale-slurm-goodput-"))
    common = [f"run.dir={root / 'runs'}", f"data.path={root / 'data'}", "data.synthetic=32",
              "slurm.cluster=slurm", f"slurm.profile={slurm_cluster}", "slurm.nodes=2", "slurm.gpus_per_node=1",
              "eval.num_samples=8", "eval.batch_size=8", "eval.steps=2"]
    ensure_synthetic_dataset(load_config(SMOKE, common))
    env = {**os.environ, "REGSCALE_FAULT_SLOW_STEP_S": "0.3", "REGSCALE_FAULT_SLOW_RANK": "1"}
    env.pop("OMP_NUM_THREADS", None)
    run = submit(common, "goodput", f"train.max_steps={MAX_STEPS}", "train.ckpt_every=10", "train.log_every=1",
                 "slurm.max_failures_at_step=5", env=env)
    seen: dict = {"preempted_at": None, "killed": None}

    def drive() -> bool:
        attempts = runs.read_attempts(run.run_dir)
        step = last_step(run.run_dir)
        if seen["preempted_at"] is None and step >= 5:  # a preemption: save, requeue, resume
            subprocess.run(["scancel", "--signal=USR2", run.train], check=True, timeout=30)
            seen["preempted_at"] = step
        resumed = [a for a in attempts if a.start_step > 0]
        if seen["killed"] is None and resumed and runs.latest_step(run.run_dir) > resumed[0].start_step \
                and step >= runs.latest_step(run.run_dir) + 5:  # a fault with steps past the checkpoint
            victims = rank_processes(run.train, 1)
            for proc in victims:
                proc.send_signal(signal.SIGKILL)
            seen["killed"] = {"step": step, "checkpoint": runs.latest_step(run.run_dir), "pids": len(victims)}
        return all(job_state(j) in TERMINAL for j in (run.train, run.eval))

    wait_until(drive, "the faulted run and its evaluation to finish")
    time.sleep(5)  # sacct records the last allocation's end
    return dict(run=run, root=root, **seen)


def test_breakdown_adds_up_to_the_allocations_wall_time(faulted: dict) -> None:
    run = faulted["run"]
    assert job_state(run.train) == "COMPLETED" and job_state(run.eval) == "COMPLETED"
    assert faulted["preempted_at"] is not None and faulted["killed"] and faulted["killed"]["pids"] > 0, faulted
    cfg = load_config(run.run_dir / "config.yaml")
    b = run_goodput(run.run_dir, cfg.world_size)
    # the wall time of every allocation of the run, from SLURM alone
    allocations = sacct_allocations([run.train, run.eval])
    assert sum(a.job_id == run.train for a in allocations) >= 2  # the preemption's requeue (sacct -D)
    wall = sum((a.end - a.start) * (a.gpus or cfg.world_size) for a in allocations if a.start and a.end)
    assert b.allocated == pytest.approx(wall, rel=1e-6)
    assert abs(b.parts["other"]) <= OTHER_SHARE * b.allocated, b.parts
    for part in ("productive", "startup", "checkpoint", "recomputed", "restart", "stop", "evaluation"):
        assert b.parts[part] > 0, (part, b.parts)
    assert all(b.parts[p] >= 0 for p in PARTS if p != "other") and b.queue >= 0
    # the fault lost the steps between its checkpoint and where it was: about that many were recomputed
    lost = faulted["killed"]["step"] - faulted["killed"]["checkpoint"]
    step_s = b.parts["productive"] / cfg.world_size / MAX_STEPS
    assert b.parts["recomputed"] / cfg.world_size >= 0.5 * lost * step_s, (b.parts, faulted["killed"])
    ends = [a.end for a in runs.read_attempts(run.run_dir)]
    assert "preempted" in ends and ends[-1] == "completed", ends


def test_status_shows_goodput_and_names_the_slowed_rank(faulted: dict) -> None:
    run = faulted["run"]
    out = regscale("status", str(run.run_dir)).stdout
    assert re.search(r"goodput          [\d.]+% of [\d.e+-]+ GPU-h allocated went into steps that count", out), out
    for label in ("steps recomputed after a fault", "fault detection and restart", "chained evaluation",
                  "queue wait (not allocated)"):
        assert label in out, out
    assert re.search(r"STRAGGLER        rank 1 on \S+ lags: [\d.]+x the other ranks", out), out


def test_lineage_and_compare_carry_the_ratio(faulted: dict) -> None:
    from mlflow.tracking import MlflowClient

    from regscale.track.lineage import stored_run_id, tracking_uri

    run = faulted["run"]
    cfg = load_config(run.run_dir / "config.yaml")
    client = MlflowClient(tracking_uri(cfg, run.run_dir))
    metrics = client.get_run(stored_run_id(run.run_dir)).data.metrics
    b = run_goodput(run.run_dir, cfg.world_size)
    # logged by the evaluation job at its end, before SLURM closed its allocation
    assert metrics["goodput/ratio"] == pytest.approx(b.ratio, abs=0.05), metrics
    assert metrics["goodput/recomputed_gpu_h"] > 0 and "ranks/lag" in metrics
    out = faulted["root"] / "cmp.csv"
    regscale("compare", str(run.run_dir), "--runs-dir", str(run.run_dir.parent), "--csv", str(out))
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["goodput"]) == pytest.approx(metrics["goodput/ratio"])
