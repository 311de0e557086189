"""Goodput: how much of the GPU time a run's allocations held went into training steps that count,
and where the rest went, across every attempt, in-job restart and requeue.

    effective training time ratio = GPU-seconds in steps that count / GPU-seconds allocated

From what the run already records: attempts.jsonl (each start of the training processes and how
it ended), metrics.jsonl (rank 0: the first step's time, per log window the mean step time, per
published checkpoint the loop's stall), jobs.json and SLURM's accounting (`sacct -D`: every
requeued instance of a job with its submit, start and end times and its GPUs). Each allocation's
span is cut into consecutive parts, so the parts add up to its wall time by construction; what the
records do not explain is `other`, reported rather than hidden:

    startup     allocation start (or in-job restart) until the end of the first step: launch,
                model build, data, resume, compile
    productive  steps that count (the first step of each start is start-up)
    checkpoint  the loop waiting for saves (ckpt/stall_s)
    recomputed  steps done but lost: after the newest checkpoint when a start failed
    restart     fault detection and restart: from a failed start's last step to the next start
                (or the end of its allocation)
    stop        after a clean end (completed, preempted, deadline): flush, exit, release
    evaluation  the allocations of chained evaluation jobs
    other       the rest of a start's span between its first and last step: the per-step
                agreement, logging, what the estimates of unlogged steps missed
    queue       waiting for an allocation (not allocated: outside the ratio, beside it)

Without SLURM accounting (local runs) an allocation is the span from a job's submission to its last
start's end. All parts are GPU-seconds: seconds x the allocation's GPUs (AllocTRES gres/gpu, else
the start's world size).
"""

from __future__ import annotations

import bisect
import datetime
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from regscale import metrics as M
from regscale.fsutil import read_jsonl
from regscale.launch import runs
from regscale.rundir import ATTEMPTS, METRICS

if TYPE_CHECKING:
    from regscale.track.mlflow import Tracker

log = logging.getLogger("regscale.launch")

PARTS = ("productive", "startup", "checkpoint", "recomputed", "restart", "stop", "evaluation", "other")
LABELS = {"productive": "steps that count", "startup": "start until the first step",
          "checkpoint": "checkpoint stall", "recomputed": "steps recomputed after a fault",
          "restart": "fault detection and restart", "stop": "stop and teardown",
          "evaluation": "chained evaluation", "other": "other (agreement, logging)",
          "queue": "queue wait (not allocated)"}
FAULT_ENDS = ("failed", "hung", "lost")  # an end after which steps since the checkpoint are lost
SACCT_FIELDS = "JobID,Submit,Start,End,AllocTRES"


@dataclass(frozen=True)
class Allocation:
    """One allocation of a job (a `sacct -D` row: requeued instances are rows of their own)."""

    job_id: str
    submit: Optional[float]
    start: Optional[float]  # None: never started
    end: Optional[float]  # None: still running
    gpus: Optional[int]  # gres/gpu of AllocTRES, None when SLURM does not count GPUs


def _unix(text: str) -> Optional[float]:
    if text in ("", "Unknown", "None", "N/A"):
        return None
    return datetime.datetime.fromisoformat(text).timestamp()  # SLURM's local time


def _gpus(tres: str) -> Optional[int]:
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu":
            return int(value)
    return None


def parse_sacct(text: str) -> list[Allocation]:
    """`sacct -n -P -X -D -o JobID,Submit,Start,End,AllocTRES` output, one row per line."""
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            job_id, submit, start, end, tres = parts
            rows.append(Allocation(job_id, _unix(submit), _unix(start), _unix(end), _gpus(tres)))
    return rows


def sacct_allocations(job_ids: list[str], timeout_s: float = 30.0) -> list[Allocation]:
    """Every allocation SLURM's accounting holds for these jobs ([] without sacct)."""
    if not job_ids or not shutil.which("sacct"):
        return []
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-o", SACCT_FIELDS, "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=timeout_s,
                         env={**os.environ, "SLURM_TIME_FORMAT": "standard"})
    return parse_sacct(out.stdout)


