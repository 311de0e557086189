"""The MLflow client as the tracker uses it: quiet, failing fast, and within MLflow's batch limits."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence

BATCH = 1000  # MLflow's limit on metrics per log_batch
PARAM_BATCH = 100  # and on params / tags
CONNECT_TIMEOUT_S = 10


def make_client(uri: str) -> Any:
    """An MlflowClient for `uri` that neither prints per run nor retries for minutes (the
    tracker's own worker retries, with its own backoff)."""
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" per run end
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(CONNECT_TIMEOUT_S))
    return MlflowClient(tracking_uri=uri)


def log_batch(client: Any, run_id: str, *, params: Optional[dict[str, str]] = None,
              tags: Optional[dict[str, str]] = None, metrics: Sequence[Any] = ()) -> None:
    """log_batch in chunks MLflow accepts (<= 100 params and <= 100 tags per call)."""
    from mlflow.entities import Param, RunTag

    p = [Param(k, v) for k, v in (params or {}).items()]
    t = [RunTag(k, v) for k, v in (tags or {}).items()]
    for i in range(0, max(len(p), len(t), 1), PARAM_BATCH):
        client.log_batch(run_id, params=p[i:i + PARAM_BATCH], tags=t[i:i + PARAM_BATCH],
                         metrics=list(metrics) if i == 0 else [])


def is_permanent(err: Exception) -> bool:
    """An error the server will answer the same way next time (a 4xx), not an outage."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.get_http_status_code() < 500


def now_ms() -> int:
    return int(time.time() * 1000)
