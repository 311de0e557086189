"""The names of everything in a run directory (<run.dir>/<run.name>/), of an evaluation's folder,
and of the tracking store beside the run directories: their one home (training writes them,
launch, eval and tracking read them). Inside a checkpoint (regscale.checkpoints, the engines) and
inside a sampling's shards/ (regscale.eval.sample) the names are those formats' own.
"""

from __future__ import annotations

import re
from typing import Optional

# The run directory
CONFIG = "config.yaml"  # the resolved configuration: what makes a folder a run directory
RECIPE = "recipe.yaml"  # the recipe as written, logged beside the config when present
METRICS = "metrics.jsonl"  # one JSON object per logged step, written by rank 0
CHECKPOINTS = "checkpoints"
JOB_FOLDER = "jobs"  # submitit's job scripts, logs and results
JOBS = "jobs.json"  # what was submitted for the run
JOBS_LOCK = ".jobs.lock"
ATTEMPTS = "attempts.jsonl"  # what each start of the training job did
STOP_REPORT = "stop_report.json"  # why the launcher stopped the run
SAMPLES = "samples"  # training's sample grids, one per step_name
LOGS = "logs"  # one log per rank and attempt, written by the node agents
STACKS = "stacks"  # every thread's stack of each rank, dumped when its group hung
DRAWS = "draws"  # traces of the noise draws (REGSCALE_TRACE_DRAWS), one file per rank
EVAL = "eval"  # one evaluation folder per step_name

# An evaluation's folder (eval/step_XXXXXXXX/, or `regscale sample --out`)
EVAL_SAMPLES = "samples.npz"
EVAL_SHARDS = "shards"  # each rank's samples until they are joined into EVAL_SAMPLES
EVAL_RECORD = "eval_record.json"
PROGRESS = "progress.json"  # the job's stage and progress, for a `regscale submit` waiting on it

# MLflow tracking of the run
MLFLOW_RUN_ID = "mlflow_run_id"
MLFLOW_GPU_HOURS = "mlflow_gpu_hours"
MLFLOW_PENDING = "mlflow_pending"  # prefix of the files of undelivered tracking operations
MLFLOW_OUTBOX = "mlflow_outbox"  # copies of images and config files waiting to be uploaded
MLFLOW_REJECTED = "rejected"  # in MLFLOW_OUTBOX: entries that could never be delivered

# Beside the run directories, in run.dir: the default tracking store
MLFLOW_DB = "mlflow.db"
MLARTIFACTS = "mlartifacts"
MLFLOW_UI_LOG = "mlflow-ui.log"

_STEP = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    """The name of everything made per training step: checkpoints, evaluations, sample grids."""
    return f"step_{int(step):08d}"


def step_of(name: str) -> Optional[int]:
    """The step a `step_name` encodes, or None for any other name (`step_00000006.broken-...`)."""
    match = _STEP.match(name)
    return int(match.group(1)) if match else None