@dataclass
class Start:
    """One start of the training processes (attempts.jsonl), read tolerantly: older records lack
    round, world_size and reached_step."""

    job_id: str
    started_at: float
    start_step: int
    world_size: Optional[int] = None
    end: Optional[str] = None
    end_step: Optional[int] = None
    reached_step: Optional[int] = None
    ended_at: Optional[float] = None


def starts_of(events: list[dict]) -> list[Start]:
    """The starts in attempts.jsonl events, each with its end when recorded ('resume' lines of
    `regscale resume` are not starts)."""
    starts: list[Start] = []
    for e in events:
        try:
            if e.get("event") == "start":
                starts.append(Start(str(e["job_id"]), float(e["started_at"]), int(e["start_step"]),
                                    e.get("world_size")))
            elif e.get("event") == "end" and starts and starts[-1].end is None:
                s = starts[-1]
                s.end, s.end_step, s.ended_at = str(e["end"]), int(e["end_step"]), float(e["ended_at"])
                s.reached_step = e.get("reached_step")
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(starts, key=lambda s: s.started_at)


@dataclass
class Breakdown:
    """GPU-seconds per part (PARTS, plus queue beside them) of a run."""

    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    queue: float = 0.0

    @property
    def allocated(self) -> float:
        return sum(self.parts.values())

    @property
    def ratio(self) -> Optional[float]:
        return self.parts["productive"] / self.allocated if self.allocated > 0 else None

    def add(self, part: str, seconds: float, gpus: int) -> None:
        self.parts[part] += seconds * gpus


@dataclass
class _Logged:
    """What metrics.jsonl says about one start: its first step and its logged step times."""

    first_step_at: Optional[float] = None
    first_step_s: float = 0.0
    step_time: float = 0.0  # over the logged windows, the first step excluded
    logged_steps: int = 0  # steps in those windows, the first excluded
    last_step: Optional[int] = None
    last_logged_at: Optional[float] = None
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (when the save began, stall_s)
    copy_wait: float = 0.0  # of the stalls, the part spent inside steps


def _logged(rows: list[dict], start_step: int) -> _Logged:
    w = _Logged()
    previous = start_step
    for row in rows:
        if M.FIRST_STEP_S in row and w.first_step_at is None:
            w.first_step_at = float(row["time"])
            w.first_step_s = float(row.get(M.FIRST_STEP_DURATION_S, 0.0))
        if M.CKPT_STALL_S in row:
            w.stalls.append((float(row["time"]) - float(row.get(M.CKPT_SAVE_S, 0.0)), float(row[M.CKPT_STALL_S])))
            w.copy_wait += float(row.get(M.CKPT_COPY_WAIT_S, 0.0))
        if M.STEP_S in row and int(row["step"]) > previous:  # a rollback's replayed steps: `other`
            steps = int(row["step"]) - previous
            w.step_time += float(row[M.STEP_S]) * steps
            w.logged_steps += steps
            previous = w.last_step = int(row["step"])
            w.last_logged_at = float(row["time"])
    if w.logged_steps:  # the first window holds the first step, which is start-up
        w.step_time -= w.first_step_s
        w.logged_steps -= 1
    return w


