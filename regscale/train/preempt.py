"""Preemption, Ctrl-C and time limits: a signal only sets a flag; the loop decides at a step boundary.

This is the one owner of the training process's stop signals (the SLURM job hands its flag to
the loop, so a signal during start-up counts too). SLURM sends SIGUSR2 some time before the
limit (`--signal`); a scheduler's kill sends SIGTERM: both mean "preempted". Ctrl-C (SIGINT)
means "interrupted"; a second Ctrl-C raises KeyboardInterrupt at once. The handler records the
signal and returns. The loop all-reduces the flags with the other ranks once per step, so every
rank stops after the same step and saves. The deadline comes from SLURM_JOB_END_TIME (or
REGSCALE_DEADLINE, a Unix time, for tests and other launchers); the loop stops early enough to
fit one more step and one checkpoint save.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """Set by SIGUSR2/SIGTERM (preempted) and SIGINT (interrupted); read by the loop."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        """Take over the stop signals (idempotent); `restore` gives them back."""
        for sig in (*PREEMPT_SIGNALS, signal.SIGINT):
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: object) -> None:
        # nothing else: no I/O, no collectives, no locks
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        else:
            self.signum = signum

    @property
    def raised(self) -> bool:
        """A preemption signal arrived."""
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def job_deadline() -> Optional[float]:
    """Unix time at which this job is killed, when the launcher says."""
    for key in ("REGSCALE_DEADLINE", "SLURM_JOB_END_TIME"):
        value = os.environ.get(key)
        if value:
            try:
                return float(value)
            except ValueError:
                log.warning("ignoring %s=%r: not a Unix time", key, value)
    return None


class Deadline:
    """True once the time left no longer fits a step, a checkpoint save and a margin."""

    def __init__(self, end: Optional[float], margin_s: float = 30.0) -> None:
        self.end = end
        self.margin_s = margin_s
        self.step_s = 0.0
        self.save_s = 0.0

    def observe(self, *, step_s: Optional[float] = None, save_s: Optional[float] = None) -> None:
        if step_s is not None:
            self.step_s = max(self.step_s * 0.9, step_s)  # slow to forget a slow step
        if save_s is not None:
            self.save_s = max(self.save_s, save_s)

    def reached(self, now: Optional[float] = None) -> bool:
        if self.end is None:
            return False
        now = time.time() if now is None else now
        return now + self.step_s + 1.5 * self.save_s + self.margin_s >= self.end
