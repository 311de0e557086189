"""How one start of the training process ended: one value shared by the loop, the job that
requeues it, the tracker that records it and the exit code of `regscale train`."""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    COMPLETED = "completed"  # train.max_steps reached, last checkpoint published
    PREEMPTED = "preempted"  # a stop signal: checkpoint saved, start again to resume
    DEADLINE = "deadline"  # the job's time limit was near: checkpoint saved, start again
    INTERRUPTED = "interrupted"  # Ctrl-C: saved if it could; the user decides what next
    FAILED = "failed"  # an error

    @property
    def requeue(self) -> bool:
        """The job should run again: it stopped only to fit its allocation."""
        return self in (Outcome.PREEMPTED, Outcome.DEADLINE)

    @property
    def exit_code(self) -> int:
        """`regscale train`'s exit status: 0 done, 3 start me again, 130 interrupted, 1 failed."""
        return {Outcome.COMPLETED: 0, Outcome.PREEMPTED: 3, Outcome.DEADLINE: 3,
                Outcome.INTERRUPTED: 130, Outcome.FAILED: 1}[self]

    @property
    def run_status(self) -> str:
        """The MLflow run status it leaves (a requeue reopens a KILLED run as RUNNING)."""
        return {Outcome.COMPLETED: "FINISHED", Outcome.FAILED: "FAILED"}.get(self, "KILLED")
