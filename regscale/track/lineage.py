"""Which MLflow run holds a run directory's lineage, and whether this job may go on with it.

One MLflow run per training lineage: created once, its id kept in `<run_dir>/mlflow_run_id`, and
reopened by that id (never looked up by name) after every requeue or resume. The training job
owns the run: on reopen its configuration must match the run's params outside
config.RESUMABLE_KEYS (config.resume_changes: the one check), the resumable keys it changed are
tagged `changed.<key>`, and the run is marked RUNNING again. Evaluation jobs attach: they add to
the run and leave its params and status alone; each evaluation is a child run of it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from regscale.config import Config, config_hash, flatten, resume_changes
from regscale.dist import launcher_layout
from regscale.errors import UserError, first_line
from regscale.fsutil import write_atomic
from regscale.rundir import MLARTIFACTS, MLFLOW_DB, MLFLOW_RUN_ID
from regscale.track.client import is_permanent, log_batch

# MLflow 3 files an experiment without a kind under GenAI (traces, evaluations); this is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CHANGED = "changed."  # tag prefix of a resumable key whose value differs from the run's param


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    """cfg.mlflow.tracking_uri, or a SQLite store in the run directory's parent."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    return f"sqlite:///{(Path(run_dir).resolve().parent / MLFLOW_DB)}"


def artifact_location(uri: str) -> Optional[str]:
    """Artifacts beside a SQLite store (`mlartifacts/` next to the .db); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / MLARTIFACTS).as_uri()
    return None


def config_params(cfg: Config) -> dict[str, str]:
    """The flattened configuration as MLflow params (`a.b.c -> str`)."""
    return {key: str(value) for key, value in flatten(cfg).items()}


def stored_run_id(run_dir: Path) -> Optional[str]:
    """The id in run_dir/mlflow_run_id, or None before the lineage's run exists."""
    stored = Path(run_dir) / MLFLOW_RUN_ID
    return stored.read_text().strip() if stored.is_file() else None


def world_size(cfg: Config) -> int:
    """Processes of this job: the launcher's environment, else the recipe."""
    layout = launcher_layout()
    return layout.world_size if layout else cfg.world_size


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


@dataclass
class RunRef:
    """The lineage's run as reached: where to log, and the newest step of each metric it has."""

    run_id: str
    experiment_id: str
    run_name: str
    last_steps: dict[str, int] = field(default_factory=dict)


