"""Names inside a run directory that several areas share (training writes them, launch, eval and
tracking read them)."""

from __future__ import annotations

import re
from typing import Optional

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"  # one JSON object per logged step, written by rank 0
CHECKPOINTS = "checkpoints"
JOB_FOLDER = "jobs"  # submitit's job scripts, logs and results
LOGS = "logs"  # one log per rank and attempt, written by the node agents
STACKS = "stacks"  # every thread's stack of each rank, dumped when its group hung
_STEP = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    """The name of everything made per training step: checkpoints, evaluations, sample grids."""
    return f"step_{int(step):08d}"


def step_of(name: str) -> Optional[int]:
    """The step a `step_name` encodes, or None for any other name (`step_00000006.broken-...`)."""
    match = _STEP.match(name)
    return int(match.group(1)) if match else None
