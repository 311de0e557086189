"""`regscale status` and `regscale cancel`: what the run directories and SLURM say about runs."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from regscale.errors import UserError, debug, expected_failure
from regscale.launch import runs
from regscale.checkpoints import published
from regscale.metrics import IMAGES_PER_S
from regscale.rundir import (CHECKPOINTS, CONFIG, EVAL, EVAL_RECORD, JOB_FOLDER, METRICS, STOP_REPORT, step_name,
                             step_of)



def slurm_states(ids: list[str]) -> dict[str, str]:
    """job id -> SLURM state (sacct; squeue when accounting is off); {} without SLURM."""
    if not ids:
        return {}
    states: dict[str, str] = {}
    if shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            job_id, _, state = line.partition("|")
            states[job_id] = state.split()[0] if state else "?"
    if shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30)
        for line in out.stdout.splitlines():
            job_id, _, state = line.partition("|")
            states[job_id] = state
    return states


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            return record
    return {}


@dataclass
class EvalStatus:
    """One evaluation job: the step it evaluates (None: final), its state, its FID when done."""

    job_id: str
    step: Optional[int]
    state: str
    fid: Optional[float] = None
    comparable: bool = True
    record: Optional[Path] = None


def eval_record_path(run_dir: Path, step: int) -> Path:
    """Where the evaluation of checkpoint `step` writes its record (regscale.eval.job)."""
    return run_dir / EVAL / step_name(step) / EVAL_RECORD


def read_fid(record: Path) -> tuple[Optional[float], bool]:
    """(FID, comparable) from an evaluation record; a random Inception's FID is not comparable."""
    metrics = json.loads(record.read_text()).get("metrics", {})
    if "fid" in metrics:
        return float(metrics["fid"]), True
    if "fid_not_comparable" in metrics:
        return float(metrics["fid_not_comparable"]), False
    return None, True


def local_job_state(run_dir: Path, job_id: str) -> str:
    """State of a submitit local job from its files: the result it left, or its process."""
    import psutil

    folder = run_dir / JOB_FOLDER
    result = folder / f"{job_id}_0_result.pkl"
    if result.is_file():
        with open(result, "rb") as f:
            outcome = pickle.load(f)[0]  # ("success", value) or ("error", traceback), by submitit
        return "COMPLETED" if outcome == "success" else "FAILED"
    if not (folder / f"{job_id}_0_log.err").is_file():
        return "PENDING"
    try:
        alive = any("submitit" in part for part in psutil.Process(int(job_id)).cmdline())
    except (psutil.Error, ValueError):
        alive = False
    return "RUNNING" if alive else "FAILED"  # gone without a result: killed


def eval_status(run_dir: Path, job: runs.JobRecord, slurm: dict[str, str], final_step: int) -> EvalStatus:
    """An evaluation job's state (SLURM's, or the local job's files) and its FID once recorded."""
    record = eval_record_path(run_dir, job.step if job.step is not None else final_step)
    done = record.is_file()  # written at the job's very end
    if job.cluster == "slurm":
        state = slurm.get(job.id, "COMPLETED" if done else "UNKNOWN")
    else:
        state = "COMPLETED" if done else local_job_state(run_dir, job.id)
    status = EvalStatus(job.id, job.step, state)
    if done:
        status.fid, status.comparable = read_fid(record)
        status.record = record
    return status


@dataclass
class RunStatus:
    run_dir: Path
    train_job: str
    state: str
    requeues: int
    step: int
    ckpt_step: int
    max_steps: int
    images_per_s: Optional[float]
    eta_s: Optional[float]
    evals: list[EvalStatus]
    stop_reason: Optional[str]
    checkpoints: list[int]
    attempts: list[runs.Attempt]
    stop_report: Optional[dict]