def _account_start(b: Breakdown, s: Start, w: _Logged, until: float, survives: Optional[int], live: bool,
                   typical_step_s: Optional[float], gpus: int) -> None:
    """One start's span [started_at, until): start-up to its first step, then its steps (counted
    or lost), its checkpoint stalls, and after its last step either the stop (a clean end), the
    detection of its fault, or (`live`: still running) nothing yet. Its unlogged steps take its
    mean step time (else the run's, `typical_step_s`)."""
    if w.first_step_at is None or w.first_step_at >= until:  # it never finished its first step
        b.add("startup", until - s.started_at, gpus)
        return
    b.add("startup", w.first_step_at - s.started_at, gpus)
    per_step = ((w.step_time - w.copy_wait) / w.logged_steps if w.logged_steps else typical_step_s or w.first_step_s)
    logged = w.last_step if w.last_step is not None else s.start_step + 1
    clean = s.end is not None and s.end not in FAULT_ENDS
    reached = s.end_step if clean else (s.reached_step if s.reached_step is not None else logged)
    unlogged = max(reached - logged, 0)
    steps_time = max(w.step_time - w.copy_wait, 0.0) + unlogged * per_step
    if survives is None:  # the newest start: what it did counts unless its end lost it
        survives = s.end_step if not clean and not live and s.end_step is not None else reached
    lost = min(max(reached - max(survives, s.start_step + 1), 0) * per_step, steps_time)
    logged_at = w.last_logged_at or w.first_step_at  # then its unlogged steps and the saves begun since
    last_progress = min(logged_at + unlogged * per_step + sum(st for t, st in w.stalls if t >= logged_at), until)
    stall = sum(stall for _, stall in w.stalls)
    after = 0.0 if live else until - last_progress
    b.add("productive", steps_time - lost, gpus)
    b.add("recomputed", lost, gpus)
    b.add("checkpoint", stall, gpus)
    b.add("stop" if clean else "restart", max(after, 0.0), gpus)
    b.add("other", (until - w.first_step_at) - steps_time - stall - max(after, 0.0), gpus)


def account(events: list[dict], metrics: list[dict], allocations: list[Allocation], *,
            eval_allocations: list[Allocation] = (), chained: frozenset[str] = frozenset(),
            local_jobs: Optional[dict[str, float]] = None, default_gpus: int = 1,
            now: Optional[float] = None) -> Breakdown:
    """The run's breakdown from its records: attempts.jsonl events, metrics.jsonl rows, the
    training jobs' allocations (sacct) and the evaluation jobs' (those in `chained` wait for
    training to end: their queue wait starts there). `local_jobs` maps a job without accounting
    (the local executor) to its submission time: its allocation is taken as the span from there to
    its last start's end."""
    now = time.time() if now is None else now
    b = Breakdown()
    starts = starts_of(events)
    rows = sorted((r for r in metrics if isinstance(r.get("time"), (int, float))), key=lambda r: r["time"])
    times = [r["time"] for r in rows]
    spans = _spans(starts, allocations, local_jobs or {}, default_gpus, now)
    logged: dict[int, tuple[_Logged, float, float]] = {}  # id(start) -> its records, its span
    for _, end, _, _, members in spans:
        for i, s in enumerate(members):
            nxt = members[i + 1].started_at if i + 1 < len(members) else end
            until = max(min(s.ended_at, nxt) if s.ended_at is not None else nxt, s.started_at)
            mine = rows[bisect.bisect_left(times, s.started_at):bisect.bisect_left(times, nxt)]
            logged[id(s)] = (_logged(mine, s.start_step), until, nxt)
    steady = sum(w.logged_steps for w, _, _ in logged.values())
    typical = sum(w.step_time - w.copy_wait for w, _, _ in logged.values()) / steady if steady else None
    for begin, end, gpus, queue, members in spans:
        b.queue += queue * gpus
        if not members:  # an allocation whose training never recorded a start
            b.add("startup", end - begin, gpus)
            continue
        b.add("startup", members[0].started_at - begin, gpus)
        for s in members:
            w, until, nxt = logged[id(s)]
            later = starts.index(s) + 1
            _account_start(b, s, w, until, starts[later].start_step if later < len(starts) else None,
                           s.end is None and nxt >= now, typical, gpus)
            clean = s.end is not None and s.end not in FAULT_ENDS
            b.add("stop" if clean else "restart", nxt - until, gpus)
    for e in eval_allocations:
        if e.start is None:
            continue
        gpus = e.gpus or default_gpus
        b.add("evaluation", (e.end if e.end is not None else now) - e.start, gpus)
        ready = e.submit or e.start
        if e.job_id in chained:  # afterok: from training's end
            ready = max(ready, max((end for _, end, *_ in spans if end <= e.start), default=0.0))
        b.queue += max(e.start - ready, 0.0) * gpus
    return b


