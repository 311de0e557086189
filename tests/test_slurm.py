"""`regscale submit` against the real single-host SLURM cluster (slurm/start.sh: 2 fake nodes),
with the real training loop and evaluation job. Runs of the smoke recipe on 2 nodes x 1 task:
`elastic` first, alone on the idle cluster (it drains n2 for a while); then four go in together
and one driver loop acts on them while they run:

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
"""

from __future__ import annotations

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

import pytest
import torch

from regscale.config import load_config
from regscale.launch import runs
from regscale.engine.export import load_consolidated
from tests.fixtures.slurm import (HANG_GUARD_S, TERMINAL, job_state, regscale, sacct, set_node,
                                  wait_until)
from tests.fixtures.train import (ELASTIC_RTOL, launch_train, losses, max_relative_difference, ok,
                                  traced_draws)

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")
REQUEUE_ENDS = ("preempted", "deadline")


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
    path = run_dir / "metrics.jsonl"
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
              "slurm.gpus_per_node=1", "eval.num_samples=8", "eval.batch_size=8", "eval.steps=2"]
    ensure_synthetic_dataset(load_config(SMOKE, common))  # once, before four jobs read it
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
    seen: dict = {"limit_extended": False, "resumed": None, "n2_drained": False, "n2_back": False,
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
        root / "runs" / "torchrun", root / "data", ["data.synthetic=32"], env={"REGSCALE_TRACE_DRAWS": "1"})))
    torchrun.start()
    # first, alone on the idle cluster (it drains n2 for a while, which would refuse 2-node
    # submissions, and its 1-2 node range must get both nodes); it creates the runs' MLflow store
    elastic = submit(common, "elastic", "train.log_every=1", "train.max_steps=40", "train.ckpt_every=4",
                     "slurm.min_nodes=1", env=traced)
    signallers = [threading.Thread(target=usr2_mid_training, args=(elastic,), daemon=True)]
    signallers[0].start()
    subprocess.run(["scancel", elastic.eval], check=True, timeout=30)

    def drive_elastic() -> bool:
        """Requeued onto n1 alone: n2 comes back; a few steps on, cancel it and resume on 2 nodes."""
        attempts = runs.read_attempts(elastic.run_dir)
        if seen["n2_drained"] and not seen["n2_back"] and len(attempts) >= 2:
            set_node("n2", "RESUME")
            seen["n2_back"] = True
        if seen["n2_back"] and not seen["elastic_cancelled"] and \
                last_step(elastic.run_dir) >= attempts[1].start_step + 6:  # past a checkpoint on 1 node
            regscale("cancel", str(elastic.run_dir))
            seen["elastic_cancelled"] = True
        if seen["elastic_cancelled"] and seen["elastic_resumed"] is None and job_state(elastic.train) in TERMINAL:
            out = regscale("resume", str(elastic.run_dir), "slurm.min_nodes=2", env=traced).stdout
            seen["elastic_resumed"] = re.search(r"^train job\s+(\S+)", out, re.M).group(1)
            subprocess.run(["scancel", re.search(r"^eval job\s+(\S+)", out, re.M).group(1)], timeout=30)
        if job_state(elastic.train) in TERMINAL and not seen["elastic_cancelled"]:
            return True  # it ended by itself (the test says how)
        return seen["elastic_resumed"] is not None and job_state(seen["elastic_resumed"]) in TERMINAL

    try:
        wait_until(drive_elastic, "the elastic run to finish")
    finally:
        if seen["n2_drained"] and not seen["n2_back"]:
            set_node("n2", "RESUME")
            seen["n2_back"] = True

    base = submit(common, "base")
    preempt = submit(common, "preempt", "train.log_every=1", env=every_core)
    signallers.append(threading.Thread(target=usr2_mid_training, args=(preempt,), daemon=True))
    signallers[1].start()
    # long enough (200 steps) that the limit falls inside training, whatever the load
    # steps of at least 0.5 s (REGSCALE_FAULT_SLOW_STEP_S): 200 steps always outlast the 2-minute limit
    others = [submit_async(common, "limit", "slurm.time_limit_min=2", "slurm.signal_lead_s=45",
                           "train.max_steps=200", "slurm.max_failures_at_step=20",
                           env={**os.environ, "REGSCALE_FAULT_SLOW_STEP_S": "0.5"}),
              submit_async(common, "broken", f"data.path={broken}", "data.synthetic=0",
                           "slurm.max_failures_at_step=2")]
    limit, failing = (submitted(p) for p in others)
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
        jobs = (base.train, base.eval, preempt.train, limit.train, failing.train, failing.eval, seen["resumed"])
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
    return dict(base=base, preempt=preempt, limit=limit, broken=failing, elastic=elastic,
                local=(local.returncode, local_out), local_dir=root / "runs" / "local",
                torchrun=reference.get("launch"), **seen)


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
    assert f"afterok:{base.train}" in (base.run_dir / "jobs" / f"{base.eval}_submission.sh").read_text()
    record = json.loads((base.run_dir / "eval" / "step_00000040" / "eval_record.json").read_text())
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
    log = (run.run_dir / "jobs" / f"{run.train}_0_log.err").read_text()  # both attempts of the job
    assert "resharded from 2 to 1 processes: same samples and noise; reduction order differs" in log
    resumed = scenarios["elastic_resumed"]
    assert job_state(resumed) == "COMPLETED" and sacct(resumed, "NNodes") == ["2"]
    log = (run.run_dir / "jobs" / f"{resumed}_0_log.err").read_text()
    assert "resharded from 1 to 2 processes: same samples and noise; reduction order differs" in log
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
    log = (run.run_dir / "jobs" / f"{run.train}_0_log.out").read_text()
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
    reports = list(run.run_dir.glob("stop_report.*.json"))  # `regscale resume` set it aside
    assert len(reports) == 1
    assert "2 attempts in a row failed from the checkpoint at step 0" in json.loads(reports[0].read_text())["reason"]


