"""One MLflow run per training lineage, created once and reopened by id after every requeue.

Rank 0 only. The run id lives in `<run_dir>/mlflow_run_id` (never looked up by name). Calls never
block on, nor raise for, tracking-server trouble: each call queues an operation and a background
thread delivers them in order, retrying with backoff and warning once while the server is away.
Whatever is still undelivered when the tracker closes is saved in the run directory and sent by
the next `Tracker.open` of that run directory.

Metrics are logged at the global step and never twice for a key and step, nor behind the last
step already logged: on reopen the last step of every key is read back from the server.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

from regscale.config import Config, config_hash, flatten, resume_changes, to_yaml
from regscale.dist import launcher_layout, read_layout
from regscale.errors import UserError, first_line
from regscale.fsutil import write_atomic
from regscale.outcome import Outcome
from regscale.rundir import step_name

RUN_ID_FILE = "mlflow_run_id"
PENDING_PREFIX = "mlflow_pending"
OUTBOX = "mlflow_outbox"  # copies of images and config files waiting to be uploaded
GPU_HOURS_FILE = "mlflow_gpu_hours"

STATUSES = ("FINISHED", "FAILED", "KILLED")
EVAL_PREFIX = "eval/"  # evaluation metrics mirrored on the training run: eval/fid, eval/sfid, ...
GPU_HOURS = "gpu_hours"
# MLflow 3 files an experiment without a kind under GenAI (traces, evaluations); this is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

_BATCH = 1000  # MLflow's limit on metrics per log_batch
_PARAM_BATCH = 100  # and on params / tags
_MAX_BACKOFF_S = 30.0
_CONNECT_TIMEOUT_S = 10

_METRIC_NAME = re.compile(r"^[/\w.\- :]+$")

log = logging.getLogger("regscale.track")


# ---------------------------------------------------------------------------------------------
# pure helpers


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    """cfg.mlflow.tracking_uri, or a SQLite store in the run directory's parent."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def artifact_location(uri: str) -> Optional[str]:
    """Artifacts beside a SQLite store (`mlartifacts/` next to the .db); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened configuration as MLflow params (`a.b.c -> str`)."""
    return {key: str(value) for key, value in flatten(cfg).items()}


def _git_tags() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def command_line() -> str:
    """This process's command as the user typed it: `regscale VERB ...` for the CLI."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("regscale", "cli.py"):
        argv = ["regscale", *argv[1:]]
    return shlex.join(argv)


def source_tags() -> dict[str, str]:
    """The run's Source and User in the MLflow UI: the command that created it (type JOB: the UI
    shows a LOCAL source's last path component only), and who ran it."""
    return {"mlflow.source.name": command_line(), "mlflow.source.type": "JOB",
            "mlflow.user": getpass.getuser()}


def world_size(cfg: Config) -> int:
    """Processes of this job: the launcher's environment, else the recipe."""
    layout = launcher_layout()
    return layout.world_size if layout else cfg.world_size


def _check_rank0() -> None:
    rank = read_layout().rank
    if rank != 0:
        raise RuntimeError(f"a Tracker belongs to rank 0 only; this process is rank {rank}")


def run_tags(cfg: Config) -> dict[str, str]:
    """Tags describing this attempt: code, job, world size, engine, requeues."""
    engine = cfg.engine.kind + (f"-zero{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else "")
    tags = {
        "regscale.kind": "train",
        "regscale.config_hash": config_hash(cfg),
        "world_size": str(world_size(cfg)),
        "engine": engine,
        "host": socket.gethostname(),
        "requeue_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        **_git_tags(),
    }
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def _checked_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, _ - . / : and spaces; no leading /, no ..)."""
    if not _METRIC_NAME.match(key) or key.startswith("/") or ".." in key.split("/"):
        raise ValueError("MLflow allows letters, digits, '_', '-', '.', '/', ':' and spaces")
    return key


def _now_ms() -> int:
    return int(time.time() * 1000)


def _permanent(err: Exception) -> bool:
    """An error the server will answer the same way next time (a 4xx), not an outage."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.get_http_status_code() < 500


# ---------------------------------------------------------------------------------------------
# the tracker


