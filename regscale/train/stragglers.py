"""Stragglers: ranks whose steps lag the other ranks', named with their host; never restarted.

At every log step the loop gathers each rank's window (the one collective that step already had):
its mean step time, from the step's start to the rank's arrival at the per-step agreement, and
its mean data wait (waiting for its batch); compute is the difference. Ranks leave a collective
together, so a rank's own slowness shows where the others wait for it outside the step's
collectives: its data (before them) or its work after the last one (the optimizer step, the EMA).
Hence a rank's lag in a window is the larger of its step time over the other ranks' median and
1 + its data wait beyond theirs, in units of their step time (the others absorb a slow loader in
their compute: never blame compute alone). A rank lags when its lag exceeds train.straggler_factor
in each of the last train.straggler_windows log windows (a start's first window, which holds its
first step and compiles, does not count); it is named in the log, in MLflow (a `straggler` tag and
per-rank metrics) and in `regscale status`, and training goes on.

Rank 0 appends every window to ranks.jsonl (the host names in a start's first row).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regscale import metrics as M

log = logging.getLogger("regscale.train")

RANKS = "ranks.jsonl"
PER_RANK_METRICS_MAX = 64  # ranks up to which MLflow gets every rank's series (beyond: the lagging ones)


@dataclass(frozen=True)
class RankWindow:
    """One log window: per rank, the mean step time and data wait (seconds per step)."""

    step: int
    step_s: tuple[float, ...]
    data_wait_s: tuple[float, ...]


def _median_without(values: list[float], skip: int) -> float:
    """The median of `values` (sorted) without the entry at index `skip`."""
    n = len(values) - 1
    pick = [values[j if j < skip else j + 1] for j in ((n - 1) // 2, n // 2)]
    return (pick[0] + pick[1]) / 2


def others(values: tuple[float, ...], rank: int) -> float:
    """The median over every rank but `rank`."""
    ordered = sorted(values)
    return _median_without(ordered, bisect.bisect_left(ordered, values[rank]))


def lags(w: RankWindow) -> list[float]:
    """Each rank's lag in one window (see the module docstring); 1.0 alone."""
    if len(w.step_s) < 2:
        return [1.0] * len(w.step_s)
    out = []
    for r in range(len(w.step_s)):
        step, wait = others(w.step_s, r), others(w.data_wait_s, r)
        if step <= 0:
            out.append(1.0)
            continue
        out.append(max(w.step_s[r] / step, 1.0 + (w.data_wait_s[r] - wait) / step))
    return out


@dataclass(frozen=True)
class Straggler:
    """A rank that lagged in each of the last `windows` log windows (means over them)."""

    rank: int
    host: str
    lag: float
    windows: int
    first_step: int
    last_step: int
    step_s: float
    data_wait_s: float
    others_step_s: float
    others_data_wait_s: float

    def describe(self, factor: float) -> str:
        compute, others_compute = self.step_s - self.data_wait_s, self.others_step_s - self.others_data_wait_s
        return (f"rank {self.rank} on {self.host} lags: {self.lag:.2f}x the other ranks (factor > {factor:g} in "
                f"each of the last {self.windows} log windows, steps {self.first_step}-{self.last_step}): "
                f"compute {compute:.3f} s + data wait {self.data_wait_s:.3f} s per step, the others' median "
                f"{others_compute:.3f} s + {self.others_data_wait_s:.3f} s; not restarted")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def stragglers(windows: list[RankWindow], hosts: list[str], factor: float, count: int) -> list[Straggler]:
    """The ranks lagging by more than `factor` in each of the last `count` windows (of one world
    size; fewer windows: none)."""
    recent = windows[-count:]
    if len(recent) < count or len({len(w.step_s) for w in recent}) != 1:
        return []
    per_window = [lags(w) for w in recent]
    found = []
    for r in range(len(recent[0].step_s)):
        if all(lag[r] > factor for lag in per_window):
            found.append(Straggler(
                r, hosts[r] if r < len(hosts) else "?", _mean([lag[r] for lag in per_window]), count,
                recent[0].step, recent[-1].step, _mean([w.step_s[r] for w in recent]),
                _mean([w.data_wait_s[r] for w in recent]), _mean([others(w.step_s, r) for w in recent]),
                _mean([others(w.data_wait_s, r) for w in recent])))
    return found


