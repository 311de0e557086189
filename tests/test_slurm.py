"""`regscale submit` against the real single-host SLURM cluster (slurm/start.sh: 2 fake nodes),
with the real training loop and evaluation job. Runs of the smoke recipe on 2 nodes x 1 task:
`elastic` and `lost` first, alone on the idle cluster (they drain n2 and set it DOWN); once
elastic is resumed on both nodes, the others go in together (the longest first) and one driver
loop acts on them while they run:

  base     trains to the end; its chained evaluation (afterok) starts only after training ended
  preempt  gets `scancel --signal=USR2` mid-training: saves, requeues itself, resumes, same weights
           as base and as the same recipe run uninterrupted by torchrun (OMP_NUM_THREADS=1, while
           the SLURM tasks see every core: the loop pins the thread count)
  elastic  40 steps on 1-2 nodes (slurm.min_nodes=1), started on both: preempted while n2 drains, so
           SLURM restarts it on n1 alone; cancelled there, `regscale resume ... slurm.min_nodes=2`
           back on 2: the same samples and noise at every step as the torchrun run, weights within
           ELASTIC_RTOL
  limit    a 2-minute time limit inside 200 slowed steps: SLURM's USR2 at limit - signal_lead_s (or
           the loop's deadline from SLURM's end time) -> save, requeue (a timeout), resume, finish;
           the limit stays until an attempt has saved at it, so the test holds however slowly a
           loaded machine starts training (attempts killed before their first step just requeue)
  broken   training fails (shards changed in place) twice from the same step: the run stops with a
           report, the job fails and SLURM cancels its evaluation job (kill-on-invalid-dependency)
  faults   (with the four) rank 0's process SIGKILLed, then rank 1's, then rank 1 stopped (SIGSTOP), then
           rank 0's DataLoader worker stopped (a dead-locked loader): each time the node agents restart
           the group inside the job; it completes with base's weights
  lost     (beside elastic, on 1-2 nodes) node n2 set DOWN mid-training: the job goes on with n1 alone,
           completes (COMPLETED in SLURM), same samples and noise as torchrun's run
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import psutil
import pytest
import torch

from regscale.config import load_config
from regscale.launch import runs
from regscale.launch.goodput import PARTS, run_goodput, sacct_allocations
from regscale.launch.worker import worker_pid
from regscale.engine.export import load_consolidated
from regscale.rundir import CONFIG, EVAL, EVAL_RECORD, JOB_FOLDER, METRICS, STACKS, STOP_REPORT
from tests.fixtures.slurm import (HANG_GUARD_S, TERMINAL, job_state, node_usable, regscale, sacct, set_node,
                                  wait_until)
from tests.fixtures.train import (ELASTIC_RTOL, launch_train, losses, max_relative_difference, ok,
                                  traced_draws)

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")
REQUEUE_ENDS = ("preempted", "deadline")
FAULTS_SLOW_S = 0.3  # rank 1's extra seconds per step in the faults run (after its last collective)
pytestmark = pytest.mark.timeout(2400)  # the scenarios' first test waits for all of them (a loaded 2-core machine)


@dataclass
class Run:
    run_dir: Path
    train: str
    eval: str


def submit_async(common: list[str], name: str, *overrides: str, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regscale.cli", "submit", SMOKE, *common, f"run.name={name}",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def submitted(proc: subprocess.Popen) -> Run:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return parse_submit(out)


def submit(common: list[str], name: str, *overrides: str, env: Optional[dict] = None) -> Run:
    return parse_submit(regscale("submit", SMOKE, *common, f"run.name={name}", *overrides, env=env).stdout)


def parse_submit(out: str) -> Run:
    train = re.search(r"^train job\s+(\S+)", out, re.M)
    evaluation = re.search(r"^eval job\s+(\S+)", out, re.M)
    run_dir = re.search(r"^run dir\s+(\S+)", out, re.M)
    assert train and evaluation and run_dir and "MLflow run" in out, out
    return Run(Path(run_dir.group(1)), train.group(1), evaluation.group(1))


def last_step(run_dir: Path) -> int:
    path = run_dir / METRICS
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def scenario_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory of our own: pytest's basetemp of another session by the same user may be rotated
    away while these jobs still write to it. Kept (with the job logs) when a test failed."""
    root = Path(tempfile.mkdtemp(prefix="regscale-slurm-tests-"))
    failed_before = request.session.testsfailed
    yield root
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nSLURM test runs and job logs kept in {root}")


