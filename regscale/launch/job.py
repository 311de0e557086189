"""What runs inside a job: the training callable (requeued through submitit) and the evaluation one.

Every task (one per GPU) runs `TrainJob()`. It exports the torch.distributed variables, calls
`regscale.train.loop.train(cfg, run_dir, tracker)` (which always resumes from the newest checkpoint,
so an outside `scontrol requeue` resumes too) and acts on its answer:

- "completed": the job ends; the chained evaluation job (afterok) may start;
- "preempted" / "deadline": a checkpoint was saved; rank 0 requeues the job through submitit's own
  signal handler (checkpoint() -> pickle -> `scontrol requeue` -> exit);
- an exception: rank 0 requeues as well, unless the run keeps failing at the same checkpoint step.

Requeues are bounded by slurm.max_requeues and counted in attempts.jsonl; a run that hits the bound
or fails slurm.max_failures_at_step times in a row from the same step stops: stop_report.json says
why, the job fails, and SLURM cancels the evaluation job that depends on it.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from regscale.config import Config
from regscale.fsutil import write_atomic
from regscale.launch import runs
from regscale.rundir import CHECKPOINTS, step_name

REQUEUE_ENDS = ("preempted", "deadline")
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
        if attempt.start_step != start_step or attempt.end in REQUEUE_ENDS + ("completed", "resumed"):
            break
        failed.append(attempt)  # ended with an error, or killed without recording an end
    if len(failed) >= s.max_failures_at_step:
        last = next((a.error for a in failed if a.error), None) or "killed without an error (see the job logs)"
        return (f"{len(failed)} attempts in a row failed from the checkpoint at step {start_step} "
                f"(slurm.max_failures_at_step={s.max_failures_at_step}); last error: {last}")
    return None


def write_stop_report(run_dir: Path, reason: str, step: int) -> None:
    """stop_report.json: why the launcher stopped the run, for `regscale status` and humans."""
    report = dict(reason=reason, step=step, stopped_at=time.time(),
                  job_id=os.environ.get("SLURM_JOB_ID"),
                  attempts=len(runs.read_attempts(run_dir)),
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


def open_tracker(cfg: Config, run_dir: Path, *, attach: bool = False) -> Any:
    """The run's MLflow tracker (rank 0 only): `attach` adds to the training run without owning it
    (evaluation jobs)."""
    from regscale.track.mlflow import Tracker

    return Tracker.attach(cfg, run_dir) if attach else Tracker.open(cfg, run_dir)


def _entry(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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


def _requeue(handler: Any) -> None:
    """Requeue through submitit's USR2 handler (installed before the callable ran); exits the process."""
    if getattr(handler, "__name__", "") != "checkpoint_and_try_requeue":
        raise RuntimeError("not running under submitit's job runner: cannot requeue")
    if _being_cancelled():
        print("regscale: the job is being cancelled: not requeueing", file=sys.stderr, flush=True)
        return
    handler(signal.SIGUSR2, None)


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


class TrainJob(submitit.helpers.Checkpointable):
    """The training job of one run directory (picklable; the same pickle serves every requeue).

    entry: "module:function" called as entry(cfg, run_dir, tracker) -> status; the training loop
    by default.
    """

    def __init__(self, run_dir: str, entry: str = "regscale.train.loop:train") -> None:
        self.run_dir = run_dir
        self.entry = entry

    def __call__(self) -> str:
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's, before train() installs its own
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
            status = _entry(self.entry)(cfg, run_dir, open_tracker(cfg, run_dir) if rank0 else None)
        except Exception as err:
            if rank0:
                self._after_failure(run_dir, cfg, err, restarts, requeue_handler)
            else:  # give rank 0 time to record the failure and requeue before srun ends the step
                time.sleep(FAILURE_GRACE_S)
            raise
        finally:
            if watcher:
                watcher.stop()
        if rank0:
            step = runs.latest_step(run_dir)
            runs.record_end(run_dir, status, step)
            if status in REQUEUE_ENDS:
                reason = stop_reason([], step, restarts + 1, cfg)
                if reason:
                    write_stop_report(run_dir, reason, step)
                    raise RunStopped(reason)
                print(f"regscale: {status} at step {step}: requeueing (requeue {restarts + 1} of at "
                      f"most {cfg.slurm.max_requeues})", flush=True)
                _requeue(requeue_handler)
        return status

    def _after_failure(self, run_dir: Path, cfg: Config, err: Exception, restarts: int,
                       requeue_handler: Any) -> None:
        """Record the failure; requeue unless the run is failing over and over at the same step."""
        step = runs.latest_step(run_dir)
        runs.record_end(run_dir, "failed", step, error=f"{type(err).__name__}: {err}")
        traceback.print_exc()
        reason = stop_reason(runs.read_attempts(run_dir), step, restarts + 1, cfg)
        if reason:
            write_stop_report(run_dir, reason, step)
            return
        print(f"regscale: training failed at step {step}; requeueing to retry from the newest "
              "checkpoint", file=sys.stderr, flush=True)
        _requeue(requeue_handler)


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
