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
from typing import Any, Iterator, Optional

from regscale.config import Config, load_saved_config
from regscale.errors import UserError
from regscale.fsutil import write_atomic
from regscale.rundir import ATTEMPTS, CHECKPOINTS, CONFIG, JOBS, JOBS_LOCK, step_name, step_of

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
    with open(run_dir / JOBS_LOCK, "w") as lock:
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


# How an attempt ended, besides the Outcome values: a process died, or hung (killed by its node's
# agent), or the whole job ended from outside (the node with the batch script lost, scancel).
FAILED_ENDS = ("failed", "hung", "lost")


@dataclass
class End:
    """One report of how an attempt ended. A multi-process attempt can get several: the rank that
    failed first (the cause) and the ranks that then waited for it in vain (secondary)."""

    end: str
    end_step: Optional[int]
    ended_at: float
    error: Optional[str] = None  # the first line of the error, the signal, or why it was deemed hung
    rank: Optional[int] = None
    host: Optional[str] = None
    signal: Optional[str] = None
    log: Optional[str] = None  # that rank's log
    reached_step: Optional[int] = None  # the last step that rank finished, when known
    secondary: bool = False  # a consequence of another rank's end (a peer's failure)


@dataclass
class Attempt:
    """One start of the training processes (a job start, or an in-job restart: `round`) and how it
    ended (end is None while running, or when nothing could record it)."""

    job_id: str
    restart: int
    start_step: int
    started_at: float
    round: int = 0  # in-job restarts before this attempt, within this start of the job
    world_size: Optional[int] = None
    nodes: Optional[int] = None
    logs: Optional[str] = None  # the folder of its per-rank logs, relative to the run directory
    ends: list[End] = field(default_factory=list)

    @property
    def cause(self) -> Optional[End]:
        """The end that says why the attempt ended: the earliest that is not a consequence."""
        primary = [e for e in self.ends if not e.secondary] or self.ends
        return min(primary, key=lambda e: e.ended_at) if primary else None

    @property
    def end(self) -> Optional[str]:
        return self.cause.end if self.cause else None

    @property
    def end_step(self) -> Optional[int]:
        return self.cause.end_step if self.cause else None

    @property
    def ended_at(self) -> Optional[float]:
        return self.cause.ended_at if self.cause else None

    @property
    def error(self) -> Optional[str]:
        return self.cause.error if self.cause else None


def read_attempts(run_dir: Path) -> list[Attempt]:
    """Attempts in order; an 'end' line belongs to the attempt started last before it."""
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
                attempts.append(Attempt("resume", 0, entry["step"], entry["at"],
                                        ends=[End(RESUMED, entry["step"], entry["at"])]))
            elif attempts:
                attempts[-1].ends.append(End(**entry))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line torn by a crash mid-append (or mangled by hand): that event is unknown
    return attempts


def _append(run_dir: Path, entry: dict) -> None:
    """One line at the end of attempts.jsonl, under a lock: every node's agent may report an end."""
    with open(run_dir / ATTEMPTS, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # the last append was cut short by a crash: start a new line
                f.write(b"\n")
        f.write((json.dumps(entry) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def record_start(run_dir: Path, job_id: str, restart: int, start_step: int, *, round: int = 0,
                 world_size: Optional[int] = None, nodes: Optional[int] = None, logs: Optional[str] = None) -> None:
    _append(run_dir, dict(event="start", job_id=job_id, restart=restart, start_step=start_step,
                          started_at=time.time(), round=round, world_size=world_size, nodes=nodes, logs=logs))


def record_resume(run_dir: Path, step: int) -> None:
    _append(run_dir, dict(event="resume", step=step, at=time.time()))


def record_end(run_dir: Path, end: str, end_step: int, error: Optional[str] = None, **details: Any) -> None:
    """An end of the attempt started last; `details`: the other fields of `End`."""
    _append(run_dir, dict(event="end", **asdict(End(end, end_step, time.time(), error, **details))))
