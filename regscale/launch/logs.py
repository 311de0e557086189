"""`regscale logs RUN [--attempt K] [--rank R] [--follow]`: the log of one process of one attempt,
found from attempts.jsonl (the attempts are numbered as `regscale status RUN` shows them).

By default: the newest attempt, and in it the rank that ended it (rank 0 when it ended in order).
Attempts recorded before per-rank logs existed fall back to the job's own log (node 0's task).
`--follow` prints lines as they come and, without --attempt, moves on to the next attempt's log
when an in-job restart or a requeue starts one, until the run stops.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from regscale.errors import UserError
from regscale.launch import runs
from regscale.rundir import JOB_FOLDER, STOP_REPORT

POLL_S = 0.5


def log_of(run_dir: Path, attempt: runs.Attempt, rank: Optional[int]) -> tuple[Path, int]:
    """The log file of `rank` (default: the rank that ended the attempt, else 0) and that rank."""
    cause = attempt.cause
    if rank is None:
        rank = cause.rank if cause and cause.rank is not None and cause.end in runs.FAILED_ENDS else 0
    if rank < 0 or (attempt.world_size is not None and rank >= attempt.world_size):
        size = f"{attempt.world_size} processes (ranks 0 to {attempt.world_size - 1})" if attempt.world_size else "ranks from 0"
        raise UserError(f"--rank {rank}: that attempt ran {size}")
    if attempt.logs is None:  # before per-rank logs: the job's log of node 0
        return run_dir / JOB_FOLDER / f"{attempt.job_id}_0_log.err", rank
    return run_dir / attempt.logs / f"rank{rank:05d}.log", rank


def pick(run_dir: Path, number: Optional[int]) -> tuple[int, runs.Attempt]:
    """(1-based number, attempt): `number`, or the newest attempt that ran processes."""
    attempts = [a for a in runs.read_attempts(run_dir) if a.job_id != "resume"]
    if not attempts:
        raise UserError(f"{run_dir}: no attempt has started yet (regscale status {run_dir})")
    if number is None:
        return len(attempts), attempts[-1]
    if not 1 <= number <= len(attempts):
        raise UserError(f"--attempt {number}: {run_dir} has {len(attempts)} attempt"
                        f"{'s' if len(attempts) > 1 else ''} (1 to {len(attempts)}; regscale status {run_dir})")
    return number, attempts[number - 1]


def _header(number: int, attempt: runs.Attempt, rank: int, path: Path) -> str:
    round_ = f" round {attempt.round}" if attempt.round else ""
    return f"== attempt {number} (job {attempt.job_id}{round_}), rank {rank}: {path}"


def _copy(f: TextIO) -> None:
    for line in iter(f.readline, ""):
        sys.stdout.write(line)
    sys.stdout.flush()


def logs(run_dir: Path, attempt: Optional[int] = None, rank: Optional[int] = None, follow: bool = False) -> int:
    """Print (and with `follow`, keep printing) the log of one process of one attempt."""
    runs.load_run_config(run_dir)
    number, chosen = pick(run_dir, attempt)
    path, shown_rank = log_of(run_dir, chosen, rank)
    while True:
        if not path.is_file():
            if not follow:
                raise UserError(f"no log at {path} (that process may not have started, or its log was removed)")
            time.sleep(POLL_S)
            continue
        print(_header(number, chosen, shown_rank, path), file=sys.stderr, flush=True)
        with open(path, errors="replace") as f:
            _copy(f)
            if not follow:
                return 0
            while True:
                time.sleep(POLL_S)
                _copy(f)
                current = [a for a in runs.read_attempts(run_dir) if a.job_id != "resume"]
                if attempt is None and len(current) > number:  # a restart: follow the new attempt
                    number, chosen = len(current), current[-1]
                    path, shown_rank = log_of(run_dir, chosen, rank)
                    break
                if _stopped(run_dir, current[number - 1]):
                    _copy(f)
                    return 0


def _stopped(run_dir: Path, attempt: runs.Attempt) -> bool:
    """The run will write no more to this attempt: it completed, was interrupted, or stopped."""
    return attempt.end in ("completed", "interrupted") or (run_dir / STOP_REPORT).is_file()
