"""MLflow tracking of one training lineage, for rank 0: what the loop and the jobs call.

A Tracker joins the lineage's run (regscale.track.lineage: which run, and whether this job may go
on with it) to an outbox (regscale.track.delivery: a background thread that delivers in order and
keeps in the run directory what the server could not take). Its calls never block on, nor raise
for, tracking-server trouble: they queue an operation and return.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from regscale.config import Config, to_yaml
from regscale.dist import read_layout
from regscale.errors import UserError, first_line
from regscale.fsutil import write_atomic
from regscale.metrics import GPU_HOURS
from regscale.outcome import Outcome
from regscale.rundir import CONFIG, MLFLOW_GPU_HOURS, MLFLOW_OUTBOX, RECIPE, step_name
from regscale.track.client import make_client, now_ms
from regscale.track.delivery import Outbox
from regscale.track.lineage import Lineage, stored_run_id, world_size

STATUSES = ("FINISHED", "FAILED", "KILLED")

_METRIC_NAME = re.compile(r"^[/\w.\- :]+$")

log = logging.getLogger("regscale.track")


def _check_rank0() -> None:
    rank = read_layout().rank
    if rank != 0:
        raise RuntimeError(f"a Tracker belongs to rank 0 only; this process is rank {rank}")


def _checked_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . / : and spaces; no leading /, no ..)."""
    if not _METRIC_NAME.match(key) or key.startswith("/") or ".." in key.split("/"):
        raise ValueError("MLflow allows letters, digits, '_', '-', '.', '/', ':' and spaces")
    return key


def _training_lineage(cfg: Config, run_dir: Path, recipe: Optional[Path], *, scheduled: bool = False) -> Lineage:
    """The training job's lineage, with the resolved config (and the recipe: `recipe`, else
    run_dir/recipe.yaml) as the files its run gets."""
    _check_rank0()
    run_dir = Path(run_dir)
    config_file = run_dir / MLFLOW_OUTBOX / CONFIG
    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config_file, to_yaml(cfg))
    files = {"config": config_file}
    recipe = Path(recipe) if recipe else run_dir / RECIPE
    if recipe.is_file():
        files["recipe"] = recipe
    return Lineage.owned(cfg, run_dir, files, scheduled=scheduled)