def _spans(starts: list[Start], allocations: list[Allocation], local_jobs: dict[str, float],
           default_gpus: int, now: float) -> list[tuple[float, float, int, float, list[Start]]]:
    """(begin, end, GPUs, queue wait in s, the starts inside) of every training allocation."""
    spans = []
    previous_end: dict[str, float] = {}
    for a in sorted((a for a in allocations if a.start is not None), key=lambda a: a.start):
        end = a.end if a.end is not None else now
        members = [s for s in starts if s.job_id == a.job_id and a.start <= s.started_at <= end]
        gpus = a.gpus or next((s.world_size for s in members if s.world_size), None) or default_gpus
        ready = max(a.submit or a.start, previous_end.get(a.job_id, 0.0))  # a requeue waits from its end
        spans.append((a.start, end, gpus, max(a.start - ready, 0.0), members))
        previous_end[a.job_id] = end
    for job_id, submitted in local_jobs.items():
        members = [s for s in starts if s.job_id == job_id]
        if members:
            last = members[-1]
            end = max(last.ended_at if last.ended_at is not None else now, last.started_at)
            gpus = next((s.world_size for s in members if s.world_size), None) or default_gpus
            spans.append((min(submitted, members[0].started_at), end, gpus, 0.0, members))
    return spans


def run_goodput(run_dir: Path, default_gpus: int, now: Optional[float] = None, sacct_timeout_s: float = 30.0,
                allocations: Optional[list[Allocation]] = None) -> Breakdown:
    """The breakdown of the run in `run_dir` from its files and SLURM's accounting (`allocations`:
    what sacct says of its SLURM jobs, asked here when not given)."""
    jobs = runs.read_jobs(run_dir)
    slurm = [j for j in jobs if j.cluster == "slurm"]
    found = sacct_allocations([j.id for j in slurm], sacct_timeout_s) if allocations is None else allocations
    train_ids = {j.id for j in slurm if j.kind == "train"}
    local = {j.id: j.submitted_at for j in jobs if j.cluster != "slurm" and j.kind == "train"}
    return account(read_jsonl(run_dir / ATTEMPTS), read_jsonl(run_dir / METRICS),
                   [a for a in found if a.job_id in train_ids],
                   eval_allocations=[a for a in found if a.job_id not in train_ids],
                   chained=frozenset(j.id for j in slurm if j.kind == "eval" and j.depends_on),
                   local_jobs=local, default_gpus=default_gpus, now=now)


def log_goodput(tracker: "Tracker", run_dir: Path, default_gpus: int, step: int, *, completed: bool = False) -> None:
    """The lineage's goodput so far as MLflow metrics at `step`: rank 0 of the training job as each
    attempt starts, and the final evaluation job (`completed`: training's last end is left to that
    job when there is one, which logs it with its own time). Never stops a job."""
    try:
        if completed and any(j.kind == "eval" and j.step is None for j in runs.read_jobs(run_dir)):
            return
        breakdown = run_goodput(run_dir, default_gpus, sacct_timeout_s=10)
        if breakdown.allocated > 0:  # `regscale train` alone records no allocation
            tracker.log_metrics(as_metrics(breakdown), step)
    except Exception as err:
        log.warning("goodput not logged: %s: %s", type(err).__name__, err)


def as_metrics(b: Breakdown) -> dict[str, float]:
    """The breakdown as MLflow metrics of the lineage: goodput/ratio and GPU hours per part."""
    out = {f"goodput/{part}_gpu_h": b.parts[part] / 3600 for part in PARTS}
    out["goodput/queue_gpu_h"] = b.queue / 3600
    out["goodput/allocated_gpu_h"] = b.allocated / 3600
    if b.ratio is not None:
        out[M.GOODPUT] = b.ratio
    return out


def format_breakdown(b: Breakdown) -> list[str]:
    """`regscale status RUN`'s goodput lines."""
    if b.ratio is None:
        return ["  goodput          - (no allocation recorded yet)"]
    total = b.allocated
    lines = [f"  goodput          {b.ratio:.1%} of {total / 3600:.3g} GPU-h allocated went into steps that count"]
    for part in PARTS:
        lines.append(f"    {LABELS[part]:<32} {b.parts[part] / 3600:>10.4g} GPU-h {b.parts[part] / total:>7.1%}")
    lines.append(f"    {LABELS['queue']:<32} {b.queue / 3600:>10.4g} GPU-h")
    return lines
