"""What runs inside a job: the training callable (requeued by `scontrol requeue`) and the evaluation one.

The training job runs one task per node: `TrainJob()`, that node's agent (regscale.launch.agent),
which starts one training process per GPU and restarts the group inside the allocation when a
process dies or hangs (slurm.max_restarts per job start). Each process trains with
`regscale.train.loop.train`, which always resumes from the newest valid checkpoint. Node 0's
TrainJob acts on how the group ended:

- completed: the job ends; the chained evaluation job (afterok) may start;
- preempted / deadline: a checkpoint was saved; it requeues the job (`scontrol requeue`; under the
  local executor, submitit's restart code) and the next start resumes from it;
- interrupted (SIGINT): a checkpoint was saved; the job fails without a requeue (stop_report.json);
- failed for good (in-job restarts used up, too few nodes left for the rendezvous): it requeues
  as well, unless the run keeps failing at the same checkpoint step.
- halted (the loop saved a checkpoint and stopped itself: fp16's loss scale collapsed; its rank 0
  wrote stop_report.json): never restarted or requeued, a retry would stop again.

The bounds: slurm.max_restarts in-job restarts per job start, slurm.max_requeues job starts,
slurm.max_failures_at_step attempts in a row failing from the same step (in-job restarts and
requeues alike), all counted in attempts.jsonl. A run that hits one stops: stop_report.json says
why (the last error), the job fails, and SLURM cancels the evaluation job that depends on it. An
attempt that nobody could record the end of (the node running the batch script lost, scancel) gets
its end from SLURM's accounting at the next start.
"""

from __future__ import annotations

import datetime
import functools
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
from regscale.errors import UserError, first_line
from regscale.fsutil import write_atomic
from regscale.launch import runs
from regscale.outcome import Outcome
from regscale.rundir import CHECKPOINTS, EVAL, JOB_FOLDER, STOP_REPORT, step_name

if TYPE_CHECKING:
    from regscale.launch.agent import NodeJob
    from regscale.track.mlflow import Tracker

RENDEZVOUS_FILE_S = 600.0  # how long the other nodes wait for node 0 to say where the rendezvous is
NOT_FAILED = (*(o.value for o in Outcome if o is not Outcome.FAILED), runs.RESUMED)  # attempts.jsonl ends
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