class Tracker:
    """MLflow tracking of one training lineage; see the module docstring.

    `open` is for the training job (creates / reopens the run, marks it RUNNING, logs params
    once); `attach` is for jobs that only add to it (evaluation): it never changes its status.
    As a context manager it ends the run FAILED (KILLED on an interrupt) when an exception escapes.
    """

    def __init__(self, lineage: Lineage, world: int) -> None:
        self.uri, self.run_dir = lineage.uri, lineage.run_dir
        client = make_client(lineage.uri)
        self._outbox = Outbox(client, lineage.uri, lineage.run_dir, lambda: lineage.reach(client))
        self._owner = lineage.owner
        self._world = world
        self._finished = False
        self._t0 = self._gpu_saved = time.monotonic()
        self._started_ms = now_ms()  # an evaluation's child run starts when its job attached
        gpu_file = self.run_dir / MLFLOW_GPU_HOURS
        self._gpu_hours0 = float(gpu_file.read_text()) if self._owner and gpu_file.is_file() else 0.0

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, *, recipe: Optional[Path] = None) -> "Tracker":
        """Create this lineage's run, or reopen the one whose id is in run_dir/mlflow_run_id, and
        queue what earlier attempts left undelivered.

        Logs the resolved config (and the recipe: `recipe`, else run_dir/recipe.yaml) as
        artifacts. Raises UserError if the stored run is not in the store, or if the config
        changes a param the run logged (outside config.RESUMABLE_KEYS). An unreachable server only warns.
        """
        tracker = cls(_training_lineage(cfg, run_dir, recipe), world_size(cfg))
        tracker._outbox.load_pending(stored_run_id(run_dir))
        tracker._outbox.start()
        return tracker

    @classmethod
    def attach(cls, cfg: Config, run_dir: Path) -> "Tracker":
        """Add to run_dir's training run (evaluation jobs): its status and params stay as they are."""
        _check_rank0()
        tracker = cls(Lineage.attached(cfg, run_dir), world_size(cfg))
        tracker._outbox.start()
        return tracker

    # -- the public calls: they queue and return -----------------------------------------------

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id (None until the server has been reached)."""
        run = self._outbox.run
        return run.run_id if run else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at the global training step (plus the lineage's cumulative GPU hours)."""
        values = {}
        for key, value in metrics.items():
            try:
                values[_checked_key(key)] = float(value)
            except (TypeError, ValueError) as err:  # one bad entry must not sink the whole batch
                log.warning("MLflow: metric %r = %r not logged: %s", key, value, err)
        if self._owner and GPU_HOURS not in values:
            values[GPU_HOURS] = self._gpu_hours()
        self._outbox.put({"op": "metrics", "metrics": values, "step": int(step), "ts": now_ms()})

    def log_image(self, path: Path, step: int) -> None:
        """Log a sample grid as samples/step_XXXXXXXX.<its suffix> (copied now: the caller may reuse
        the file)."""
        dest = self.run_dir / MLFLOW_OUTBOX / f"{step_name(step)}{Path(path).suffix or '.png'}"
        try:
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, dest)
        except OSError as err:
            log.warning("MLflow: sample grid %s not logged: %s", path, err)
            return
        self._outbox.put({"op": "artifact", "path": str(dest), "artifact_path": "samples", "remove": True})

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a directory to the run's artifacts (read when delivered)."""
        self._outbox.put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path,
                          "remove": False})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (values as strings)."""
        self._outbox.put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_eval(self, metrics: dict[str, float], step: int, info: dict[str, Any],
                 started: Optional[float] = None) -> None:
        """Record an evaluation of the checkpoint at training `step`: a nested child run (`info` as
        params, `metrics`) that ran from `started` (Unix time; default: when this tracker was made,
        i.e. when the evaluation job began) to now, and each metric mirrored on the training run
        as eval/<name> at `step`."""
        self._outbox.put({"op": "eval", "metrics": {k: float(v) for k, v in metrics.items()},
                          "step": int(step), "info": {k: str(v) for k, v in info.items()}, "ts": now_ms(),
                          "start": int(started * 1000) if started is not None else self._started_ms})

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued is delivered (retrying now if the server was away);
        False if that did not happen within timeout s."""
        return self._outbox.flush(timeout)

    def finish(self, status: "str | Outcome" = "FINISHED", timeout: float = 30.0) -> None:
        """End this attempt: the run's status (FINISHED, FAILED or KILLED, or the training's
        Outcome; an `attach`ed tracker leaves the status alone), then flush; what is undelivered
        after `timeout` s is saved in the run dir."""
        if status in Outcome._value2member_map_:
            status = Outcome(status).run_status
        if status not in STATUSES:
            log.error("MLflow: unknown final status %r; recording FAILED", status)
            status = "FAILED"
        if self._finished:
            return
        self._finished = True
        if self._owner:
            self._gpu_hours(save=True)
            self._outbox.put({"op": "status", "status": status, "ts": now_ms()})
        self._outbox.close(timeout)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")

    def _gpu_hours(self, save: bool = False) -> float:
        """GPU hours of the lineage so far, kept in the run dir (at most a minute behind) so that
        killed attempts count too."""
        now = time.monotonic()
        hours = self._gpu_hours0 + (now - self._t0) * self._world / 3600.0
        if save or now - self._gpu_saved >= 60.0:
            write_atomic(self.run_dir / MLFLOW_GPU_HOURS, f"{hours:.6f}\n")
            self._gpu_saved = now
        return hours


def register_run(cfg: Config, run_dir: Path, *, recipe: Optional[Path] = None) -> Optional[str]:
    """Create (or check) run_dir's MLflow run before its job starts, so `submit` can print the id:
    params and config logged, status SCHEDULED until the job's `Tracker.open`. Raises UserError as
    `Tracker.open` does; returns None when the server is unreachable (the job creates the run)."""
    lineage = _training_lineage(cfg, run_dir, recipe, scheduled=True)
    try:
        return lineage.reach(make_client(lineage.uri)).run_id
    except UserError:
        raise
    except Exception as err:
        log.warning("MLflow at %s unreachable (%s); the training job will create the run",
                    lineage.uri, first_line(err))
        return None