@dataclass
class Lineage:
    """How this job reaches its lineage's run: as its owner (the training job) or attached."""

    uri: str
    run_dir: Path
    experiment: str
    run_name: str
    owner: bool
    params: dict[str, str] = field(default_factory=dict)  # the owner's config, checked and logged once
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # artifact dir -> file, logged by the owner
    scheduled: bool = False  # registered before its job starts (status SCHEDULED)

    @classmethod
    def owned(cls, cfg: Config, run_dir: Path, files: dict[str, Path], *, scheduled: bool = False) -> "Lineage":
        """The training job's view: it creates or reopens the run and sets its status."""
        return cls(tracking_uri(cfg, run_dir), Path(run_dir), cfg.mlflow.experiment, str(cfg.run.name),
                   owner=True, params=config_params(cfg), tags=run_tags(cfg), files=files, scheduled=scheduled)

    @classmethod
    def attached(cls, cfg: Config, run_dir: Path) -> "Lineage":
        """An evaluation job's view: the run must exist; its status and params stay as they are."""
        if stored_run_id(run_dir) is None:
            raise UserError(f"{Path(run_dir) / MLFLOW_RUN_ID}: no MLflow run recorded for this run "
                            "directory (was its training tracked?)")
        return cls(tracking_uri(cfg, run_dir), Path(run_dir), cfg.mlflow.experiment, str(cfg.run.name), owner=False)

    def reach(self, client: Any) -> RunRef:
        """Create or reopen the run (as owner: params checked and logged, tags and status set,
        files logged). Raises UserError for what the server refuses for good (a stored run it does
        not have, a config that changes the experiment, a 4xx); other errors are outages."""
        from mlflow.exceptions import MlflowException

        try:
            return self._reach(client)
        except MlflowException as err:
            if is_permanent(err):
                raise UserError(f"MLflow at {self.uri}: {first_line(err)}") from None
            raise

    def _reach(self, client: Any) -> RunRef:
        from mlflow.exceptions import MlflowException

        stored = self.run_dir / MLFLOW_RUN_ID
        if not stored.is_file():
            self._create(client, stored)
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
        if self.owner:
            self._take_over(client, run, str(stored))
        last_steps = {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
                      for key in run.data.metrics}
        return RunRef(run_id, run.info.experiment_id, self.run_name, last_steps)

    def _take_over(self, client: Any, run: Any, where: str) -> None:
        """The owner's reopen: refuse an experiment change, log what is new, set the status."""
        params, old_tags = run.data.params, run.data.tags
        changed = resume_changes(params, self.params, where)
        tags = dict(self.tags, **{CHANGED + k: v for k, v in changed.items()})
        for tag in old_tags:  # a key changed before and now back to its first value
            if tag.startswith(CHANGED) and tag[len(CHANGED):] not in changed:
                tags[tag] = params.get(tag[len(CHANGED):], "")
        attempt = int(old_tags.get("regscale.attempt", "0"))
        tags["regscale.attempt"] = str(attempt if self.scheduled else attempt + 1)
        jobs = [j for j in old_tags.get("slurm.job_ids", "").split(",") if j]
        if tags.get("slurm.job_id") and tags["slurm.job_id"] not in jobs:
            jobs.append(tags["slurm.job_id"])
        if jobs:
            tags["slurm.job_ids"] = ",".join(jobs)
        run_id = run.info.run_id
        log_batch(client, run_id, params={k: v for k, v in self.params.items() if k not in params}, tags=tags)
        if self.scheduled and attempt == 0:
            client.update_run(run_id, status="SCHEDULED")
        elif not self.scheduled and run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        for artifact_dir, path in self.files.items():
            client.log_artifact(run_id, str(path), artifact_dir)

    def _create(self, client: Any, stored: Path) -> None:
        """A new run in the experiment; its id goes to run_dir/mlflow_run_id at once."""
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(self.experiment, artifact_location=artifact_location(self.uri),
                                                  tags=EXPERIMENT_KIND)
            except MlflowException:  # another job created it meanwhile
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        elif exp.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment '{self.experiment}' at {self.uri} is deleted; restore "
                            "it or choose another mlflow.experiment")
        else:
            exp_id = exp.experiment_id
            for key, value in EXPERIMENT_KIND.items():  # experiments made before regscale set it
                if exp.tags.get(key) != value:
                    client.set_experiment_tag(exp_id, key, value)
        tags = {"regscale.run_dir": str(self.run_dir.resolve()), "regscale.attempt": "0", **source_tags()}
        run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
        write_atomic(stored, run.info.run_id + "\n")


def eval_run(client: Any, parent: RunRef, step: int, info: dict[str, str], metrics: dict[str, float],
             started_ms: int) -> str:
    """The child run of an evaluation of `parent`'s checkpoint at `step`: found again by a content
    id of its record (so a retry makes no second one), else created, with the parent's source."""
    eval_id = hashlib.sha256(json.dumps([step, info, metrics], sort_keys=True).encode()).hexdigest()[:16]
    found = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}' "
                               f"and tags.`regscale.eval_id` = '{eval_id}'")
    if found:
        return found[0].info.run_id
    source = client.get_run(parent.run_id).data.tags  # the command that submitted the chain
    tags = {"mlflow.parentRunId": parent.run_id, "regscale.kind": "eval", "regscale.eval_id": eval_id,
            "regscale.step": str(step), **source_tags(),
            **{k: v for k, v in source.items() if k.startswith("mlflow.source.")}}
    return client.create_run(parent.experiment_id, run_name=f"{parent.run_name}-eval-{step}",
                             start_time=started_ms, tags=tags).info.run_id
