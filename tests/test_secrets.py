"""Secrets are never written down. Credentials come from the environment only (a URI that carries
them is refused: tests/test_bad_inputs.py); from there they work end to end: training from the S3
server (tests/fixtures/s3.py) tracked to MLflow's basic-auth server (tests/fixtures/mlflow.py). A
wrong password is one line at submit, before anything is made; a run preempted and started again
keeps its MLflow run. Then the secrets planted in the environment (the MLflow password, the AWS
secret key, a variable nobody reads) are looked for everywhere the run wrote: the run directory,
its MLflow params, tags and artifacts, and the job's output. None is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

from regscale.data.prepare import PrepareOptions, prepare
from regscale.rundir import CONFIG, MLFLOW_RUN_ID
from tests.fixtures.data import make_reg_layout
from tests.fixtures.train import REPO, SMOKE, launch_train, losses, ok


def test_credentials_from_the_environment_work_end_to_end_and_are_written_nowhere(s3, mlflow_auth_server, tmp_path,
                                                                                  monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}",
               "MLFLOW_TRACKING_PASSWORD": mlflow_auth_server.env["MLFLOW_TRACKING_PASSWORD"],
               "REGSCALE_PLANTED_SECRET": f"planted-{uuid.uuid4().hex}"}
    env = {**s3.env, **mlflow_auth_server.env, **secrets}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3.new_bucket()}/data"
    prepare(str(make_reg_layout(tmp_path / "src", 32, 10)), uri,
            PrepareOptions(chunk_size=16, progress=False, stage=str(tmp_path / "stage")))
    overrides = [f"mlflow.tracking_uri={mlflow_auth_server.url}", "mlflow.experiment=secrets", "data.synthetic=0",
                 f"data.local_cache={tmp_path / 'cache'}", "train.max_steps=4", "train.ckpt_every=2"]
    runs = tmp_path / "runs"

    wrong = subprocess.run([sys.executable, "-m", "regscale.cli", "submit", "--local", str(SMOKE), f"data.path={uri}",
                            f"run.dir={runs}", "run.name=r", *overrides], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "MLFLOW_TRACKING_PASSWORD": "wrong"}, timeout=600)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert f"{mlflow_auth_server.url}: the server refuses these credentials (HTTP 401)" in wrong.stderr
    assert not runs.exists()

    run = runs / "r"
    first = launch_train(run, uri, overrides, env=env, nproc=0, usr2_at=2, tracked=True)
    assert "regscale train: preempted" in first.stdout, ok(first)
    run_id = (run / MLFLOW_RUN_ID).read_text().strip()
    last = launch_train(run, uri, overrides, env=env, nproc=0, tracked=True)
    assert last.returncode == 0, ok(last)
    assert (run / MLFLOW_RUN_ID).read_text().strip() == run_id, "the started-again run has another MLflow run"

    client = MlflowClient(mlflow_auth_server.url)
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.data.tags["regscale.attempt"] == "2"
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert logged == set(losses(run)) and {1, 2, 4} <= logged  # no loss is logged at the step it stopped at
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    written = {
        **{str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()},
        **{f"artifact {p.relative_to(artifacts)}": p.read_bytes() for p in artifacts.rglob("*") if p.is_file()},
        "MLflow params": repr(tracked.data.params).encode(), "MLflow tags": repr(tracked.data.tags).encode(),
        "job output": "".join([wrong.stdout, wrong.stderr, first.stdout, first.stderr, last.stdout,
                               last.stderr]).encode(),
    }
    assert {str(run / CONFIG), "artifact config/config.yaml"} <= written.keys()
    assert any(name.endswith("manifest.json") for name in written), "no checkpoint looked at"
    leaks = [(name, where) for name, secret in secrets.items() for where, data in written.items()
             if secret.encode() in data]
    assert not leaks, f"secrets written down: {leaks}"
