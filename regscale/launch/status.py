"""`regscale status` and `regscale cancel`: what the run directories and SLURM say about runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from regscale.errors import UserError
from regscale.launch import runs
from regscale.metrics import IMAGES_PER_S



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
    path = run_dir / "metrics.jsonl"
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
    evals: list[tuple[str, Optional[int], str]]
    stop_reason: Optional[str]


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
    report = run_dir / runs.STOP_REPORT
    stop = json.loads(report.read_text())["reason"] if report.is_file() else None
    evals = [(j.id, j.step, states.get(j.id, "local" if j.cluster == "local" else "UNKNOWN"))
             for j in jobs if j.kind == "eval"]
    return RunStatus(run_dir, last_train.id if last_train else "-", state,
                     sum(a.job_id == last_train.id for a in attempts) - 1 if last_train and attempts else 0,
                     step, ckpt, cfg.train.max_steps, rate, eta, evals, stop)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def find_runs(path: Path) -> list[Path]:
    """A run directory itself, or every run directory directly under `path`."""
    if (path / "config.yaml").is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory (or folder of runs)")
    return sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())


def format_status(items: list[RunStatus], detail: bool) -> str:
    header = f"{'run':<28} {'train job':<12} {'state':<12} {'requeues':>8} {'step':>15} {'img/s':>8} {'ETA':>8}"
    lines = [header]
    for st in items:
        rate = f"{st.images_per_s:.1f}" if st.images_per_s else "-"
        lines.append(f"{st.run_dir.name:<28} {st.train_job:<12} {st.state:<12} {max(st.requeues, 0):>8} "
                     f"{f'{st.step}/{st.max_steps}':>15} {rate:>8} {_duration(st.eta_s):>8}")
        if detail:
            lines.append(f"  run dir          {st.run_dir}")
            lines.append(f"  last checkpoint  step {st.ckpt_step}")
            for job_id, step, state in st.evals:
                lines.append(f"  eval job {job_id:<8} {'final' if step is None else f'step {step}':<12} {state}")
        if st.stop_reason:
            lines.append(f"  STOPPED: {st.stop_reason}")
    return "\n".join(lines)


def status(path: Path) -> int:
    """`regscale status [RUN_DIR]`."""
    found = find_runs(path)
    if not found:
        print(f"no runs under {path}")
        return 0
    print(format_status([run_status(d) for d in found], detail=len(found) == 1))
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