def run_status(run_dir: Path) -> RunStatus:
    """Everything `regscale status` shows about one run."""
    cfg = runs.load_run_config(run_dir)
    jobs = runs.read_jobs(run_dir)
    states = slurm_states([j.id for j in jobs if j.cluster == "slurm"])
    train = [j for j in jobs if j.kind == "train"]
    attempts = runs.read_attempts(run_dir)
    ckpt = runs.latest_step(run_dir)
    metrics = _last_metrics(run_dir)
    step = max(int(metrics.get("step", 0)), ckpt)
    rate = float(metrics[IMAGES_PER_S]) if IMAGES_PER_S in metrics else None
    current = attempts[-1] if attempts else None
    if rate is None and current and current.end is None and step > current.start_step:
        rate = (step - current.start_step) * cfg.train.batch_size / max(time.time() - current.started_at, 1e-6)
    remaining = cfg.train.max_steps - step
    eta = remaining * cfg.train.batch_size / rate if rate and remaining > 0 else None
    last_train = train[-1] if train else None
    if last_train is None:
        state = "not submitted"
    elif last_train.cluster == "slurm":
        state = states.get(last_train.id, "UNKNOWN")
    else:
        state = current.end.upper() if current and current.end else ("RUNNING" if current else "PENDING")
    report = run_dir / STOP_REPORT
    stop = json.loads(report.read_text()) if report.is_file() else None
    evals = [eval_status(run_dir, j, states, cfg.train.max_steps) for j in jobs if j.kind == "eval"]
    kept = [step_of(p.name) for p in published(run_dir / CHECKPOINTS)]
    return RunStatus(run_dir, last_train.id if last_train else "-", state,
                     sum(a.job_id == last_train.id and a.round == 0 for a in attempts) - 1 if last_train and attempts else 0,
                     step, ckpt, cfg.train.max_steps, rate, eta, evals, stop["reason"] if stop else None,
                     sorted(kept), attempts, stop)


def format_duration(seconds: Optional[float]) -> str:
    """`-`, `4m05s` or `2h07m`."""
    if seconds is None:
        return "-"
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def find_runs(path: Path) -> list[Path]:
    """A run directory itself, or every run directory directly under `path`."""
    if (path / CONFIG).exists():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory (or folder of runs)")
    return sorted(p for p in path.iterdir() if (p / CONFIG).exists())


def _fid(ev: EvalStatus) -> str:
    return "-" if ev.fid is None else f"{ev.fid:.2f}" + ("" if ev.comparable else "*")


def _evaluated(ev: EvalStatus) -> str:
    return "final" if ev.step is None else f"step {ev.step}"


def _when(unix: Optional[float]) -> str:
    return "-" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _attempt_line(number: int, a: runs.Attempt) -> str:
    """When and where an attempt started, and how it ended: the rank, host, signal or first error
    line and log of the process that ended it (the others' ends are their consequences)."""
    if a.job_id == "resume":
        return f"  resumed  {_when(a.started_at)}  regscale resume from step {a.start_step}"
    where = f"job {a.job_id} restart {a.restart}" + (f" round {a.round}" if a.round else "")
    size = f", {a.world_size} processes" if a.world_size else ""
    cause = a.cause
    if cause is None:
        end = "running (or killed without a record)"
    else:
        end = f"{cause.end} at step {cause.end_step} ({_when(cause.ended_at)})"
        if cause.end in runs.FAILED_ENDS:
            who = f"rank {cause.rank} on {cause.host}: " if cause.rank is not None else ""
            end += f": {who}{cause.error or 'no error recorded'}"
            others = len(a.ends) - 1
            if others:
                end += f" (+{others} other rank{'s' if others > 1 else ''} ended with it)"
            if cause.log:
                end += f"; log {cause.log}"
    return f"  attempt {number:<2} {_when(a.started_at)}  {where}{size}, from step {a.start_step} -> {end}"


def _detail(st: RunStatus) -> list[str]:
    lines = [f"  run dir          {st.run_dir}",
             f"  checkpoints      {', '.join(map(str, st.checkpoints)) or 'none yet'}"
             + (f" (newest: step {st.ckpt_step})" if st.checkpoints else "")]
    numbered = [a for a in st.attempts if a.job_id != "resume"]
    lines += [_attempt_line(numbered.index(a) + 1 if a in numbered else 0, a) for a in st.attempts]
    if numbered:
        lines.append(f"  logs             regscale logs {st.run_dir} [--attempt K] [--rank R] [--follow]")
    for ev in st.evals:
        lines.append(f"  eval job {ev.job_id:<8} {_evaluated(ev):<12} {ev.state:<10} FID {_fid(ev)}"
                     + (f"  {ev.record}" if ev.record else ""))
    if st.stop_report:
        r = st.stop_report
        skipped = r.get("skipped_steps")
        skipped = f", skipped steps: {skipped}" if type(skipped) is int else ""
        lines.append(f"  STOPPED at step {r.get('step')} ({_when(r.get('stopped_at'))}, job {r.get('job_id')}, "
                     f"{r.get('attempts')} attempts{skipped}): {r.get('reason')}")
        lines.append(f"  to continue      {r.get('resume')}")
    return lines + _efficiency(st.run_dir)


