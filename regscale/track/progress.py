"""A job's progress in a small JSON file, for whoever waits on it (`regscale submit` on the local
executor shows it as a bar): the current stage, how much of it is done, its total and unit.

The evaluation job names its file (`record_to`, rank 0); the loops that do the work `report`
(a no-op in every other process). Writes are atomic and at most one a second per stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from regscale.fsutil import write_atomic

MIN_INTERVAL_S = 1.0

_sink: Optional[Path] = None
_last: tuple[str, float] = ("", 0.0)  # stage and time of the last write


def record_to(path: Optional[Path]) -> None:
    """Send this process's `report`s to `path` (None: nowhere)."""
    global _sink, _last
    _sink, _last = path, ("", 0.0)  # its folder is made by the first report


def report(stage: str, done: int, total: int, unit: str) -> None:
    """Note how far `stage` is: `done` of `total` `unit`s."""
    global _last
    if _sink is None:
        return
    now = time.monotonic()
    if _last[0] == stage and done < total and now - _last[1] < MIN_INTERVAL_S:
        return
    _last = (stage, now)
    write_atomic(_sink, json.dumps({"stage": stage, "done": done, "total": total, "unit": unit, "time": time.time()}))


def read(path: Path) -> Optional[dict[str, Any]]:
    """The last report written to `path`, or None (not yet, or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