@pytest.fixture(scope="module")
def scenarios(slurm_cluster: str, scenario_root: Path) -> dict:
    from regscale.data.synthetic import ensure_synthetic_dataset

    root = scenario_root
    common = [f"run.dir={root / 'runs'}", f"data.path={root / 'data'}", "data.synthetic=32",
              "slurm.cluster=slurm", f"slurm.profile={slurm_cluster}", "slurm.nodes=2",
              "slurm.gpus_per_node=1", "eval.num_samples=8", "eval.batch_size=8", "eval.steps=2",
              "data.num_workers=1"]  # a DataLoader worker per rank: SLURM's signals reach it too
    smoke = load_config(SMOKE, common)
    ensure_synthetic_dataset(smoke.data, smoke.model.num_classes)  # once, before four jobs read it
    # a dataset whose shards changed in place (same sizes): submit's cheap checks pass, training's
    # per-shard hash check fails before any sample is used
    broken = root / "broken"
    shutil.copytree(root / "data", broken)
    for shard in (json.loads((broken / "index.json").read_text()))["shards"]:
        path = broken / shard["raw_data"]["basename"]
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 1
        path.write_bytes(bytes(blob))

    # SLURM tasks inherit the submitter's environment: without OMP_NUM_THREADS they see every core
    every_core = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    traced = {**every_core, "REGSCALE_TRACE_DRAWS": "1"}
    seen: dict = {"limit_extended": False, "resumed": None, "n2_drained": False, "n2_back": False, "n2_down": False,
                  "faults_done": [],
                  "elastic_cancelled": False, "elastic_resumed": None}

    def usr2_mid_training(run: Run) -> None:
        while last_step(run.run_dir) < 2 and job_state(run.train) not in TERMINAL:
            time.sleep(0.2)
        if run.run_dir.name == "elastic":  # the requeued job finds one node free
            set_node("n2", "DRAIN")
            seen["n2_drained"] = True
        result = subprocess.run(["scancel", "--signal=USR2", run.train], capture_output=True, text=True)
        seen[f"signal_{run.run_dir.name}"] = {"step": last_step(run.run_dir),
                                              "result": (result.returncode, result.stderr)}

    # the same recipe, uninterrupted, launched another way: torchrun (which sets OMP_NUM_THREADS=1)
    reference: dict = {}
    torchrun = threading.Thread(daemon=True, target=lambda: reference.update(launch=launch_train(
        root / "runs" / "torchrun", root / "data", ["data.synthetic=32", "data.num_workers=1"],
        env={"REGSCALE_TRACE_DRAWS": "1"})))
    torchrun.start()
    # first, alone on the idle cluster (it drains n2 for a while, which would refuse 2-node
    # submissions, and its 1-2 node range must get both nodes); it creates the runs' MLflow store
    slowed = {**traced, "REGSCALE_FAULT_SLOW_STEP_S": "0.3"}  # time for the driver to act between steps
    elastic = submit(common, "elastic", "train.log_every=1", "train.max_steps=40", "train.ckpt_every=4",
                     "slurm.min_nodes=1", env=slowed)
    # beside it, a run that loses node n2 (set DOWN) once elastic has been requeued onto n1 alone
    lost = submit(common, "lost", "train.log_every=1", "train.max_steps=40", "train.ckpt_every=4",
                  "slurm.min_nodes=1", env=slowed)
    signallers = [threading.Thread(target=usr2_mid_training, args=(elastic,), daemon=True)]
    signallers[0].start()
    subprocess.run(["scancel", elastic.eval], check=True, timeout=30)

    def drive_elastic() -> bool:
        """Requeued onto n1 alone: elastic is cancelled a few steps on (past a checkpoint on 1 node)
        and `lost` loses n2 (DOWN); once lost goes on without it, n2 comes back and elastic is
        resumed on 2 nodes."""
        attempts = runs.read_attempts(elastic.run_dir)
        if seen["n2_drained"] and not seen["n2_down"] and len(attempts) >= 2 and last_step(lost.run_dir) >= 8 \
                and runs.latest_step(lost.run_dir) >= 4:
            seen["lost_at"] = last_step(lost.run_dir)
            set_node("n2", "DOWN")
            seen["n2_down"] = True
        if seen["n2_down"] and not seen["n2_back"] and len(runs.read_attempts(lost.run_dir)) >= 2:
            set_node("n2", "RESUME")
            seen["n2_back"] = True
        if len(attempts) >= 2 and not seen["elastic_cancelled"] and \
                runs.latest_step(elastic.run_dir) >= attempts[1].start_step + 4:  # a checkpoint on 1 node
            regscale("cancel", str(elastic.run_dir))
            seen["elastic_cancelled"] = True
        if seen["elastic_cancelled"] and seen["n2_back"] and seen["elastic_resumed"] is None \
                and job_state(elastic.train) in TERMINAL and node_usable("n2"):
            out = regscale("resume", str(elastic.run_dir), "slurm.min_nodes=2", env=traced).stdout
            seen["elastic_resumed"] = re.search(r"^train job\s+(\S+)", out, re.M).group(1)
            subprocess.run(["scancel", re.search(r"^eval job\s+(\S+)", out, re.M).group(1)], timeout=30)
        lost_done = all(job_state(j) in TERMINAL for j in (lost.train, lost.eval))
        if job_state(elastic.train) in TERMINAL and not seen["elastic_cancelled"]:
            return lost_done  # it ended by itself (the test says how)
        return lost_done and seen["elastic_resumed"] is not None  # its end is awaited with the others

    try:
        wait_until(drive_elastic, "the elastic run to finish")
    finally:
        if seen["n2_drained"] and not seen["n2_back"]:
            set_node("n2", "RESUME")
            seen["n2_back"] = True

    # the longest scenario first: long enough (200 steps) that the limit falls inside training, whatever the load
    # steps of at least 0.5 s (REGSCALE_FAULT_SLOW_STEP_S): 200 steps always outlast the 2-minute limit
    others = [submit_async(common, "limit", "slurm.time_limit_min=2", "slurm.signal_lead_s=45",
                           "train.max_steps=200", "slurm.max_failures_at_step=20",
                           env={**os.environ, "REGSCALE_FAULT_SLOW_STEP_S": "0.5"}),
              submit_async(common, "broken", f"data.path={broken}", "data.synthetic=0",
                           "slurm.max_failures_at_step=2")]
    limit, failing = (submitted(p) for p in others)
    base = submit(common, "base")
    preempt = submit(common, "preempt", "train.log_every=1", env=every_core)
    signallers.append(threading.Thread(target=usr2_mid_training, args=(preempt,), daemon=True))
    signallers[1].start()
    # rank 1 slowed (a straggler), four faults, then a preemption; its evaluation runs (goodput's last part)
    faults = submit(common, "faults", "train.log_every=1", "train.ckpt_every=4", "train.hang_timeout_s=20",
                    env={**every_core, "REGSCALE_FAULT_SLOW_STEP_S": str(FAULTS_SLOW_S),
                         "REGSCALE_FAULT_SLOW_RANK": "1"})
    # (rank, process, signal, from the attempt that reached this step with a checkpoint 4 steps before)
    fault_plan = [(0, "train", signal.SIGKILL, 6), (1, "train", signal.SIGKILL, 14), (1, "train", signal.SIGSTOP, 22),
                  (0, "loader", signal.SIGSTOP, 30), (None, "job", signal.SIGUSR2, 34)]

    def drive_faults() -> None:
        """Each planned fault in turn, once the newest attempt is past its step (a thread of its own:
        the window between two faults is a few seconds of training)."""
        done = seen["faults_done"]
        while len(done) < len(fault_plan) and job_state(faults.train) not in TERMINAL:
            time.sleep(0.2)
            rank, process, sig, at = fault_plan[len(done)]
            attempts = runs.read_attempts(faults.run_dir)
            if len(attempts) != len(done) + 1 or last_step(faults.run_dir) < at \
                    or runs.latest_step(faults.run_dir) < at - 4:
                continue
            if process == "job":  # a preemption: every process of the job gets the signal
                subprocess.run(["scancel", f"--signal={sig.name[3:]}", faults.train], check=True, timeout=30)
                done.append((rank, process, sig.name, last_step(faults.run_dir), time.time()))
                continue
            pid = worker_pid(faults.run_dir, rank)
            if pid is not None and process == "loader":  # its DataLoader worker: a dead-locked loader
                pid = loader_pid(pid)
            if pid is not None:
                os.kill(pid, sig)
                done.append((rank, process, sig.name, last_step(faults.run_dir), time.time(),
                             runs.latest_step(faults.run_dir)))

    signallers.append(threading.Thread(target=drive_faults, daemon=True))
    signallers[2].start()
    # the local executor chain (what `regscale submit recipes/smoke.yaml` does without SLURM) runs
    # beside the SLURM scenarios
    local_cmd = [sys.executable, "-m", "regscale.cli", "submit", SMOKE, "run.name=local",
                 *[o for o in common if not o.startswith("slurm.")], "--local"]
    local = subprocess.Popen(local_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # only base's and broken's evaluation chains are under test: fewer processes on a small machine
    subprocess.run(["scancel", preempt.eval, limit.eval], check=True, timeout=30)

    def drive() -> bool:
        if not seen["limit_extended"] and saved_at_limit(limit.run_dir):
            # an attempt saved at the limit and the job requeued: let the next attempts run to the end
            subprocess.run(["scontrol", "update", f"JobId={limit.train}", "TimeLimit=30"], check=True, timeout=30)
            seen["limit_extended"] = True
        if seen["resumed"] is None and all(job_state(j) in TERMINAL for j in (failing.train, failing.eval)):
            # the user fixes the dataset, then resumes the stopped run
            shutil.copytree(root / "data", broken, dirs_exist_ok=True)
            out = regscale("resume", str(failing.run_dir), "slurm.time_limit_min=20").stdout
            seen["resume_out"] = out
            seen["resumed"] = re.search(r"^train job\s+(\S+)", out, re.M).group(1)
            subprocess.run(["scancel", re.search(r"^eval job\s+(\S+)", out, re.M).group(1)], timeout=30)
        jobs = (base.train, base.eval, preempt.train, limit.train, failing.train, failing.eval, seen["resumed"],
                faults.train, faults.eval, seen["elastic_resumed"] or elastic.train)
        return all(j is not None and job_state(j) in TERMINAL for j in jobs)

    try:
        wait_until(drive, "the scenario runs to finish")
        for signaller in signallers:
            signaller.join(timeout=60)
        local_out, _ = local.communicate(timeout=HANG_GUARD_S)
        torchrun.join(timeout=HANG_GUARD_S)
    finally:
        if local.poll() is None:  # the CLI cancels its local job on SIGINT
            local.send_signal(signal.SIGINT)
            local.wait(timeout=60)
    return dict(base=base, preempt=preempt, limit=limit, broken=failing, elastic=elastic, faults=faults, lost=lost,
                local=(local.returncode, local_out), local_dir=root / "runs" / "local",
                torchrun=reference.get("launch"), **seen)


def loader_pid(rank_pid: int) -> Optional[int]:
    """The DataLoader worker of a training process: a child spawned by multiprocessing or forked
    (the same command line), not its resource tracker."""
    parent = psutil.Process(rank_pid)
    for child in parent.children():
        cmd = child.cmdline()
        if any("spawn_main" in part for part in cmd) or cmd == parent.cmdline():
            return child.pid
    return None


def saved_at_limit(run_dir: Path) -> list[runs.Attempt]:
    """The attempts from the first one that stopped at the time limit with a checkpoint on (an
    attempt that the limit killed before its first step saved nothing: it comes before)."""
    attempts = runs.read_attempts(run_dir)
    first = next((i for i, a in enumerate(attempts) if a.end in REQUEUE_ENDS and a.end_step), None)
    return [] if first is None else attempts[first:]


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {w: load_consolidated(run_dir, weights=w)[0] for w in ("model", "ema")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    for which in ("model", "ema"):
        assert wa[which].keys() == wb[which].keys()
        for key in wa[which]:
            assert torch.equal(wa[which][key], wb[which][key]), f"{which} {key} differs: {a} vs {b}"


def assert_resumed_chain(run: Run, max_steps: int = 40) -> list[runs.Attempt]:
    """Each attempt after the first started from the checkpoint the previous one saved."""
    attempts = runs.read_attempts(run.run_dir)
    assert len(attempts) >= 2, attempts
    assert attempts[0].end in REQUEUE_ENDS and attempts[0].end_step > 0, attempts
    for before, after in zip(attempts, attempts[1:]):
        assert after.start_step == before.end_step > 0, attempts
        assert after.restart == before.restart + 1
    assert attempts[-1].end == "completed" and attempts[-1].end_step == max_steps
    return attempts


def test_smoke_trains_on_two_nodes_and_completes(scenarios: dict) -> None:
    base = scenarios["base"]
    assert job_state(base.train) == "COMPLETED"
    assert sacct(base.train, "NNodes,NodeList") == ["2", "n[1-2]"]
    attempts = runs.read_attempts(base.run_dir)
    assert [(a.start_step, a.end, a.end_step) for a in attempts] == [(0, "completed", 40)]
    assert runs.latest_step(base.run_dir) == 40
    jobs = runs.read_jobs(base.run_dir)
    assert [(j.id, j.kind) for j in jobs] == [(base.train, "train"), (base.eval, "eval")]
    status = regscale("status", str(base.run_dir)).stdout
    assert "COMPLETED" in status and "40/40" in status and base.eval in status
    # the evaluation's SLURM state and its FID (random Inception: marked not comparable)
    assert re.search(rf"eval job {base.eval}\s+final\s+COMPLETED\s+FID \d+\.\d\d\*", status), status
    assert "checkpoints      20, 40 (newest: step 40)" in status and "-> completed at step 40" in status


def test_chained_eval_runs_only_after_training_completed(scenarios: dict) -> None:
    base = scenarios["base"]
    assert job_state(base.eval) == "COMPLETED"
    train_end = sacct(base.train, "End")[0]
    eval_start = sacct(base.eval, "Start")[0]
    assert eval_start >= train_end, (train_end, eval_start)  # ISO times compare as strings
    assert f"afterok:{base.train}" in (base.run_dir / JOB_FOLDER / f"{base.eval}_submission.sh").read_text()
    record = json.loads((base.run_dir / EVAL / "step_00000040" / EVAL_RECORD).read_text())
    assert record["step"] == 40


def test_usr2_preemption_requeues_and_resumes_to_the_same_weights(scenarios: dict) -> None:
    run = scenarios["preempt"]
    assert scenarios["signal_preempt"]["result"] == (0, ""), scenarios["signal_preempt"]
    assert job_state(run.train) == "COMPLETED"
    attempts = assert_resumed_chain(run)
    assert attempts[0].end == "preempted" and attempts[0].end_step >= scenarios["signal_preempt"]["step"]
    assert_same_weights(run.run_dir, scenarios["base"].run_dir)


def test_preempted_slurm_run_equals_the_same_recipe_run_by_torchrun(scenarios: dict) -> None:
    torchrun = scenarios["torchrun"]
    assert torchrun is not None and torchrun.returncode == 0, ok(torchrun) if torchrun else "no torchrun run"
    assert_same_weights(scenarios["preempt"].run_dir, torchrun.run_dir)


def test_requeued_on_fewer_nodes_and_resumed_on_more_keeps_samples_and_noise(scenarios: dict) -> None:
    run, torchrun = scenarios["elastic"], scenarios["torchrun"]
    assert scenarios["signal_elastic"]["result"] == (0, ""), scenarios["signal_elastic"]
    attempts = runs.read_attempts(run.run_dir)
    first, requeued = attempts[:2]
    assert first.end == "preempted" and (requeued.job_id, requeued.restart) == (run.train, 1)
    assert requeued.start_step == first.end_step
    rank0_log = run.run_dir / requeued.logs / "rank00000.log"  # the rendezvous puts rank 0 on either node
    assert "resharded from 2 to 1 processes: same samples and noise; reduction order differs" in rank0_log.read_text()
    resumed = scenarios["elastic_resumed"]
    assert job_state(resumed) == "COMPLETED" and sacct(resumed, "NNodes") == ["2"]
    rank0_log = run.run_dir / attempts[-1].logs / "rank00000.log"
    assert attempts[-1].job_id == resumed and "resharded from 1 to 2 processes: same samples and noise; " \
        "reduction order differs" in rank0_log.read_text()
    assert attempts[-1].end == "completed" and attempts[-1].end_step == 40
    draws, ref_draws = traced_draws(run.run_dir), traced_draws(torchrun.run_dir)
    assert {step for step, _ in draws} == set(range(40))
    assert draws == {key: digest for key, digest in ref_draws.items() if key[0] < 40}
    ref_losses, run_losses = losses(torchrun.run_dir), losses(run.run_dir)
    assert max(abs(run_losses[s] - ref_losses[s]) / ref_losses[s] for s in run_losses) <= ELASTIC_RTOL
    for weights in ("model", "ema"):
        ref_state = load_consolidated(torchrun.run_dir, step=40, weights=weights)[0]
        assert max_relative_difference(ref_state, load_consolidated(run.run_dir, weights=weights)[0]) <= ELASTIC_RTOL


def test_time_limit_requeues_and_resumes(scenarios: dict) -> None:
    run = scenarios["limit"]
    assert job_state(run.train) == "COMPLETED"
    chain = saved_at_limit(run.run_dir)
    assert len(chain) >= 2 and 0 < chain[0].end_step < 200, runs.read_attempts(run.run_dir)
    for before, after in zip(chain, chain[1:]):
        assert after.start_step == before.end_step > 0, chain
    assert chain[-1].end == "completed" and chain[-1].end_step == 200
    log = (run.run_dir / JOB_FOLDER / f"{run.train}_0_log.out").read_text()
    # regscale requeued it (scontrol requeue), counted against slurm.max_requeues, the one bound
    assert f"regscale: {chain[0].end} at step {chain[0].end_step}: requeueing (requeue " in log
    assert "this job is timed-out" not in log, "submitit's own handler did not requeue it"


def test_failing_training_stops_with_a_report_and_cancels_eval(scenarios: dict) -> None:
    run = scenarios["broken"]
    assert job_state(run.train) == "FAILED"
    assert job_state(run.eval) == "CANCELLED"
    attempts = runs.read_attempts(run.run_dir)
    assert [(a.start_step, a.end) for a in attempts[:2]] == [(0, "failed"), (0, "failed")]
    assert attempts[1].error and "Error" in attempts[1].error
    reports = list(run.run_dir.glob(STOP_REPORT.replace(".json", ".*.json")))  # `regscale resume` set it aside
    assert len(reports) == 1
    assert "2 attempts in a row failed from the checkpoint at step 0" in json.loads(reports[0].read_text())["reason"]


def test_resume_after_the_fix_finishes_the_stopped_run(scenarios: dict) -> None:
    run = scenarios["broken"]
    assert "resuming" in scenarios["resume_out"] and job_state(scenarios["resumed"]) == "COMPLETED"
    attempts = runs.read_attempts(run.run_dir)
    assert [a.end for a in attempts] == ["failed", "failed", "resumed", "completed"]
    assert load_config(run.run_dir / CONFIG).slurm.time_limit_min == 20
    assert [j.id for j in runs.read_jobs(run.run_dir) if j.kind == "train"] == [run.train, scenarios["resumed"]]
    assert_same_weights(run.run_dir, scenarios["base"].run_dir)
    again = regscale("resume", str(run.run_dir), check=False)
    assert again.returncode == 2 and "finished training (step 40)" in again.stderr


def test_a_killed_or_stopped_rank_restarts_the_group_in_the_job_and_ends_with_the_same_weights(scenarios: dict) -> None:
    run = scenarios["faults"]
    done = scenarios["faults_done"]
    assert [(rank, process, sig) for rank, process, sig, *_ in done] == [
        (0, "train", "SIGKILL"), (1, "train", "SIGKILL"), (1, "train", "SIGSTOP"), (0, "loader", "SIGSTOP"),
        (None, "job", "SIGUSR2")], done
    assert job_state(run.train) == "COMPLETED"
    attempts = runs.read_attempts(run.run_dir)
    # restarted inside the job each time (one job start, no trip through the queue); then the
    # preemption requeued it once
    assert [(a.job_id, a.restart, a.round) for a in attempts] == [(run.train, 0, r) for r in range(5)] + [
        (run.train, 1, 0)]
    assert [a.end for a in attempts] == ["failed", "failed", "hung", "hung", "preempted", "completed"], attempts
    killed0, killed1, stopped, loader = (a.cause for a in attempts[:4])
    assert (killed0.rank, killed0.signal, killed1.rank, killed1.signal) == (0, "SIGKILL", 1, "SIGKILL")
    assert stopped.rank == 1 and stopped.error.startswith("stopped (SIGSTOP), no heartbeat for"), stopped
    assert loader.rank == 0 and loader.error.startswith("no heartbeat for") and "collective" not in loader.error
    for before, after in zip(attempts, attempts[1:]):  # each restart resumed from the newest checkpoint
        assert after.start_step == before.end_step > 0 and after.world_size == 2, attempts
    # each hang noticed within its bound: max(train.hang_timeout_s=20, 10 x the p99 step), as the error
    # says, plus the stack dumps (the loader's prefetched batches come first: 2 steps)
    for hung, (_, _, _, _, at, _) in zip((stopped, loader), done[2:4]):
        bound = float(re.search(r"\(bound (\d+) s\)", hung.error).group(1))
        assert 20 <= bound and hung.ended_at - at < bound * 1.3 + 15, (hung.ended_at - at, hung.error)
    stacks = (run.run_dir / STACKS / "rank00000.txt").read_text().rsplit("\n=== ", 1)[-1]
    assert "the group hung" in stacks and "_next_batch" in stacks, stacks  # waiting for its loader
    stacks = (run.run_dir / STACKS / "rank00001.txt").read_text()
    assert "process state T" in stacks and 'File "' in stacks, stacks[-2000:]
    assert_same_weights(run.run_dir, scenarios["base"].run_dir)
    status = regscale("status", str(run.run_dir)).stdout
    assert "rank 0 on" in status and "killed by SIGKILL" in status and "stopped (SIGSTOP)" in status
    shown = regscale("logs", str(run.run_dir), "--attempt", "3")
    assert f"attempt 3 (job {run.train} round 2), rank 1" in shown.stderr
    assert shown.stdout == (run.run_dir / stopped.log).read_text()


OTHER_SHARE = 0.05  # of the allocated GPU time: the per-step agreement, logging, estimates of unlogged steps


def test_goodput_breakdown_adds_up_to_the_allocations_wall_time(scenarios: dict) -> None:
    """The faults run (a slowed rank, kills, hangs, a preemption, its evaluation): the breakdown from
    its records and SLURM's accounting equals the wall time of its allocations (sacct alone), and
    what no part explains stays within OTHER_SHARE of it, beyond the straggler's lag: the other
    rank waits for it at every step's agreement, which `other` holds."""
    run = scenarios["faults"]
    assert job_state(run.eval) == "COMPLETED"
    cfg = load_config(run.run_dir / CONFIG)
    b = run_goodput(run.run_dir, cfg.world_size)
    allocations = sacct_allocations([run.train, run.eval])
    assert sum(a.job_id == run.train for a in allocations) >= 2  # the preemption's requeue (sacct -D)
    wall = sum((a.end - a.start) * (a.gpus or cfg.world_size) for a in allocations if a.start and a.end)
    assert b.allocated == pytest.approx(wall, rel=1e-6)
    attempts = runs.read_attempts(run.run_dir)
    steps_run = sum(max((a.cause.reached_step if a.cause and a.cause.reached_step is not None else a.end_step or 0)
                        - a.start_step - 1, 0) for a in attempts)  # each start's first step is start-up
    lag = FAULTS_SLOW_S * steps_run * cfg.world_size
    assert abs(b.parts["other"] - lag) <= OTHER_SHARE * b.allocated, (b.parts, lag)
    for part in ("productive", "startup", "checkpoint", "recomputed", "restart", "stop", "evaluation"):
        assert b.parts[part] > 0, (part, b.parts)
    assert all(b.parts[p] >= 0 for p in PARTS if p != "other") and b.queue >= 0
    # the kills lost the steps between their checkpoint and where they were: about that many were recomputed
    lost = sum(step - checkpoint for _, process, sig, step, _, checkpoint in scenarios["faults_done"][:2])
    step_s = b.parts["productive"] / cfg.world_size / cfg.train.max_steps
    assert b.parts["recomputed"] / cfg.world_size >= 0.5 * lost * step_s, (b.parts, scenarios["faults_done"])


def test_status_shows_goodput_and_names_the_slowed_rank(scenarios: dict) -> None:
    out = regscale("status", str(scenarios["faults"].run_dir)).stdout
    assert re.search(r"goodput          [\d.]+% of [\d.e+-]+ GPU-h allocated went into steps that count", out), out
    for label in ("steps recomputed after a fault", "fault detection and restart", "chained evaluation",
                  "queue wait (not allocated)"):
        assert label in out, out
    assert re.search(r"STRAGGLER        rank 1 on \S+ lags: [\d.]+x the other ranks", out), out


def test_lineage_and_compare_carry_the_goodput(scenarios: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from regscale.track.lineage import stored_run_id, tracking_uri

    run = scenarios["faults"]
    cfg = load_config(run.run_dir / CONFIG)
    metrics = MlflowClient(tracking_uri(cfg, run.run_dir)).get_run(stored_run_id(run.run_dir)).data.metrics
    b = run_goodput(run.run_dir, cfg.world_size)
    # logged by the evaluation job at its end, before SLURM closed its allocation
    assert metrics["goodput/ratio"] == pytest.approx(b.ratio, abs=0.05), metrics
    assert metrics["goodput/recomputed_gpu_h"] > 0 and "ranks/lag" in metrics
    out = tmp_path / "cmp.csv"
    regscale("compare", str(run.run_dir), "--runs-dir", str(run.run_dir.parent), "--csv", str(out))
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["goodput"]) == pytest.approx(metrics["goodput/ratio"])


def test_a_lost_node_leaves_the_job_running_on_the_nodes_left(scenarios: dict) -> None:
    run, torchrun = scenarios["lost"], scenarios["torchrun"]
    assert job_state(run.train) == "COMPLETED" and job_state(run.eval) == "COMPLETED"
    attempts = runs.read_attempts(run.run_dir)
    assert [(a.restart, a.round, a.world_size, a.end) for a in attempts] == [
        (0, 0, 2, "lost"), (0, 1, 1, "completed")], attempts  # restarted inside the job, on n1
    assert attempts[0].cause.host == "n2" and "left the job" in attempts[0].cause.error
    assert attempts[1].start_step == attempts[0].end_step >= 4
    draws, ref_draws = traced_draws(run.run_dir), traced_draws(torchrun.run_dir)
    assert {step for step, _ in draws} == set(range(40))
    assert draws == {key: digest for key, digest in ref_draws.items() if key[0] < 40}
    for weights in ("model", "ema"):
        ref_state = load_consolidated(torchrun.run_dir, step=40, weights=weights)[0]
        assert max_relative_difference(ref_state, load_consolidated(run.run_dir, weights=weights)[0]) <= ELASTIC_RTOL


def test_partition_slurm_refuses_shows_slurms_message(slurm_cluster: str, tmp_path: Path) -> None:
    result = regscale("submit", SMOKE, f"run.dir={tmp_path}", f"data.path={tmp_path / 'd'}",
                      "slurm.cluster=slurm", f"slurm.profile={slurm_cluster}", "slurm.nodes=1",
                      "slurm.partition=nosuchpart", check=False)
    assert result.returncode == 2
    assert "SLURM refused the job" in result.stderr and "invalid partition" in result.stderr.lower()
    assert "Traceback" not in result.stderr and not (tmp_path / "smoke").exists()


def test_unsafe_value_refused_before_submitting(slurm_cluster: str, tmp_path: Path) -> None:
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    for value, refusal in (("'x\n#SBATCH --wrap=touch /tmp/pwned'", "holds a control character"),
                           ("'x;touch /tmp/pwned'", "not allowed in a batch script")):
        result = regscale("submit", SMOKE, f"run.dir={tmp_path}", f"data.path={tmp_path / 'd'}",
                          "slurm.cluster=slurm", f"slurm.profile={slurm_cluster}", "slurm.nodes=1",
                          f"slurm.account={value}", check=False)
        assert result.returncode == 2 and refusal in result.stderr and "slurm.account" in result.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "smoke").exists()


def test_intermediate_eval_is_submitted_when_its_checkpoint_exists(scenarios: dict) -> None:
    """What the training job's watcher does for eval.at_steps: one evaluation job per step, once."""
    from regscale.launch.job import EvalWatcher

    base = scenarios["base"]
    cfg = load_config(base.run_dir / CONFIG, ["eval.at_steps=[20]"])
    watcher = EvalWatcher(base.run_dir, cfg)
    watcher.poll()
    watcher.poll()  # already submitted: nothing new
    evals = [j for j in runs.read_jobs(base.run_dir) if j.kind == "eval" and j.step == 20]
    assert len(evals) == 1
    try:
        assert job_state(evals[0].id) in ("PENDING", "RUNNING", "CONFIGURING")
        assert "EvalJob" in (base.run_dir / JOB_FOLDER / f"{evals[0].id}_submitted.pkl").read_bytes().decode("latin1")
    finally:
        subprocess.run(["scancel", evals[0].id], timeout=30)


def test_local_executor_runs_train_then_eval(scenarios: dict) -> None:
    code, out = scenarios["local"]
    run_dir = scenarios["local_dir"]
    assert code == 0, out
    assert out.index("training: completed") < out.index("evaluation @ step 40: local job")
    assert "regscale status" in out and "regscale ui" in out and "MLflow run" in out
    # progress while the jobs run (plain lines when not on a terminal), then the result
    assert re.search(r"^training: 40/40 steps  loss \d+\.\d{4}  \d+\.\d img/s", out, re.M), out
    assert out.index("training: 40/40 steps") < out.index("training: completed")
    assert "sampling: 1/1 batches (rank 0)" in out
    assert re.search(r"^reference features: (\d+)/\1 images", out, re.M), out
    record = run_dir / EVAL / "step_00000040" / EVAL_RECORD
    assert re.search(r"^result      FID [\d.]+, sFID [\d.]+, IS [\d.]+, precision [\d.]+, recall [\d.]+ "
                     r"\(step 40\)\n\s+not comparable", out, re.M), out
    assert f"record      {record}" in out
    jobs = runs.read_jobs(run_dir)
    assert [(j.kind, j.cluster) for j in jobs] == [("train", "local"), ("eval", "local")]
    assert runs.read_attempts(run_dir)[-1].end == "completed"
    assert json.loads((run_dir / EVAL / "step_00000040" / EVAL_RECORD).read_text())["step"] == 40
    assert_same_weights(run_dir, scenarios["base"].run_dir)  # 1 node x 2 tasks = 2 nodes x 1 task


def test_sweep_is_one_job_array_and_cancel_stops_it(slurm_cluster: str, tmp_path: Path) -> None:
    out = regscale("submit", SMOKE, f"run.dir={tmp_path}", f"data.path={tmp_path / 'd'}", "data.synthetic=32",
                   "train.max_steps=5000", "slurm.cluster=slurm", f"slurm.profile={slurm_cluster}",
                   "slurm.nodes=1", "slurm.gpus_per_node=1", "--sweep", "train.lr=1e-4,2e-4").stdout
    array = re.search(r"^sweep\s+job array (\d+): 2 runs", out, re.M)
    assert array, out
    try:
        jobs = []
        for i, name in enumerate(("smoke-lr=1e-4", "smoke-lr=2e-4")):
            run_dir = tmp_path / name
            assert load_config(run_dir / CONFIG).train.lr == (1e-4, 2e-4)[i]
            train, evaluation = runs.read_jobs(run_dir)
            assert (train.id, train.kind, evaluation.depends_on) == (f"{array.group(1)}_{i}", "train", train.id)
            assert "cancelled" in regscale("cancel", str(run_dir)).stdout
            jobs += [train.id, evaluation.id]
        wait_until(lambda: all(job_state(j) in TERMINAL for j in jobs), "the cancelled sweep jobs to end")
        assert all(job_state(j) in ("CANCELLED", "GONE") for j in jobs)
    finally:
        subprocess.run(["scancel", array.group(1)], timeout=30)


def test_prepare_as_a_job_array_into_s3(slurm_cluster: str, s3, tmp_path: Path) -> None:
    """`sbatch --array` of `regscale prepare SRC s3://...` (the README's form): each task takes its
    share of the chunks (--part from the array index) and uploads them from its own stage; whoever
    finds them all done merges the index. One dataset in the bucket, each sample exactly once."""
    from regscale.cli import main
    from tests.fixtures.data import make_reg_layout
    from tests.test_data import _read_all

    src = make_reg_layout(tmp_path / "src", 48, 4)
    uri = f"s3://{s3.new_bucket()}/ds"
    logs = tmp_path / "logs"
    logs.mkdir()
    wrap = f"{sys.executable} -m regscale.cli prepare {src} {uri} --chunk-size 8 --quiet"
    array = subprocess.run(["sbatch", "--parsable", "--wait", "--partition=debug", "--array=0-2", "--ntasks=1",
                            f"--chdir={REPO}", f"--output={logs}/%A_%a.out", "--wrap", wrap],
                           capture_output=True, text=True, timeout=HANG_GUARD_S)  # --export=ALL: the S3 variables
    outputs = {p.name: p.read_text() for p in sorted(logs.iterdir())}
    assert array.returncode == 0 and len(outputs) == 3, f"{array.stderr}\n{outputs}"
    assert any(f"{uri}: 48 samples in 4 classes" in out for out in outputs.values()), outputs
    assert all("part " in out or "48 samples" in out for out in outputs.values()), outputs
    assert main(["prepare", "--verify", uri]) == 0
    assert [int(s["index"]) for s in _read_all(uri, f"data.local_cache={tmp_path / 'cache'}")] == list(range(48))