def _efficiency(run_dir: Path) -> list[str]:
    """The goodput breakdown (SLURM's accounting included) and the lagging ranks, if any."""
    from regscale.launch.goodput import format_breakdown, run_goodput
    from regscale.train.stragglers import straggler_lines

    cfg = runs.load_run_config(run_dir)
    try:
        lines = format_breakdown(run_goodput(run_dir, cfg.world_size))
    except (OSError, ValueError, subprocess.SubprocessError) as err:  # sacct away or answering nonsense
        lines = [f"  goodput          unavailable: {type(err).__name__}: {err}"]
    return lines + straggler_lines(run_dir, cfg.train.straggler_factor, cfg.train.straggler_windows)


HEADER = (f"{'run':<28} {'train job':<12} {'state':<12} {'requeues':>8} {'step':>15} {'img/s':>8} "
          f"{'ETA':>8}  evaluations (state, FID)")


def format_run(st: RunStatus, detail: bool) -> list[str]:
    """One run's row (and, with `detail`, its detail lines)."""
    rate = f"{st.images_per_s:.1f}" if st.images_per_s else "-"
    evals = ", ".join(f"{_evaluated(ev)} {ev.state} {_fid(ev)}" for ev in st.evals)
    lines = [f"{st.run_dir.name:<28} {st.train_job:<12} {st.state:<12} {max(st.requeues, 0):>8} "
             f"{f'{st.step}/{st.max_steps}':>15} {rate:>8} {format_duration(st.eta_s):>8}  {evals or '-'}"]
    if detail:
        lines += _detail(st)
    elif st.stop_reason:
        lines.append(f"  STOPPED: {st.stop_reason}")
    if any(not ev.comparable for ev in st.evals):
        lines.append("  * FID from a random Inception network (eval.random_inception): not comparable")
    return lines


def _unreadable(run_dir: Path, err: Exception) -> str:
    """The row of a run whose files cannot be read: its name and what is wrong."""
    reason = expected_failure(err) or f"{type(err).__name__}: {err}"
    return f"{run_dir.name:<28} UNREADABLE   {reason}"


def status(path: Path) -> int:
    """`regscale status [RUN_DIR]`: every run is shown, also when another one's files are corrupt."""
    found = find_runs(path)
    if not found:
        print(f"no runs under {path}")
        return 0
    shown, broken = [HEADER], []
    for run_dir in found:
        try:
            shown += format_run(run_status(run_dir), detail=len(found) == 1)
        except Exception as err:  # any corrupt file of one run (config, records, metrics): show the rest
            if debug():
                traceback.print_exc()
            broken.append(_unreadable(run_dir, err))
    print("\n".join([*shown, *broken]))
    return 0


def cancel(run_dir: Path) -> int:
    """`regscale cancel RUN_DIR`: scancel every job of the run that SLURM still holds."""
    runs.load_run_config(run_dir)
    jobs = runs.read_jobs(run_dir)
    slurm_ids = [j.id for j in jobs if j.cluster == "slurm"]
    if not slurm_ids:
        raise UserError(f"{run_dir}: no SLURM jobs recorded (a local run stops with Ctrl-C in its terminal)")
    if shutil.which("scancel") is None:
        raise UserError("'scancel' is not on PATH: cannot cancel SLURM jobs from this machine")
    active = [j for j, state in slurm_states(slurm_ids).items()
              if state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")]
    if not active:
        print(f"{run_dir.name}: no active jobs")
        return 0
    result = subprocess.run(["scancel", *active], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise UserError(f"scancel {' '.join(active)}: {result.stderr.strip()}")
    print(f"{run_dir.name}: cancelled {', '.join(active)}")
    return 0
