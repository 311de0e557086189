"""Run-directory bookkeeping of the launcher: jobs.json (what was submitted) and attempts.jsonl
(what each start of the training job did), plus the newest checkpoint step.

jobs.json is rewritten atomically under a lock (the CLI and the running training job both add
entries); attempts.jsonl is appended by rank 0 of the training job only.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from regscale.config import Config, load_saved_config
from regscale.errors import UserError
from regscale.fsutil import write_atomic
from regscale.rundir import CHECKPOINTS, CONFIG, step_name, step_of

JOBS = "jobs.json"
ATTEMPTS = "attempts.jsonl"
STOP_REPORT = "stop_report.json"
RESUMED = "resumed"  # the end recorded for `regscale resume`: a fresh streak of attempts


def run_dir_of(cfg: Config) -> Path:
    """<run.dir>/<run.name>, absolute (jobs run from another working directory)."""
    return (Path(cfg.run.dir) / str(cfg.run.name)).resolve()


def load_run_config(run_dir: Path) -> Config:
    """The resolved configuration saved in a run directory."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no {CONFIG})")
    return load_saved_config(path)


def latest_step(run_dir: Path) -> int:
    """Step of the newest published checkpoint directory (step_XXXXXXXX), 0 when there is none.
    The directory names are the truth; `checkpoints/latest` only points at the newest of them."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return 0
    steps = [step for p in root.iterdir() if (step := step_of(p.name)) is not None and p.is_dir()]
    return max(steps, default=0)


def skipped_steps(run_dir: Path) -> Optional[int]:
    """Steps skipped for an inf/nan gradient (fp16 overflows included) up to the newest published
    checkpoint, from its manifest; None when there is none or it cannot be read."""
    try:
        manifest = json.loads((run_dir / CHECKPOINTS / step_name(latest_step(run_dir)) / "manifest.json").read_text())
        return int(manifest["health"]["nonfinite_total"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


@dataclass
class JobRecord:
    """One submitted job: kind is train or eval; step is the evaluated step (None: final)."""

    id: str
    kind: str
    cluster: str
    submitted_at: float = field(default_factory=time.time)
    step: Optional[int] = None
    depends_on: Optional[str] = None


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    with open(run_dir / ".jobs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_jobs(run_dir: Path) -> list[JobRecord]:
    """Every job submitted for this run, oldest first ([] before the first submission)."""
    path = run_dir / JOBS
    if not path.exists():
        return []
    try:
        return [JobRecord(**entry) for entry in json.loads(path.read_text())["jobs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable job record ({err})") from None


def add_jobs(run_dir: Path, records: list[JobRecord]) -> None:
    """Append job records to jobs.json (atomic, safe against concurrent writers)."""
    with _locked(run_dir):
        jobs = read_jobs(run_dir) + records
        write_atomic(run_dir / JOBS, json.dumps({"jobs": [asdict(j) for j in jobs]}, indent=1) + "\n")


@dataclass
class Attempt:
    """One start of the training job and how it ended (end is None while running or if killed)."""

    job_id: str
    restart: int
    start_step: int
    started_at: float
    end: Optional[str] = None
    end_step: Optional[int] = None
    ended_at: Optional[float] = None
    error: Optional[str] = None


def read_attempts(run_dir: Path) -> list[Attempt]:
    """Attempts in order; an 'end' line completes the attempt started last by the same job."""
    path = run_dir / ATTEMPTS
    attempts: list[Attempt] = []
    if not path.is_file():
        return attempts
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            event = entry.pop("event")
            if event == "start":
                attempts.append(Attempt(**entry))
            elif event == "resume":  # `regscale resume`: a fresh start, whatever failed before
                attempts.append(Attempt("resume", 0, entry["step"], entry["at"], RESUMED, entry["step"],
                                        entry["at"]))
            elif attempts:
                end = (entry["end"], entry["end_step"], entry["ended_at"], entry.get("error"))
                attempts[-1].end, attempts[-1].end_step, attempts[-1].ended_at, attempts[-1].error = end
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line torn by a crash mid-append (or mangled by hand): that event is unknown
    return attempts


def _append(run_dir: Path, entry: dict) -> None:
    with open(run_dir / ATTEMPTS, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # the last append was cut short by a crash: start a new line
                f.write(b"\n")
        f.write((json.dumps(entry) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def record_start(run_dir: Path, job_id: str, restart: int, start_step: int) -> None:
    _append(run_dir, dict(event="start", job_id=job_id, restart=restart, start_step=start_step,
                          started_at=time.time()))


def record_resume(run_dir: Path, step: int) -> None:
    _append(run_dir, dict(event="resume", step=step, at=time.time()))


def record_end(run_dir: Path, end: str, end_step: int, error: Optional[str] = None) -> None:
    _append(run_dir, dict(event="end", end=end, end_step=end_step, ended_at=time.time(), error=error))
