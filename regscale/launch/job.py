"""What runs inside a job: the training callable (requeued by `scontrol requeue`) and the evaluation one.

Every task (one per GPU) runs `TrainJob()`. It takes over the stop signals at once (one StopFlag,
handed to the loop: regscale.train.preempt owns preemption), exports the torch.distributed
variables, calls `regscale.train.loop.train` (which always resumes from the newest checkpoint, so
a job restarted by anyone resumes too) and acts on its Outcome:

- completed: the job ends; the chained evaluation job (afterok) may start;
- preempted / deadline: a checkpoint was saved; rank 0 requeues the job (`scontrol requeue`; under
  the local executor, submitit's restart code) and the next attempt resumes from it;
- interrupted (SIGINT): a checkpoint was saved; the job fails without a requeue (stop_report.json);
- an exception: rank 0 requeues as well, unless the run keeps failing at the same checkpoint step;
  a RunHalted (the loop saved a checkpoint and stopped itself: fp16's loss scale collapsed) is
  never requeued: stop_report.json says why.

The one requeue bound is slurm.max_requeues, counted in attempts.jsonl; a run that hits it or fails
slurm.max_failures_at_step times in a row from the same step stops: stop_report.json says why (the
last error), the job fails, and SLURM cancels the evaluation job that depends on it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import submitit

from regscale.config import Config
from regscale.errors import RunHalted, UserError
from regscale.fsutil import write_atomic
from regscale.launch import runs
from regscale.outcome import Outcome
from regscale.rundir import CHECKPOINTS, step_name

if TYPE_CHECKING:
    from regscale.track.mlflow import Tracker

NOT_FAILED = (*(o.value for o in Outcome if o is not Outcome.FAILED), runs.RESUMED)  # attempts.jsonl ends
FAILURE_GRACE_S = 15.0  # a failing rank > 0 waits this long before exiting (srun --kill-on-bad-exit)
DISTRIBUTED_NAMES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class RunStopped(RuntimeError):
    """The launcher refused to go on with a run (requeue bound, repeated failures at one step)."""


def stop_reason(attempts: list[runs.Attempt], start_step: int, restarts: int, cfg: Config) -> Optional[str]:
    """Why this run must not start (again), or None. `attempts` ends with the current one if recorded."""
    s = cfg.slurm
    if restarts > s.max_requeues:
        return f"the job was requeued {restarts} times; slurm.max_requeues is {s.max_requeues}"
    failed = []
    for attempt in reversed(attempts):
        if attempt.start_step != start_step or attempt.end in NOT_FAILED:
            break
        failed.append(attempt)  # ended with an error, or killed without recording an end
    if len(failed) >= s.max_failures_at_step:
        last = next((a.error for a in failed if a.error), None) or "killed without an error (see the job logs)"
        return (f"{len(failed)} attempts in a row failed from the checkpoint at step {start_step} "
                f"(slurm.max_failures_at_step={s.max_failures_at_step}); last error: {last}")
    return None


def write_stop_report(run_dir: Path, reason: str, step: int) -> None:
    """stop_report.json: why the launcher stopped the run, for `regscale status` and humans, with
    the newest checkpoint's count of skipped steps (inf/nan gradients, fp16 overflows included)."""
    report = dict(reason=reason, step=step, stopped_at=time.time(),
                  job_id=os.environ.get("SLURM_JOB_ID"),
                  attempts=len(runs.read_attempts(run_dir)),
                  skipped_steps=runs.skipped_steps(run_dir),
                  resume=f"fix the cause, then: regscale resume {run_dir}")
    write_atomic(run_dir / runs.STOP_REPORT, json.dumps(report, indent=1) + "\n")
    print(f"regscale: run stopped: {reason}", file=sys.stderr, flush=True)


def job_environment() -> submitit.JobEnvironment:
    """submitit's view of this task (job id, rank, cluster), with the torch.distributed variables
    exported by submitit's rule (regscale.dist.export_launcher_env)."""
    from regscale import dist

    dist.export_launcher_env()
    return submitit.JobEnvironment()