def test_resume_after_the_fix_finishes_the_stopped_run(scenarios: dict) -> None:
    run = scenarios["broken"]
    assert "resuming" in scenarios["resume_out"] and job_state(scenarios["resumed"]) == "COMPLETED"
    attempts = runs.read_attempts(run.run_dir)
    assert [a.end for a in attempts] == ["failed", "failed", "resumed", "completed"]
    assert load_config(run.run_dir / "config.yaml").slurm.time_limit_min == 20
    assert [j.id for j in runs.read_jobs(run.run_dir) if j.kind == "train"] == [run.train, scenarios["resumed"]]
    assert_same_weights(run.run_dir, scenarios["base"].run_dir)
    again = regscale("resume", str(run.run_dir), check=False)
    assert again.returncode == 2 and "finished training (step 40)" in again.stderr


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
    cfg = load_config(base.run_dir / "config.yaml", ["eval.at_steps=[20]"])
    watcher = EvalWatcher(base.run_dir, cfg)
    watcher.poll()
    watcher.poll()  # already submitted: nothing new
    evals = [j for j in runs.read_jobs(base.run_dir) if j.kind == "eval" and j.step == 20]
    assert len(evals) == 1
    try:
        assert job_state(evals[0].id) in ("PENDING", "RUNNING", "CONFIGURING")
        assert "EvalJob" in (base.run_dir / "jobs" / f"{evals[0].id}_submitted.pkl").read_bytes().decode("latin1")
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
    record = run_dir / "eval" / "step_00000040" / "eval_record.json"
    assert re.search(r"^result      FID [\d.]+, sFID [\d.]+, IS [\d.]+, precision [\d.]+, recall [\d.]+ "
                     r"\(step 40\)\n\s+not comparable", out, re.M), out
    assert f"record      {record}" in out
    jobs = runs.read_jobs(run_dir)
    assert [(j.kind, j.cluster) for j in jobs] == [("train", "local"), ("eval", "local")]
    assert runs.read_attempts(run_dir)[-1].end == "completed"
    assert json.loads((run_dir / "eval" / "step_00000040" / "eval_record.json").read_text())["step"] == 40
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
            assert load_config(run_dir / "config.yaml").train.lr == (1e-4, 2e-4)[i]
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
