"""What `regscale submit` shows while its local jobs run: a progress bar fed by the run's files
(training: metrics.jsonl; evaluation: the progress file it writes), and the evaluation's result.

On a terminal the bar is rich's; elsewhere (a log file, CI) a plain line every 30 s and at each
new stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from regscale.config import Config
from regscale.metrics import IMAGES_PER_S, LOSS
from regscale.launch.status import format_duration
from regscale.rundir import METRICS, PROGRESS
from regscale.track import progress

POLL_S = 1.0
LINE_EVERY_S = 30.0
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision", "recall": "recall"}
NOT_COMPARABLE = "_not_comparable"


@dataclass
class Update:
    """Where a job is: `done` of `total` `unit`s of `stage` (total None: not known yet), plus a
    few words (loss, img/s)."""

    stage: str
    done: int
    total: Optional[int]
    unit: str
    detail: str = ""
    eta_s: Optional[float] = None  # None: the display estimates it from the rate so far

    def count(self) -> str:
        return "" if self.total is None else f"{self.done}/{self.total} {self.unit}"


class TrainingFollower:
    """Reads the new lines of the run's metrics.jsonl: step of train.max_steps, loss, images/s."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.path = run_dir / METRICS
        self.cfg = cfg
        self.offset = 0
        self.last: Optional[dict[str, Any]] = None

    def __call__(self) -> Update:
        if self.path.is_file():
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind("\n") + 1]  # a line being written is read next time
            self.offset += len(complete.encode())
            for line in complete.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if LOSS in record:
                    self.last = record
        total = self.cfg.train.max_steps
        if self.last is None:
            return Update("training", 0, total, "steps", "starting: model, data, first step")
        step, rate = int(self.last["step"]), float(self.last.get(IMAGES_PER_S, 0.0))
        eta = (total - step) * self.cfg.train.batch_size / rate if rate > 0 else None
        return Update("training", step, total, "steps", f"loss {self.last[LOSS]:.4f}  {rate:.1f} img/s", eta)


class EvaluationFollower:
    """Reads the evaluation's progress file (sampling, then the Inception features)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / PROGRESS
        self.path.unlink(missing_ok=True)  # an earlier attempt's

    def __call__(self) -> Update:
        state = progress.read(self.path)
        if state is None:
            return Update("starting", 0, None, "", "model, VAE, reference")
        return Update(state["stage"], int(state["done"]), int(state["total"]), state["unit"])


class Display:
    """A rich progress bar on a terminal, one task per stage; plain lines otherwise."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self.bar: Any = None
        self.task: Any = None
        self.stage = ""
        self.stage_t0 = self.last_line = time.monotonic()
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.fields[count]}"),
                                TextColumn("{task.fields[detail]}"), TextColumn("ETA {task.fields[eta]}"),
                                console=self.console)
            self.bar.start()

    def show(self, update: Update, final: bool = False) -> None:
        """Show `update`; `final`: the job has ended (a plain line says where it stopped)."""
        now = time.monotonic()
        new_stage = update.stage != self.stage
        if new_stage:
            self.stage, self.stage_t0 = update.stage, now
        eta = update.eta_s
        if eta is None and update.total is not None and update.done > 0:
            eta = (update.total - update.done) * (now - self.stage_t0) / update.done
        eta_text = format_duration(None if eta is None else max(eta, 0.0))
        if self.bar is not None:
            if new_stage:
                if self.task is not None:
                    self.bar.stop_task(self.task)
                self.task = self.bar.add_task(update.stage, total=update.total, count="", detail="", eta="")
            self.bar.update(self.task, completed=update.done, total=update.total, count=update.count(),
                            detail=update.detail, eta=eta_text)
        elif new_stage or final or now - self.last_line >= LINE_EVERY_S:
            self.last_line = now
            print(f"{update.stage}: {update.count()}  {update.detail}  ETA {eta_text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def follow(job: Any, updates: Callable[[], Update]) -> None:
    """Show `updates` until the submitit job is done (the caller collects its result)."""
    display = Display()
    try:
        while not job.done():
            display.show(updates())
            time.sleep(POLL_S)
        display.show(updates(), final=True)
    finally:
        display.close()


def format_result(record_path: Path) -> str:
    """The evaluation record's metrics, say whether they compare to published numbers, and its path."""
    record = json.loads(record_path.read_text())
    metrics = record.get("metrics", {})
    parts, comparable = [], True
    for key, name in METRIC_NAMES.items():
        for stored in (key, key + NOT_COMPARABLE):
            if stored in metrics:
                parts.append(f"{name} {metrics[stored]:.4g}")
                comparable = comparable and stored == key
    note = "" if comparable else "\n            not comparable to any published FID: a random Inception network"
    return f"result      {', '.join(parts) or 'no metrics'} (step {record.get('step')}){note}\nrecord      {record_path}"
