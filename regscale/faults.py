"""Test-only fault injection: the one hook through which tests make the real code fail.

`REGSCALE_FAULT_<POINT>=s1,s2,...` makes the fault POINT fire at those training steps, once each
per process. Points: NAN (that step's loss is NaN), OVERFLOW (that step's loss is multiplied by
OVERFLOW_FACTOR: its gradients overflow fp16, as a real overflow does, but not bf16 or fp32),
KILL_IN_SAVE (rank 0 SIGKILLs itself while that step's checkpoint is being written), NO_SPACE
(that step's checkpoint write fails as on a full disk). `REGSCALE_FAULT_SLOW_STEP_S=x` makes every
training step x seconds longer (a slow device: a test whose timing must not depend on the machine's
speed), on every rank or, with `REGSCALE_FAULT_SLOW_RANK=r`, on rank r alone (a straggler). Unset
in production; reading them costs one dictionary lookup.
"""

from __future__ import annotations

import math
import os
from typing import Optional

_PREFIX = "REGSCALE_FAULT_"
# the gradients of a loss this much larger exceed fp16's range (65504) where they pass through
# fp16, while fp32's range (3e38) holds them
OVERFLOW_FACTOR = 2.0**40
_fired: set[tuple[str, int]] = set()


def due(point: str, step: int) -> bool:
    """True the first time `point` is asked about a step its variable names."""
    value = os.environ.get(_PREFIX + point)
    if not value or (point, step) in _fired:
        return False
    if step not in {int(s) for s in value.split(",") if s.strip()}:
        return False
    _fired.add((point, step))
    return True


def slow_step_s(rank: int) -> float:
    """Seconds REGSCALE_FAULT_SLOW_STEP_S adds to every training step of this rank (all ranks, or
    the one REGSCALE_FAULT_SLOW_RANK names); 0 when unset."""
    value = os.environ.get(_PREFIX + "SLOW_STEP_S")
    only = os.environ.get(_PREFIX + "SLOW_RANK")
    return float(value) if value and (not only or int(only) == rank) else 0.0


def loss_factor(step: int) -> Optional[float]:
    """What the NAN or OVERFLOW fault multiplies that step's loss by; None when neither fires."""
    if due("NAN", step):
        return math.nan
    if due("OVERFLOW", step):
        return OVERFLOW_FACTOR
    return None