def halted_reason(run_dir: Path, attempts: list[runs.Attempt]) -> Optional[str]:
    """Why the loop stopped the run itself in its newest attempt (a stop report written since that
    attempt started: an fp16 loss scale that collapsed), or None."""
    report = run_dir / STOP_REPORT
    if not attempts or not report.is_file() or report.stat().st_mtime < attempts[-1].started_at:
        return None
    try:
        return str(json.loads(report.read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return "stopped (stop_report.json unreadable)"


def check_round_start(run_dir: Path, cfg: Config, node: NodeJob, restarts: int, step: int, round_: int) -> None:
    """Every node's agent, before each round of this job start (all read the same records): raise
    RunStopped when the run must stop (a halt, a bound reached), writing the stop report. The round's
    own start, which node 0's agent may have recorded already, is not a failed attempt."""
    this = (node.job_id, node.restart, round_)
    attempts = [a for a in runs.read_attempts(run_dir) if (a.job_id, a.restart, a.round) != this]
    halted = halted_reason(run_dir, attempts)
    if halted:
        raise RunStopped(halted)
    reason = stop_reason(attempts, step, restarts, cfg)
    if reason:
        write_stop_report(run_dir, reason, step)
        raise RunStopped(reason)


def write_stop_report(run_dir: Path, reason: str, step: int) -> None:
    """stop_report.json: why the launcher stopped the run, for `regscale status` and humans, with
    the newest checkpoint's count of skipped steps (inf/nan gradients, fp16 overflows included)."""
    report = dict(reason=reason, step=step, stopped_at=time.time(),
                  job_id=os.environ.get("SLURM_JOB_ID"),
                  attempts=len(runs.read_attempts(run_dir)),
                  skipped_steps=runs.skipped_steps(run_dir),
                  resume=f"fix the cause, then: regscale resume {run_dir}")
    write_atomic(run_dir / STOP_REPORT, json.dumps(report, indent=1) + "\n")
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
    """The training job of one run directory (picklable; the same pickle serves every requeue):
    one task per node, each that node's agent."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> str:
        from regscale.launch.agent import run_agent

        env = job_environment()
        export_deadline()
        run_dir = Path(self.run_dir)
        cfg = runs.load_run_config(run_dir)
        node = node_job(env, run_dir)
        rank0 = node.node_rank == 0
        restarts = node.restart  # job starts before this one: the requeue bound
        if rank0:
            attempts = runs.read_attempts(run_dir)
            restarts = max(restarts, sum(a.job_id == node.job_id and a.round == 0 for a in attempts))
            close_unrecorded(run_dir, attempts)

        watcher = EvalWatcher(run_dir, cfg) if rank0 and env.cluster == "slurm" and cfg.eval.at_steps else None
        if watcher:
            watcher.start()
        try:
            failure = run_agent(cfg, run_dir, node, functools.partial(check_round_start, run_dir, cfg, node, restarts))
        except RunStopped:
            raise
        except Exception as err:  # no rendezvous (too few nodes), the agent itself failed
            traceback.print_exc()
            if rank0:
                cause = f" ({first_line(err.__cause__)})" if err.__cause__ else ""
                self._after_failure(env, run_dir, cfg, f"{type(err).__name__}: {first_line(err)}{cause}", restarts)
            raise
        finally:
            if watcher:
                watcher.stop()
        if not rank0:
            return "node done"
        if failure:
            self._after_failure(env, run_dir, cfg, failure, restarts)
            raise RunStopped(failure)
        attempts = runs.read_attempts(run_dir)
        outcome = Outcome(attempts[-1].end) if attempts and attempts[-1].end in Outcome._value2member_map_ \
            else Outcome.COMPLETED
        step = runs.latest_step(run_dir)
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

    def _after_failure(self, env: submitit.JobEnvironment, run_dir: Path, cfg: Config, error: str,
                       restarts: int) -> None:
        """The group failed for good in this job start: requeue, unless the run keeps failing at
        the same step or has used up its requeues (then the stop report says why)."""
        step = runs.latest_step(run_dir)
        attempts = runs.read_attempts(run_dir)
        if attempts and not attempts[-1].ends:  # the agent failed before its processes could say why
            runs.record_end(run_dir, Outcome.FAILED.value, step, error)
        reason = stop_reason(runs.read_attempts(run_dir), step, restarts + 1, cfg)
        if reason:
            write_stop_report(run_dir, reason, step)
            return
        print(f"regscale: training failed at step {step} ({error}); requeueing to retry from the newest "
              "checkpoint", file=sys.stderr, flush=True)
        requeue(env, Outcome.FAILED)


def node_job(env: submitit.JobEnvironment, run_dir: Path) -> NodeJob:
    """This task's node in the training job (one task per node), and where the rendezvous is: on
    SLURM node 0 takes a free port and tells the other nodes through the run directory (a port
    derived from the job id could be any process's on a shared node)."""
    from regscale.launch.agent import NodeJob, free_port

    if env.cluster != "slurm":
        return NodeJob(env.job_id, 0, 0, 1, "127.0.0.1", free_port())
    job = os.environ.get("SLURM_JOB_ID", env.job_id)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    where = run_dir / JOB_FOLDER / f"{job}.{restart}.rendezvous"
    if env.global_rank == 0:
        write_atomic(where, f"{env.hostnames[0]}:{free_port()}\n")
    host, port = wait_for_file(where, RENDEZVOUS_FILE_S).strip().rsplit(":", 1)
    return NodeJob(job, restart, env.global_rank, env.num_nodes, host, int(port))


def wait_for_file(path: Path, timeout_s: float) -> str:
    """The text of `path` once it exists (another node writes it), or a UserError after timeout_s."""
    end = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > end:
            raise UserError(f"{path} did not appear within {timeout_s:.0f} s: node 0 of the job did not start "
                            "(its log in the same folder says why)")
        time.sleep(0.5)
    return path.read_text()


def exit_status(job_folder: Path, srun_status: int) -> int:
    """The exit status of a training job's batch script (the lines after srun): 0 when the run's
    newest attempt completed training, else srun's. A job that went on after losing a node has a
    killed task, so srun fails although training completed."""
    if srun_status == 0:
        return 0
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    name = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")
    try:
        job = submitit.helpers.DelayedSubmission.load(job_folder / f"{name}_submitted.pkl").function
        attempts = runs.read_attempts(Path(job.run_dir))
    except (OSError, AttributeError, ValueError, EOFError):
        return srun_status
    return 0 if attempts and attempts[-1].end == Outcome.COMPLETED.value else srun_status


def close_unrecorded(run_dir: Path, attempts: list[runs.Attempt]) -> None:
    """The newest attempt has no end: the job ended from outside before anything recorded it (the
    node with the batch script lost, scancel, a kill). Record it from SLURM's accounting."""
    if not attempts or attempts[-1].ends or attempts[-1].job_id == "resume":
        return
    last = attempts[-1]
    state = _accounted_state(last.job_id)
    runs.record_end(run_dir, "lost", runs.latest_step(run_dir),
                    f"ended from outside (SLURM: {state})" if state else "ended from outside, unrecorded")


def _accounted_state(job_id: str) -> Optional[str]:
    """The state SLURM's accounting gives the newest finished run of a job (NODE_FAIL, CANCELLED, ...)."""
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State,End"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ended = [line.split("|")[0].split()[0] for line in out.splitlines()
             if line.strip() and not line.endswith("|Unknown")]
    return ended[-1] if ended else None


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
            return evaluate(cfg, run_dir, run_dir / EVAL / step_name(step), step, tracker)
        finally:
            if tracker is not None:
                if self.step is None:  # the chained evaluation: the lineage's last goodput
                    from regscale.launch.goodput import log_goodput

                    log_goodput(tracker, run_dir, cfg.world_size, step)
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


if __name__ == "__main__":  # the batch script's last line: python -m regscale.launch.job exit-status FOLDER RC
    if len(sys.argv) != 4 or sys.argv[1] != "exit-status":
        sys.exit("usage: python -m regscale.launch.job exit-status JOB_FOLDER SRUN_EXIT_STATUS")
    sys.exit(exit_status(Path(sys.argv[2]), int(sys.argv[3])))
