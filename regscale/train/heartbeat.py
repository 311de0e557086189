"""Heartbeats: a training process under the node agent (regscale.launch.agent) says after every
step that it is alive and how long its next silence may last; the agent, a separate process on the
same node, restarts the group when one falls silent for longer (a hung rank: a stopped process, a
collective that never returns, a dead-locked DataLoader worker).

The bound is max(train.hang_timeout_s, 10 x the p99 of the last step intervals), and
train.first_step_timeout_s before a process's first step (model build, first batch, compile) and
around the other long waits (a rollback's restore, a blocking save). A beat is a small JSON file
in node-local memory (REGSCALE_HEARTBEAT_DIR, set by the agent), rewritten atomically; the same
file carries how the process ended (outcome, or the first line of its error) back to the agent.
Outside an agent (`regscale train` under torchrun) no beat is written.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ENV = "REGSCALE_HEARTBEAT_DIR"
WINDOW = 200  # step intervals behind the p99
P99_FACTOR = 10.0


def beat_path(folder: Path, local_rank: int) -> Path:
    return folder / f"rank{local_rank}.json"


@dataclass
class Beat:
    """The last word of one process: when, at which step, how long until the next one at most."""

    pid: int
    time: float
    step: int
    bound_s: float
    phase: str  # start | step | wait | ended | failed
    outcome: Optional[str] = None  # phase ended: the loop's Outcome value
    end_step: Optional[int] = None
    error: Optional[str] = None  # phase failed: the first line of the error

    @property
    def silent_until(self) -> float:
        """The time after which silence means a hang (never, once the process has ended)."""
        return float("inf") if self.phase in ("ended", "failed") or self.bound_s <= 0 else self.time + self.bound_s


def read_beat(path: Path) -> Optional[Beat]:
    """The beat in `path`, or None when there is none yet (or it is torn: written by rename, so
    only a foreign file can be)."""
    try:
        return Beat(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class Heartbeat:
    """This process's beats; a no-op without REGSCALE_HEARTBEAT_DIR (no agent watching)."""

    def __init__(self, folder: Optional[Path], local_rank: int, floor_s: float, first_step_s: float) -> None:
        self.path = beat_path(folder, local_rank) if folder else None
        self.floor_s = floor_s
        self.first_step_s = first_step_s
        self.intervals: deque[float] = deque(maxlen=WINDOW)
        self.step = 0
        self._last: Optional[float] = None

    @classmethod
    def from_env(cls, floor_s: float, first_step_s: float) -> "Heartbeat":
        folder = os.environ.get(ENV)
        return cls(Path(folder) if folder else None, int(os.environ.get("LOCAL_RANK", "0")), floor_s, first_step_s)

    def bound_s(self) -> float:
        """How long the next silence may last: the floor, or 10 x the p99 step interval."""
        if not self.intervals:
            return self.floor_s
        ordered = sorted(self.intervals)
        p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]  # nearest rank
        return max(self.floor_s, P99_FACTOR * p99)

    def starting(self) -> None:
        """The process started: the first-step bound applies until its first step."""
        self._write("start", self.first_step_s)

    def beat(self, step: int) -> None:
        """A step finished (every rank, after each step)."""
        now = time.monotonic()
        if self._last is not None:
            self.intervals.append(now - self._last)
        self._last = now
        self.step = step
        self._write("step", self.bound_s())

    def waiting(self, seconds: float) -> None:
        """A long wait follows (restore, blocking save): silence is allowed for this long more
        than a step's bound. The next step's interval does not count towards the p99."""
        self._last = None
        self._write("wait", self.bound_s() + seconds)

    def ended(self, outcome: str, end_step: int) -> None:
        self._write("ended", 0.0, outcome=outcome, end_step=end_step)

    def failed(self, error: str) -> None:
        self._write("failed", 0.0, error=error)

    def _write(self, phase: str, bound_s: float, **extra: object) -> None:
        if self.path is None or (self.floor_s <= 0 and phase in ("start", "step", "wait")):
            return
        beat = Beat(os.getpid(), time.time(), self.step, bound_s, phase, **extra)  # type: ignore[arg-type]
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(beat)))
        os.replace(tmp, self.path)