class Tracker:
    """MLflow tracking of one training lineage; see the module docstring.

    `open` is for the training job (creates / reopens the run, marks it RUNNING, logs params
    once); `attach` is for jobs that only add to it (evaluation): it never changes its status.
    As a context manager it ends the run FAILED (KILLED on an interrupt) when an exception escapes.
    """

    def __init__(self, uri: str, run_dir: Path, *, owner: bool, experiment: str, run_name: str,
                 params: dict[str, str], tags: dict[str, str], files: dict[str, Path], world: int) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" per run end
        # Our worker retries with its own backoff; MLflow's (7 retries, minutes) would stall it.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(_CONNECT_TIMEOUT_S))
        self.uri = uri
        self.run_dir = Path(run_dir)
        self._client = MlflowClient(tracking_uri=uri)
        self._owner = owner
        self._scheduled = False  # register_run: the job has not started yet
        self._experiment = experiment
        self._run_name = run_name
        self._params = params
        self._tags = tags
        self._files = files  # artifact dir/name -> local file, logged when the run is reached
        self._world = world
        self._run_id: Optional[str] = None
        self._experiment_id: Optional[str] = None
        self._last_step: dict[str, int] = {}  # per metric key: the newest step the server has
        self._ops: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closing = False
        self._finished = False
        self._disabled = False
        self._failing_since: Optional[float] = None
        self._retry_at = 0.0
        self._consumed: list[Path] = []  # pending files whose operations are queued
        self._t0 = self._gpu_saved = time.monotonic()
        self._started_ms = _now_ms()  # an evaluation's child run starts when its job attached
        gpu_file = self.run_dir / GPU_HOURS_FILE
        self._gpu_hours0 = float(gpu_file.read_text()) if owner and gpu_file.is_file() else 0.0
        self._worker = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, *, recipe: Optional[Path] = None) -> "Tracker":
        """Create this lineage's run, or reopen the one whose id is in run_dir/mlflow_run_id.

        Logs the resolved config (and the recipe: `recipe`, else run_dir/recipe.yaml) as
        artifacts. Raises UserError if the stored run is not in the store, or if the config
        changes a param the run logged (outside config.RESUMABLE_KEYS). An unreachable server only warns.
        """
        tracker = cls._owner_of(cfg, run_dir, recipe)
        tracker._load_pending()
        tracker._start()
        return tracker

    @classmethod
    def _owner_of(cls, cfg: Config, run_dir: Path, recipe: Optional[Path]) -> "Tracker":
        _check_rank0()
        run_dir = Path(run_dir)
        outbox = run_dir / OUTBOX
        outbox.mkdir(parents=True, exist_ok=True)
        config_file = outbox / "config.yaml"
        write_atomic(config_file, to_yaml(cfg))
        files = {"config": config_file}
        recipe = Path(recipe) if recipe else run_dir / "recipe.yaml"
        if recipe.is_file():
            files["recipe"] = recipe
        return cls(tracking_uri(cfg, run_dir), run_dir, owner=True, experiment=cfg.mlflow.experiment,
                   run_name=str(cfg.run.name), params=config_params(cfg), tags=run_tags(cfg),
                   files=files, world=world_size(cfg))

    @classmethod
    def attach(cls, cfg: Config, run_dir: Path) -> "Tracker":
        """Add to run_dir's training run (evaluation jobs): its status and params stay as they are."""
        _check_rank0()
        if not (Path(run_dir) / RUN_ID_FILE).is_file():
            raise UserError(f"{Path(run_dir) / RUN_ID_FILE}: no MLflow run recorded for this run "
                            "directory (was its training tracked?)")
        tracker = cls(tracking_uri(cfg, run_dir), run_dir, owner=False, experiment=cfg.mlflow.experiment,
                      run_name=str(cfg.run.name), params={}, tags={}, files={}, world=world_size(cfg))
        tracker._start()
        return tracker

    def _start(self) -> None:
        err = self._try_connect()
        if err is not None:
            self._failed(err)  # the server is away: the worker connects when it is back
        self._worker.start()

    def _try_connect(self) -> Optional[Exception]:
        """Connect now: a permanent refusal raises UserError, a transient failure is returned."""
        try:
            self._connect()
        except UserError:
            raise
        except Exception as err:
            if _permanent(err):
                raise UserError(f"MLflow at {self.uri}: {first_line(err)}") from None
            return err
        return None

    def _connect(self) -> None:
        """Create or reopen the run: params checked and logged, tags set, last steps read back."""
        from mlflow.exceptions import MlflowException

        client, stored = self._client, self.run_dir / RUN_ID_FILE
        if not stored.is_file():
            self._create(stored)
        run_id = stored.read_text().strip()
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.get_http_status_code() != 404:
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            raise UserError(f"{stored}: MLflow run {run_id} is not (or no longer) in the store at "
                            f"{self.uri} (another mlflow.tracking_uri?); restore that store, or remove "
                            "the file to start a new MLflow run")
        if self._owner:
            changed = resume_changes(run.data.params, self._params, str(stored))
            missing = {k: v for k, v in self._params.items() if k not in run.data.params}
            tags = dict(self._tags, **{f"changed.{k}": v for k, v in changed.items()})
            for tag in run.data.tags:  # a key changed before and now back to its first value
                if tag.startswith("changed.") and tag[len("changed."):] not in changed:
                    tags[tag] = run.data.params.get(tag[len("changed."):], "")
            attempt = int(run.data.tags.get("regscale.attempt", "0"))
            tags["regscale.attempt"] = str(attempt if self._scheduled else attempt + 1)
            jobs = [j for j in run.data.tags.get("slurm.job_ids", "").split(",") if j]
            if tags.get("slurm.job_id") and tags["slurm.job_id"] not in jobs:
                jobs.append(tags["slurm.job_id"])
            if jobs:
                tags["slurm.job_ids"] = ",".join(jobs)
            self._log_batch(run_id, params=missing, tags=tags)
            if self._scheduled and attempt == 0:
                client.update_run(run_id, status="SCHEDULED")
            elif not self._scheduled and run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            for artifact_dir, path in self._files.items():
                client.log_artifact(run_id, str(path), artifact_dir)
            self._files = {}
        for key in run.data.metrics:
            history = client.get_metric_history(run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        self._experiment_id = run.info.experiment_id
        self._run_id = run_id

    def _create(self, stored: Path) -> None:
        """A new run in cfg.mlflow.experiment; its id goes to run_dir/mlflow_run_id at once."""
        from mlflow.exceptions import MlflowException

        client = self._client
        exp = client.get_experiment_by_name(self._experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self._experiment, artifact_location=artifact_location(self.uri),
                                                  tags=EXPERIMENT_KIND)
            except MlflowException:  # another job created it meanwhile
                exp = client.get_experiment_by_name(self._experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        elif exp.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment '{self._experiment}' at {self.uri} is deleted; restore "
                            "it or choose another mlflow.experiment")
        else:
            exp_id = exp.experiment_id
            for key, value in EXPERIMENT_KIND.items():  # experiments made before regscale set it
                if exp.tags.get(key) != value:
                    client.set_experiment_tag(exp_id, key, value)
        tags = {"regscale.run_dir": str(self.run_dir.resolve()), "regscale.attempt": "0", **source_tags()}
        run = client.create_run(exp_id, run_name=self._run_name, tags=tags)
        write_atomic(stored, run.info.run_id + "\n")

    def _load_pending(self) -> None:
        """Queue what earlier attempts could not deliver (their final status is superseded)."""
        stored = self.run_dir / RUN_ID_FILE
        run_id = stored.read_text().strip() if stored.is_file() else None
        for path in sorted(self.run_dir.glob(f"{PENDING_PREFIX}*.json")):
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("MLflow: %s is unreadable; its buffered entries are lost", path)
                continue
            if saved["run_id"] and saved["run_id"] != run_id:
                log.warning("MLflow: %s belongs to run %s, not this run directory's %s; ignored",
                            path, saved["run_id"], run_id)
                continue
            self._ops.extend(op for op in saved["ops"] if op["op"] != "status")
            self._consumed.append(path)

    # -- the public calls: they queue and return -----------------------------------------------

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id (None until the server has been reached)."""
        return self._run_id

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
        self._put({"op": "metrics", "metrics": values, "step": int(step), "ts": _now_ms()})

    def log_image(self, path: Path, step: int) -> None:
        """Log a sample grid as samples/step_XXXXXXXX.<its suffix> (copied now: the caller may reuse
        the file)."""
        dest = self.run_dir / OUTBOX / f"{step_name(step)}{Path(path).suffix or '.png'}"
        try:
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, dest)
        except OSError as err:
            log.warning("MLflow: sample grid %s not logged: %s", path, err)
            return
        self._put({"op": "artifact", "path": str(dest), "artifact_path": "samples", "remove": True})

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a directory to the run's artifacts (read when delivered)."""
        self._put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path,
                   "remove": False})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (values as strings)."""
        self._put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_eval(self, metrics: dict[str, float], step: int, info: dict[str, Any],
                 started: Optional[float] = None) -> None:
        """Record an evaluation of the checkpoint at training `step`: a nested child run (`info` as
        params, `metrics`) that ran from `started` (Unix time; default: when this tracker was made,
        i.e. when the evaluation job began) to now, and each metric mirrored on the training run
        as eval/<name> at `step`."""
        self._put({"op": "eval", "metrics": {k: float(v) for k, v in metrics.items()},
                   "step": int(step), "info": {k: str(v) for k, v in info.items()}, "ts": _now_ms(),
                   "start": int(started * 1000) if started is not None else self._started_ms})

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued is delivered (retrying now if the server was away);
        False if that did not happen within timeout s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retry_at = 0.0
            self._cond.notify_all()
            while (self._ops or self._busy) and not self._disabled and self._worker.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return not self._ops

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
            self._put({"op": "status", "status": status, "ts": _now_ms()})
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout=_CONNECT_TIMEOUT_S + 5)
        with self._cond:
            if self._ops:
                self._save_pending()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")

    # -- delivery ------------------------------------------------------------------------------

    def _gpu_hours(self, save: bool = False) -> float:
        """GPU hours of the lineage so far, kept in the run dir (at most a minute behind) so that
        killed attempts count too."""
        now = time.monotonic()
        hours = self._gpu_hours0 + (now - self._t0) * self._world / 3600.0
        if save or now - self._gpu_saved >= 60.0:
            write_atomic(self.run_dir / GPU_HOURS_FILE, f"{hours:.6f}\n")
            self._gpu_saved = now
        return hours

    def _put(self, op: dict[str, Any]) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def _failed(self, err: Exception) -> None:
        """Note a failed delivery: warn once per outage, retry later with a growing delay."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            first = (str(err).splitlines() or [type(err).__name__])[0][:300]
            log.warning("MLflow at %s unreachable (%s); buffering and retrying, training goes on",
                        self.uri, first)
        doublings = min(10, int(now - self._failing_since).bit_length())  # ~ the outage's length so far
        self._retry_at = now + min(_MAX_BACKOFF_S, 2.0 ** doublings)

    def _save_pending(self) -> None:
        path = self.run_dir / f"{PENDING_PREFIX}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
        write_atomic(path, json.dumps({"run_id": self._run_id, "ops": list(self._ops)}))
        for old in self._consumed:
            old.unlink(missing_ok=True)
        log.warning("MLflow: %d undelivered entries saved to %s; the next Tracker.open of this run "
                    "directory sends them", len(self._ops), path)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    failing = self._failing_since is not None
                    if self._disabled or (self._closing and (not self._ops or failing)):
                        return
                    wait = self._retry_at - time.monotonic()
                    if wait <= 0 and (self._ops or self._run_id is None):
                        break
                    self._cond.wait(wait if wait > 0 else None)
                batch = self._take()
                self._busy = True
            try:
                if self._run_id is None:
                    self._connect()
                self._deliver(batch)
                delivered = True
            except UserError as err:  # a resume that changes params, found after an outage
                log.error("MLflow tracking disabled for this attempt: %s", err)
                with self._cond:
                    self._disabled, self._busy = True, False
                    self._cond.notify_all()
                return
            except Exception as err:
                delivered = self._run_id is not None and _permanent(err)
                if delivered:
                    log.error("MLflow refused %s entries; dropped: %s", batch[0]["op"], err)
                else:
                    self._failed(err)
            with self._cond:
                self._busy = False
                if delivered:
                    for _ in batch:
                        self._ops.popleft()
                    if self._failing_since is not None:
                        log.warning("MLflow at %s is back; delivering buffered entries", self.uri)
                        self._failing_since, self._retry_at = None, 0.0
                    if not self._ops:
                        for old in self._consumed:
                            old.unlink(missing_ok=True)
                        self._consumed = []
                self._cond.notify_all()

    def _take(self) -> list[dict[str, Any]]:
        """The next operation, or the next consecutive metric operations (<= _BATCH values)."""
        batch, size = [], 0
        for op in self._ops:
            if batch and (op["op"] != "metrics" or batch[0]["op"] != "metrics"
                          or size + len(op["metrics"]) > _BATCH):
                break
            batch.append(op)
            size += len(op.get("metrics", ()))
        return batch

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        if not batch:
            return
        op, client, run_id = batch[0], self._client, self._run_id
        if op["op"] == "metrics":
            points, last = [], dict(self._last_step)
            for op in batch:
                for key, value in op["metrics"].items():
                    if op["step"] > last.get(key, -1):  # never twice, never behind: resumes replay steps
                        points.append(Metric(key, value, op["ts"], op["step"]))
                        last[key] = op["step"]
            for i in range(0, len(points), _BATCH):
                client.log_batch(run_id, metrics=points[i:i + _BATCH])
            self._last_step = last
        elif op["op"] == "artifact":
            path = Path(op["path"])
            if not path.exists():
                log.warning("MLflow: artifact %s no longer exists; skipped", path)
            elif path.is_dir():
                client.log_artifacts(run_id, str(path), op["artifact_path"])
            else:
                client.log_artifact(run_id, str(path), op["artifact_path"])
                if op["remove"]:
                    path.unlink()
        elif op["op"] == "tags":
            self._log_batch(run_id, tags=op["tags"])
        elif op["op"] == "status":
            client.set_terminated(run_id, op["status"], end_time=op["ts"])
        elif op["op"] == "eval":
            self._deliver_eval(op)
        else:
            raise ValueError(f"unknown tracker operation {op['op']!r}")

    def _deliver_eval(self, op: dict[str, Any]) -> None:
        """The child run (found again by a content id, so a retry makes no second one) + mirror."""
        from mlflow.entities import Metric

        client, parent = self._client, self._run_id
        eval_id = hashlib.sha256(json.dumps([op["step"], op["info"], op["metrics"]],
                                            sort_keys=True).encode()).hexdigest()[:16]
        found = client.search_runs([self._experiment_id], f"tags.mlflow.parentRunId = '{parent}' "
                                   f"and tags.`regscale.eval_id` = '{eval_id}'")
        if found:
            child = found[0].info.run_id
        else:
            source = client.get_run(parent).data.tags  # the command that submitted the chain
            child = client.create_run(self._experiment_id, run_name=f"{self._run_name}-eval-{op['step']}",
                                      start_time=op.get("start", op["ts"]), tags={
                                          "mlflow.parentRunId": parent, "regscale.kind": "eval",
                                          "regscale.eval_id": eval_id, "regscale.step": str(op["step"]),
                                          **source_tags(),
                                          **{k: v for k, v in source.items() if k.startswith("mlflow.source.")},
                                      }).info.run_id
        self._log_batch(child, params=op["info"],
                        metrics=[Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()])
        client.set_terminated(child, "FINISHED", end_time=op["ts"])
        mirror = [Metric(EVAL_PREFIX + k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()
                  if all(m.step != op["step"] for m in client.get_metric_history(parent, EVAL_PREFIX + k))]
        if mirror:
            client.log_batch(parent, metrics=mirror)

    def _log_batch(self, run_id: str, *, params: Optional[dict[str, str]] = None,
                   tags: Optional[dict[str, str]] = None, metrics: Sequence[Any] = ()) -> None:
        """log_batch in chunks MLflow accepts (<= 100 params and <= 100 tags per call)."""
        from mlflow.entities import Param, RunTag

        p = [Param(k, v) for k, v in (params or {}).items()]
        t = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, max(len(p), len(t), 1), _PARAM_BATCH):
            self._client.log_batch(run_id, params=p[i:i + _PARAM_BATCH], tags=t[i:i + _PARAM_BATCH],
                                   metrics=list(metrics) if i == 0 else [])


def register_run(cfg: Config, run_dir: Path, *, recipe: Optional[Path] = None) -> Optional[str]:
    """Create (or check) run_dir's MLflow run before its job starts, so `submit` can print the id:
    params and config logged, status SCHEDULED until the job's `Tracker.open`. Raises UserError as
    `Tracker.open` does; returns None when the server is unreachable (the job creates the run)."""
    tracker = Tracker._owner_of(cfg, run_dir, recipe)
    tracker._scheduled = True
    err = tracker._try_connect()
    if err is not None:
        log.warning("MLflow at %s unreachable (%s); the training job will create the run",
                    tracker.uri, (str(err).splitlines() or [type(err).__name__])[0][:300])
        return None
    return tracker.run_id