def read_windows(run_dir: Path) -> tuple[list[str], list[RankWindow]]:
    """The host names and windows of the newest start in run_dir/ranks.jsonl (a start's first
    row carries its hosts; that window, which holds the first step, is left out)."""
    path = run_dir / RANKS
    hosts: list[str] = []
    windows: list[RankWindow] = []
    if not path.is_file():
        return hosts, windows
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            if "hosts" in row:
                hosts, windows = list(row["hosts"]), []
                continue
            windows.append(RankWindow(int(row["step"]), tuple(row["step_s"]), tuple(row["data_wait_s"])))
        except (ValueError, KeyError, TypeError):
            continue  # a torn line
    return hosts, windows


class StragglerWatch:
    """Rank 0's side in the loop: records each window, names ranks as they start (and stop)
    lagging, and gives the window's metrics."""

    def __init__(self, run_dir: Path, hosts: list[str], factor: float, count: int, tracker: Any) -> None:
        self.path = run_dir / RANKS
        self.hosts, self.factor, self.count, self.tracker = hosts, factor, count, tracker
        self.windows: deque[RankWindow] = deque(maxlen=count)
        self.named: set[int] = set()
        self._first = True

    def add(self, step: int, time_s: list[float], wait_s: list[float], steps: int) -> dict[str, float]:
        """One window: per rank the summed step time and data wait over its `steps` steps."""
        w = RankWindow(step, tuple(t / steps for t in time_s), tuple(d / steps for d in wait_s))
        row: dict[str, Any] = {"step": step, "step_s": list(w.step_s), "data_wait_s": list(w.data_wait_s)}
        if self._first:
            row["hosts"] = self.hosts
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if not self._first:  # the first window holds the first step
            self.windows.append(w)
        self._first = False
        found = stragglers(list(self.windows), self.hosts, self.factor, self.count)
        for s in found:
            if s.rank not in self.named:
                log.warning("%s", s.describe(self.factor))
        for rank in self.named - {s.rank for s in found}:
            log.info("rank %d on %s no longer lags (step %d)", rank, self._host(rank), step)
        if self.tracker is not None and self.named != {s.rank for s in found}:
            self.tracker.set_tags({"straggler": "; ".join(s.describe(self.factor) for s in found) or "none"})
        self.named = {s.rank for s in found}
        lag = lags(w)
        slowest = max(range(len(lag)), key=lag.__getitem__)
        if self.tracker is not None:
            shown = range(len(lag)) if len(lag) <= PER_RANK_METRICS_MAX else sorted(self.named)
            per_rank = {}
            for r in shown:
                per_rank[f"rank/{r}/compute_s"] = w.step_s[r] - w.data_wait_s[r]
                per_rank[f"rank/{r}/data_wait_s"] = w.data_wait_s[r]
            self.tracker.log_metrics(per_rank, step)
        return {M.STRAGGLER_LAG: lag[slowest], M.STRAGGLER_RANK: float(slowest)}

    def _host(self, rank: int) -> str:
        return self.hosts[rank] if rank < len(self.hosts) else "?"


def straggler_lines(run_dir: Path, factor: float, count: int) -> list[str]:
    """`regscale status RUN`'s straggler lines, from ranks.jsonl (none: no lines)."""
    hosts, windows = read_windows(run_dir)
    if not windows:
        return []
    found = stragglers(windows, hosts, factor, count)
    if not found:
        lag = max(lags(windows[-1]))
        return [f"  stragglers       none (slowest rank {lag:.2f}x the others at step {windows[-1].step}; "
                f"named above {factor:g}x over {count} log windows)"]
    return [f"  STRAGGLER        {s.describe(factor)}" for s in found]