def export_deadline() -> None:
    """REGSCALE_DEADLINE (read by the training loop) from the job's SLURM end time, when SLURM does
    not export SLURM_JOB_END_TIME itself (22.05 does not): the loop then stops in time to save."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_END_TIME") or os.environ.get("REGSCALE_DEADLINE"):
        return
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        end = datetime.datetime.fromisoformat(out).timestamp()
    except (OSError, ValueError, subprocess.SubprocessError):
        return  # no end time known (unlimited, or squeue unavailable): signals still stop the loop
    os.environ["REGSCALE_DEADLINE"] = str(end)


def open_tracker(cfg: Config, run_dir: Path, *, attach: bool = False) -> "Tracker":
    """The run's MLflow tracker (rank 0 only): `attach` adds to the training run without owning it
    (evaluation jobs)."""
    from regscale.track.mlflow import Tracker

    return Tracker.attach(cfg, run_dir) if attach else Tracker.open(cfg, run_dir)


def _being_cancelled() -> bool:
    """True when SLURM no longer runs this job (scancel, time limit passed): do not requeue it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(state) and state != "RUNNING"


def requeue(env: submitit.JobEnvironment, outcome: Outcome) -> None:
    """End this attempt so that the job runs again and resumes from the newest checkpoint:
    `scontrol requeue` on SLURM (which then ends the other tasks), the local executor's restart
    code otherwise. Exits the process (no result is recorded for an attempt that goes on)."""
    if env.cluster != "slurm":
        from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

        sys.exit(LOCAL_REQUEUE_RETURN_CODE)
    if _being_cancelled():
        print("regscale: the job is being cancelled: not requeueing", file=sys.stderr, flush=True)
        return
    subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60, capture_output=True)
    sys.exit(outcome.exit_code)


def _local_layout_by_host() -> None:
    """Join the process group and set LOCAL_RANK / LOCAL_WORLD_SIZE by host, for libraries (the
    evaluation's streaming reader) that take "local" to mean "shares this host's /dev/shm". Same as
    SLURM's on real nodes; differs only where several SLURM nodes share a host (the dev cluster)."""
    from regscale import dist

    if dist.read_layout().world_size <= 1:
        return
    dist.setup()
    hosts = dist.host_layout()
    os.environ["LOCAL_RANK"] = str(hosts.local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(hosts.local_world_size)


def _leave_process_group() -> None:
    """Destroy the process group evaluate() joined: a live gloo group aborts the interpreter at exit
    ("terminate called without an active exception"), which srun reports as a failed task."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TrainJob:
    """The training job of one run directory (picklable; the same pickle serves every requeue)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> str:
        from regscale.train.loop import train
        from regscale.train.preempt import StopFlag

        stop = StopFlag().install()  # from here on a stop signal waits for a step boundary
        env = job_environment()
        export_deadline()
        run_dir = Path(self.run_dir)
        cfg = runs.load_run_config(run_dir)
        rank0 = env.global_rank == 0
        start_step = runs.latest_step(run_dir)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if rank0:
            attempts = runs.read_attempts(run_dir)
            restarts = max(restarts, sum(a.job_id == env.job_id for a in attempts))
            reason = stop_reason(attempts, start_step, restarts, cfg)
            if reason:
                write_stop_report(run_dir, reason, start_step)
                raise RunStopped(reason)
            runs.record_start(run_dir, env.job_id, restarts, start_step)
        watcher = EvalWatcher(run_dir, cfg) if rank0 and env.cluster == "slurm" and cfg.eval.at_steps else None
        if watcher:
            watcher.start()
        try:
            outcome = train(cfg, run_dir, open_tracker(cfg, run_dir) if rank0 else None, stop=stop)
        except Exception as err:
            if rank0:
                self._after_failure(env, run_dir, cfg, err, restarts)
            else:  # give rank 0 time to record the failure and requeue before srun ends the step
                time.sleep(FAILURE_GRACE_S)
            raise
        finally:
            if watcher:
                watcher.stop()
        if rank0:
            step = runs.latest_step(run_dir)
            runs.record_end(run_dir, outcome.value, step)
            if outcome.requeue:
                reason = stop_reason([], step, restarts + 1, cfg)
                if reason:
                    write_stop_report(run_dir, reason, step)
                    raise RunStopped(reason)
                print(f"regscale: {outcome.value} at step {step}: requeueing (requeue {restarts + 1} of "
                      f"at most {cfg.slurm.max_requeues})", flush=True)
                requeue(env, outcome)
            elif outcome is Outcome.INTERRUPTED:  # the job fails: its evaluation must not start
                reason = f"interrupted (SIGINT) at step {step}"
                write_stop_report(run_dir, reason, step)
                raise RunStopped(reason)
        return outcome.value

    def _after_failure(self, env: submitit.JobEnvironment, run_dir: Path, cfg: Config, err: Exception,
                       restarts: int) -> None:
        """Record the failure; requeue unless the run is failing over and over at the same step."""
        step = runs.latest_step(run_dir)
        runs.record_end(run_dir, Outcome.FAILED.value, step, error=f"{type(err).__name__}: {err}")
        if not isinstance(err, UserError):  # a UserError's message says it all
            traceback.print_exc()
        if isinstance(err, RunHalted):  # a retry would stop again
            write_stop_report(run_dir, str(err), step)
            return
        reason = stop_reason(runs.read_attempts(run_dir), step, restarts + 1, cfg)
        if reason:
            write_stop_report(run_dir, reason, step)
            return
        print(f"regscale: training failed at step {step}; requeueing to retry from the newest "
              "checkpoint", file=sys.stderr, flush=True)
        requeue(env, Outcome.FAILED)


class EvalJob(submitit.helpers.Checkpointable):
    """Sampling + metrics for one checkpoint of a run (step None: the final one), every task."""

    def __init__(self, run_dir: str, step: Optional[int] = None) -> None:
        self.run_dir = run_dir
        self.step = step

    def __call__(self) -> dict:
        from regscale.eval.job import evaluate

        env = job_environment()
        run_dir = Path(self.run_dir)
        cfg = runs.load_run_config(run_dir)
        step = self.step if self.step is not None else runs.latest_step(run_dir)
        if self.step is None and step < cfg.train.max_steps:
            raise RunStopped(f"{run_dir}: the newest checkpoint is step {step}, training has not "
                             f"reached train.max_steps={cfg.train.max_steps}")
        _local_layout_by_host()
        tracker = open_tracker(cfg, run_dir, attach=True) if env.global_rank == 0 else None
        try:
            return evaluate(cfg, run_dir, run_dir / "eval" / step_name(step), step, tracker)
        finally:
            if tracker is not None:
                tracker.finish()
            _leave_process_group()


class EvalWatcher(threading.Thread):
    """Rank 0 of a SLURM training job: submits an evaluation job for each eval.at_steps checkpoint as
    soon as it is written, without stopping training (sbatch runs in a child process with the job's
    SLURM variables removed)."""

    def __init__(self, run_dir: Path, cfg: Config, interval_s: float = 5.0) -> None:
        super().__init__(name="regscale-eval-watcher", daemon=True)
        self.run_dir, self.cfg, self.interval_s = run_dir, cfg, interval_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)

    def run(self) -> None:
        while True:
            self.poll()
            if self._stop_event.wait(self.interval_s):
                self.poll()
                return

    def poll(self) -> None:
        done = {j.step for j in runs.read_jobs(self.run_dir) if j.kind == "eval" and j.step is not None}
        newest = runs.latest_step(self.run_dir)
        for step in sorted(set(self.cfg.eval.at_steps) - done):
            if step > newest or not (self.run_dir / CHECKPOINTS / step_name(step)).is_dir():
                continue
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in DISTRIBUTED_NAMES}
            cmd = [sys.executable, "-m", "regscale.launch.submit", "eval-at", str(self.run_dir), str(step)]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            print(result.stdout + result.stderr, end="", file=sys.stderr, flush=True)
