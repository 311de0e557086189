"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (tests/fixtures/mlflow.py)."""

from __future__ import annotations

import csv
import getpass
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from regscale.cli import main
from regscale.config import load_config
from regscale.errors import UserError
from regscale.rundir import (ATTEMPTS, METRICS, MLARTIFACTS, MLFLOW_DB, MLFLOW_OUTBOX, MLFLOW_PENDING, MLFLOW_REJECTED,
                             MLFLOW_RUN_ID, MLFLOW_UI_LOG)
from regscale.track.lineage import config_params
from regscale.track.mlflow import Tracker, register_run
from regscale.track.ui import check_port
from tests.fixtures.mlflow import free_port
from tests.fixtures.train import TORCHRUN

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"


def make_cfg(tmp_path: Path, uri: str, experiment: str, *overrides: str):
    return load_config(SMOKE, [f"run.dir={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}",
                               f"mlflow.experiment={experiment}", *overrides])


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def grid_png(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (64, 32), color).save(path)
    return path


@pytest.fixture
def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_run_logs_params_metrics_tags_and_artifacts(mlflow_server, tmp_path, experiment):
    cfg = make_cfg(tmp_path, mlflow_server.url, experiment)
    run_dir = tmp_path / "runs" / "smoke"
    with Tracker.open(cfg, run_dir) as tracker:
        for step in (5, 10, 15):
            tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-4, "images_per_s": 100.0 + step,
                                 "grad_norm": math.nan if step == 5 else 0.5}, step)
        tracker.log_image(grid_png(tmp_path / "grid.png", (255, 0, 0)), 10)
        tracker.set_tags({"resumed_from": ""})
    client = MlflowClient(mlflow_server.url)
    run_id = (run_dir / MLFLOW_RUN_ID).read_text().strip()
    assert run_id == tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke"
    assert run.data.params == config_params(cfg)
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["train.betas"] == "[0.9, 0.999]"
    assert steps_of(client, run_id, "loss") == [5, 10, 15]
    assert client.get_metric_history(run_id, "loss")[-1].value == pytest.approx(1 / 15)
    assert steps_of(client, run_id, "gpu_hours") == [5, 10, 15]
    assert math.isnan(client.get_metric_history(run_id, "grad_norm")[0].value)
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["engine"] == "fsdp" and tags["requeue_count"] == "0"
    assert tags["regscale.attempt"] == "1" and len(tags["mlflow.source.git.commit"]) == 40
    # the UI's Source and User columns: the command that created the run, and who ran it
    assert tags["mlflow.source.name"] == shlex.join(sys.argv) and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.user"] == getpass.getuser()
    artifacts = {a.path for d in ("config", "samples") for a in client.list_artifacts(run_id, d)}
    assert artifacts == {"config/config.yaml", "samples/step_00000010.png"}
    image = Path(client.download_artifacts(run_id, "samples/step_00000010.png", str(tmp_path)))
    assert Image.open(image).getpixel((0, 0)) == (255, 0, 0)
    # one run in the experiment: the lineage is never found (or duplicated) by name
    exp = client.get_experiment_by_name(experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1
    # a model-training experiment, not MLflow 3's default GenAI one
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


KILLED_ATTEMPT = """
import sys, time
from pathlib import Path
from regscale.config import load_config
from regscale.track.mlflow import Tracker
cfg = load_config(sys.argv[1], sys.argv[3:])
tracker = Tracker.open(cfg, Path(sys.argv[2]))
for step in range(5, 35, 5):
    tracker.log_metrics({"loss": 1.0 / step}, step)
assert tracker.flush(60)
print("logged", flush=True)
time.sleep(600)
"""


def test_killed_and_resumed_run_continues_the_same_run(mlflow_server, tmp_path, experiment, monkeypatch):
    overrides = [f"run.dir={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_server.url}",
                 f"mlflow.experiment={experiment}"]
    run_dir = tmp_path / "runs" / "smoke"
    client = MlflowClient(mlflow_server.url)
    # `regscale submit` registers the run before the job starts, to print its id
    run_id = register_run(make_cfg(tmp_path, mlflow_server.url, experiment), run_dir)
    assert client.get_run(run_id).info.status == "SCHEDULED"
    env = dict(os.environ, SLURM_JOB_ID="101", PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-c", KILLED_ATTEMPT, str(SMOKE), str(run_dir), *overrides],
                             stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert first.stdout.readline().strip() == "logged"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (run_dir / MLFLOW_RUN_ID).read_text().strip() == run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody could say otherwise

    # the requeued job: its checkpoint was at step 20, so steps 25 and 30 are replayed
    cfg = make_cfg(tmp_path, mlflow_server.url, experiment, "train.max_steps=80")
    with pytest.raises(UserError, match=r"'train.lr' was '0.0001', now '0.0002'"):
        Tracker.open(make_cfg(tmp_path, mlflow_server.url, experiment, "train.lr=2e-4"), run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    tracker = Tracker.open(cfg, run_dir)
    assert tracker.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(25, 55, 5):
        tracker.log_metrics({"loss": 2.0 / step}, step)
    tracker.finish("completed")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(5, 55, 5))  # monotonic, no duplicates
    assert {m.step: m.value for m in history}[30] == pytest.approx(1 / 30)  # first attempt's value kept
    assert run.data.params["train.max_steps"] == "40"  # params are logged once
    assert run.data.tags["changed.train.max_steps"] == "80"
    assert run.data.tags["regscale.attempt"] == "2" and run.data.tags["requeue_count"] == "1"
    assert run.data.tags["slurm.job_ids"] == "101"
    exp = client.get_experiment_by_name(experiment)
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]


def test_eval_child_runs_and_mirrored_metrics(mlflow_server, tmp_path, experiment, capsys):
    cfg = make_cfg(tmp_path, mlflow_server.url, experiment)
    run_dir = tmp_path / "runs" / "smoke"
    tracker = Tracker.open(cfg, run_dir)
    tracker.log_metrics({"loss": 0.5}, 40)
    result = {"fid": 30.5, "sfid": 12.0, "is": 4.5, "precision": 0.6, "recall": 0.4}
    tracker.log_eval(result, 20, {"num_samples": 64, "cfg_scale": 1.5, "weights": "ema"})
    tracker.finish("FINISHED")
    # a later evaluation job adds to the finished run without touching its status; its retry
    # of an identical record makes no second child and no duplicate point
    evaluation = Tracker.attach(cfg, run_dir)
    began = time.time() - 90  # the job started sampling 90 s before it logged
    evaluation.log_eval(dict(result, fid=25.0), 40, {"num_samples": 64, "cfg_scale": 1.5, "weights": "ema"},
                        started=began)
    evaluation.log_eval(dict(result, fid=25.0), 40, {"num_samples": 64, "cfg_scale": 1.5, "weights": "ema"},
                        started=began)
    evaluation.finish()
    assert "View run" not in capsys.readouterr().out  # MLflow's own line at each run's end

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == "FINISHED"
    fid = client.get_metric_history(tracker.run_id, "eval/fid")
    assert [(m.step, m.value) for m in fid] == [(20, 30.5), (40, 25.0)]
    assert steps_of(client, tracker.run_id, "eval/recall") == [20, 40]
    children = sorted(client.search_runs([parent.info.experiment_id],
                                         f"tags.mlflow.parentRunId = '{tracker.run_id}'"),
                      key=lambda c: int(c.data.tags["regscale.step"]))
    assert [c.data.tags["regscale.step"] for c in children] == ["20", "40"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert children[0].data.metrics == result
    assert children[1].data.params == {"num_samples": "64", "cfg_scale": "1.5", "weights": "ema"}
    # each child runs from its evaluation's start to its end (default start: the tracker's creation)
    assert children[0].info.start_time == tracker._started_ms <= children[0].info.end_time
    assert children[1].info.start_time == int(began * 1000)
    assert children[1].info.end_time - children[1].info.start_time >= 90_000
    assert children[1].data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]


def log_goodput_of_records(tracker: Tracker, run_dir: Path) -> None:
    """Write a finished local job's records into run_dir and log its goodput (0.6) as the job does."""
    from regscale.launch import runs
    from regscale.launch.goodput import log_goodput

    runs.add_jobs(run_dir, [runs.JobRecord("77", "train", "local", submitted_at=1000.0)])
    lines = [{"event": "start", "job_id": "77", "restart": 0, "start_step": 0, "started_at": 1000.0, "world_size": 2},
             {"event": "end", "end": "completed", "end_step": 10, "ended_at": 1030.0}]
    (run_dir / ATTEMPTS).write_text("".join(json.dumps(e) + "\n" for e in lines))
    rows = [{"step": 1, "time": 1010.0, "time/first_step_s": 10.0, "time/first_step_duration_s": 2.0},
            {"step": 10, "time": 1028.0, "step_s": 2.0}]
    (run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    log_goodput(tracker, run_dir, default_gpus=1, step=300)


def test_compare_two_runs_table_plot_csv(mlflow_server, tmp_path, experiment, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # the table whole, whatever terminal runs the tests
    for name, lr, fids, base in (("reg-a", "1e-4", {100: 40.0, 200: 20.0, 300: 22.0}, 1.0),
                                 ("reg-b", "2e-4", {100: 35.0, 200: 28.0}, 0.8)):
        cfg = make_cfg(tmp_path, mlflow_server.url, experiment, f"run.name={name}", f"train.lr={lr}")
        with Tracker.open(cfg, tmp_path / "runs" / name) as tracker:
            for step in range(10, 310, 10):
                tracker.log_metrics({"loss": base / (1 + step / 100), "images_per_s": 500.0 * base,
                                     "gpu_hours": step * base / 100}, step)
            for step, fid in fids.items():
                tracker.log_eval({"fid": fid}, step, {"num_samples": 64})
            if name == "reg-a":  # its records: a local job, 10 s to its first step, 18 s of steps, 2 s to stop
                log_goodput_of_records(tracker, tmp_path / "runs" / name)
    out_png, out_csv = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    code = main(["compare", "--tracking-uri", mlflow_server.url, "--experiment", experiment,
                 "--plot", str(out_png), "--csv", str(out_csv)])
    text = capsys.readouterr().out
    assert code == 0
    assert "train.lr" in text and "model.depth" not in text and "run.name" not in text
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["reg-a", "reg-b"]
    # numbers as numbers (every digit), comparability in its own column
    assert [(r["train.lr"], float(r["best FID"]), r["comparable"], r["at step"]) for r in rows] == [
        ("0.0001", 20.0, "yes", "200"), ("0.0002", 28.0, "yes", "200")]
    assert [(int(r["step"]), float(r["images/s"]), float(r["GPU hours"])) for r in rows] == [
        (300, 500.0, 3.0), (300, 400.0, pytest.approx(2.4))]
    assert [r["goodput"] for r in rows] == [repr(18 / 30), ""]  # steps that count / allocated
    assert "60.0%" in text
    assert set(rows[0]) == {"run", "run id", "train.lr", "status", "step", "best FID", "comparable",
                            "at step", "images/s", "GPU hours", "goodput"}
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.size == (1200, 480)
    # one run by name, and a filter on a param
    assert main(["compare", "reg-b", "--tracking-uri", mlflow_server.url, "--experiment", experiment]) == 0
    assert "reg-b" in capsys.readouterr().out
    assert main(["compare", "--tracking-uri", mlflow_server.url, "--experiment", experiment,
                 "--filter", "params.`train.lr` = '0.0001'", "--csv", str(out_csv)]) == 0
    with out_csv.open() as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["reg-a"]
    assert main(["compare", "nope", "--tracking-uri", mlflow_server.url, "--experiment", experiment]) == 2


def test_compare_fits_a_narrow_terminal(tmp_path, experiment, capsys, monkeypatch):
    """In an 80 or 100 column terminal the table fits: every run name and best FID (with its step)
    on one line, whole; the run id shortened; the rest folded (a real SQLite store, 4 runs)."""
    runs = {"reg-xl2-lr1e-4-ema9999": ("1e-4", "256", 20.0), "reg-xl2-lr2e-4-ema9999": ("2e-4", "256", 28.125),
            "reg-xl2-lr2e-4-bs512": ("2e-4", "512", 31.5), "sit-xl2-baseline": ("1e-4", "256", None)}
    ids = []
    for name, (lr, batch, fid) in runs.items():
        cfg = load_config(SMOKE, [f"run.dir={tmp_path / 'runs'}", f"run.name={name}", f"train.lr={lr}",
                                  f"train.batch_size={batch}", f"mlflow.experiment={experiment}"])
        with Tracker.open(cfg, tmp_path / "runs" / name) as tracker:
            tracker.log_metrics({"loss": 0.5, "images_per_s": 1234.5}, 260)
            if fid is not None:
                tracker.log_eval({"fid": fid} if name != "reg-xl2-lr2e-4-bs512" else {"fid_not_comparable": fid},
                                 200, {"num_samples": 64})
        ids.append(tracker.run_id)
    tables = {}
    for columns in (80, 100, 1000):
        monkeypatch.setenv("COLUMNS", str(columns))
        assert main(["compare", "--runs-dir", str(tmp_path / "runs"), "--experiment", experiment]) == 0
        tables[columns] = capsys.readouterr().out
        lines = tables[columns].splitlines()
        assert max(map(len, lines)) <= columns
        rows = {name: next(line for line in lines if line.startswith(name + " ")) for name in runs}
        for (name, (_, _, fid)), run_id in zip(runs.items(), ids):
            shown = rows[name].split()
            assert shown[1] == run_id[:len(shown[1])] and 4 <= len(shown[1]) <= 8
            assert shown[6:8] == ([f"{fid:.2f}" + ("*" if name == "reg-xl2-lr2e-4-bs512" else ""), "200"]
                                  if fid is not None else ["-", "-"])
    assert "* a random Inception network's FID: not comparable" in tables[80]
    assert "train.batch_size" in tables[1000] and "train.batch_size" not in tables[80]  # folded


def test_server_outage_does_not_stop_training(mlflow_server, tmp_path, experiment, caplog):
    caplog.set_level(logging.WARNING, logger="regscale.track")
    cfg = make_cfg(tmp_path, mlflow_server.url, experiment)
    tracker = Tracker.open(cfg, tmp_path / "runs" / "smoke")
    tracker.log_metrics({"loss": 1.0}, 5)
    assert tracker.flush(60)
    mlflow_server.stop()
    try:
        for step in range(10, 60, 5):  # the loop goes on: nothing raises, nothing blocks for long
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.log_image(grid_png(tmp_path / "grid.png", (0, 0, 255)), 50)
        tracker.log_eval({"fid": 33.0}, 50, {"num_samples": 64})
        assert not tracker.flush(3)
        # a run that starts while the server is away, then ends before it is back
        late_cfg = make_cfg(tmp_path, mlflow_server.url, experiment, "run.name=late")
        late = Tracker.open(late_cfg, tmp_path / "runs" / "late")
        assert late.run_id is None
        late.log_metrics({"loss": 0.25}, 5)
        late.finish("FINISHED", timeout=2)
        assert list((tmp_path / "runs" / "late").glob(f"{MLFLOW_PENDING}*.json"))
    finally:  # back on the same port and store, through `regscale ui`
        mlflow_server.start(via_ui=True)
    assert mlflow_server.banner.startswith(f"MLflow UI ready at {mlflow_server.url} ")
    assert tracker.flush(120)
    tracker.finish("FINISHED")
    client = MlflowClient(mlflow_server.url)
    assert steps_of(client, tracker.run_id, "loss") == list(range(5, 60, 5))
    assert steps_of(client, tracker.run_id, "eval/fid") == [50]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "samples")] == ["samples/step_00000050.png"]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    warned = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warned) >= 1 and any("is back" in r.getMessage() for r in caplog.records)
    # the late run's buffered entries are delivered by the next open of its run directory
    late = Tracker.open(late_cfg, tmp_path / "runs" / "late")
    assert late.flush(60)
    late.finish("FINISHED")
    assert steps_of(client, late.run_id, "loss") == [5]
    assert not list((tmp_path / "runs" / "late").glob(f"{MLFLOW_PENDING}*.json"))


def test_backlog_goes_in_flight_whole_and_once_and_a_refusal_drops_only_its_batch(mlflow_server, tmp_path,
                                                                                 experiment, caplog):
    """After an outage the backlog (several MLflow batches, sent at once through MLflow's async
    logging) arrives whole and once; a batch the server refuses (a name over MLflow's 250
    characters) is dropped alone and delivery goes on, where a retry would never end."""
    caplog.set_level(logging.WARNING, logger="regscale.track")
    tracker = Tracker.open(make_cfg(tmp_path, mlflow_server.url, experiment), tmp_path / "runs" / "smoke")
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush(60)
    keys = [f"m{i:02d}" for i in range(60)]
    mlflow_server.stop()
    try:
        for step in range(2, 60):  # 58 steps x 61 values (with gpu_hours): 4 batches of <= 1000
            tracker.log_metrics({k: step * 100 + i for i, k in enumerate(keys)}, step)
            if step == 30:
                tracker.log_metrics({"x" * 300: 1.0}, step)
    finally:
        mlflow_server.start()
    assert tracker.flush(120)
    tracker.log_metrics({"loss": 0.5}, 60)
    tracker.finish("FINISHED")
    client = MlflowClient(mlflow_server.url)
    delivered = {k: [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, k)] for k in keys}
    assert all(points == sorted(set(points)) for points in delivered.values())  # each point once
    assert all(points[-1] == (59, 5900 + i) for i, points in enumerate(delivered.values()))
    gpu_hours = [s for s in steps_of(client, tracker.run_id, "gpu_hours") if 2 <= s <= 59]
    missing = 58 * 61 + 1 - sum(map(len, delivered.values())) - len(gpu_hours)  # of the backlog's points
    assert 0 < missing <= 1000  # the refused batch, and nothing else
    assert steps_of(client, tracker.run_id, "loss") == [1, 60]
    assert any("MLflow refused" in r.getMessage() for r in caplog.records)


def test_default_store_is_sqlite_in_run_dir(tmp_path, experiment):
    cfg = load_config(SMOKE, [f"run.dir={tmp_path / 'runs'}", f"mlflow.experiment={experiment}"])
    with Tracker.open(cfg, tmp_path / "runs" / "smoke") as tracker:
        tracker.log_metrics({"loss": 1.0}, 5)
    assert tracker.uri == f"sqlite:///{tmp_path / 'runs' / MLFLOW_DB}"
    client = MlflowClient(tracker.uri)
    assert steps_of(client, tracker.run_id, "loss") == [5]
    artifacts = client.get_run(tracker.run_id).info.artifact_uri
    assert artifacts.startswith((tmp_path / "runs" / MLARTIFACTS).as_uri())
    # no store there: `compare` and `ui` say so in one line (exit 2)
    assert main(["compare", "--runs-dir", str(tmp_path / "elsewhere")]) == 2
    assert main(["ui", "--runs-dir", str(tmp_path / "elsewhere")]) == 2
    assert (tmp_path / "runs" / MLARTIFACTS).is_dir()


def test_undeliverable_pending_entries_move_aside_and_delivery_goes_on(tmp_path, experiment, caplog):
    """What the tracker cannot deliver from the pending files on disk (a cut file, a foreign one, an
    operation of unknown kind or without its fields) moves to mlflow_outbox/rejected/ with one
    warning per file; the good entries beside it are delivered, and the next open finds nothing."""
    caplog.set_level(logging.WARNING, logger="regscale.track")
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    good = {"op": "metrics", "metrics": {"loss": 2.0}, "step": 3, "ts": 1000}
    bad = [{"op": "frobnicate", "x": 1}, {"op": "metrics", "metrics": {"loss": 9.0}}, ["not", "an", "op"]]
    unreadable = {f"{MLFLOW_PENDING}-cut.json": '{"run_id": null, "ops": [',
                  f"{MLFLOW_PENDING}-foreign.json": '{"run_id": null}',
                  f"{MLFLOW_PENDING}-ops-not-a-list.json": '{"run_id": null, "ops": {"op": "tags"}}'}
    for name, text in unreadable.items():
        (run_dir / name).write_text(text)
    mixed = f"{MLFLOW_PENDING}-mixed.json"
    (run_dir / mixed).write_text(json.dumps({"run_id": None, "ops": [bad[0], good, *bad[1:]]}))
    cfg = load_config(SMOKE, [f"run.dir={tmp_path / 'runs'}", f"mlflow.experiment={experiment}"])
    with Tracker.open(cfg, run_dir) as tracker:
        tracker.log_metrics({"loss": 1.0}, 5)
    assert steps_of(MlflowClient(tracker.uri), tracker.run_id, "loss") == [3, 5]
    assert not list(run_dir.glob(f"{MLFLOW_PENDING}*"))
    rejected = run_dir / MLFLOW_OUTBOX / MLFLOW_REJECTED
    assert {p.name: p.read_text() for p in rejected.iterdir() if p.name != mixed} == unreadable
    assert json.loads((rejected / mixed).read_text()) == {"run_id": None, "ops": bad}
    warnings = [r.getMessage() for r in caplog.records if str(rejected) in r.getMessage()]
    assert len(warnings) == 4 and sum("is unreadable" in w for w in warnings) == 3
    assert [w for w in warnings if mixed in w and "3 of the 4 entries" in w and "unknown operation 'frobnicate'" in w]
    # a later attempt of the run finds nothing left to move or warn about
    caplog.clear()
    with Tracker.open(cfg, run_dir) as tracker:
        pass
    assert not [r for r in caplog.records if "MLflow" in r.getMessage()]
    with pytest.raises(ValueError, match="unknown operation 'frobnicate'"):  # a bug of the caller, at once
        tracker._outbox.put(bad[0])


def test_two_process_training_logs_one_run(mlflow_server, smoke_data, tmp_path, experiment):
    """`regscale train` on 2 gloo processes (smoke recipe): rank 0 alone tracks, one run."""
    overrides = [f"run.dir={tmp_path / 'runs'}", "run.name=tracked", f"data.path={smoke_data}",
                 f"mlflow.tracking_uri={mlflow_server.url}", f"mlflow.experiment={experiment}",
                 "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(free_port()), "-m", "regscale.cli", "train", str(SMOKE),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == (tmp_path / "runs" / "tracked" / MLFLOW_RUN_ID).read_text().strip()
    assert run.info.status == "FINISHED"
    assert run.data.params == config_params(load_config(SMOKE, overrides))
    assert run.data.tags["world_size"] == "2" and run.data.tags["engine"] == "fsdp"
    jsonl = [json.loads(line) for line in (tmp_path / "runs" / "tracked" / METRICS).open()]
    logged = {row["step"]: row["loss"] for row in jsonl if "loss" in row}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == logged and sorted(logged) == [1, 2]
    for key in ("loss/img", "loss/proj", "loss/cls", "grad_norm", "lr", "images_per_s", "data_wait_s"):
        assert steps_of(client, run.info.run_id, key) == [1, 2], key


def test_ui_refuses_bad_port_and_workers(tmp_path, capsys):
    MlflowClient(f"sqlite:///{tmp_path / MLFLOW_DB}").create_experiment("e")  # a store is there; nothing may start
    for args, message in ((["--port", "0"], "--port 0: expected a port number from 1 to 65535"),
                          (["--port", "70000"], "--port 70000: expected a port number from 1 to 65535"),
                          (["--workers", "0", "--port", str(free_port())], "--workers 0: expected 1 to "),
                          (["--workers", "100000"], "--workers 100000: expected 1 to ")):
        assert main(["ui", "--runs-dir", str(tmp_path), *args]) == 2
        assert message in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--runs-dir", str(tmp_path), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert not (tmp_path / MLFLOW_UI_LOG).exists()


def _alive(processes: list) -> list:
    import psutil

    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ui_is_ready_when_it_answers_and_a_signal_stops_its_whole_tree(tmp_path, experiment, stop):
    import psutil

    runs_dir = tmp_path / "runs"
    cfg = load_config(SMOKE, [f"run.dir={runs_dir}", f"mlflow.experiment={experiment}"])
    with Tracker.open(cfg, runs_dir / "smoke") as tracker:
        tracker.log_metrics({"loss": 1.0}, 5)
    exp_id = MlflowClient(tracker.uri).get_experiment_by_name(experiment).experiment_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "regscale.cli", "ui", "--runs-dir", str(runs_dir), "--port",
                           str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert ui.stdout.readline().startswith(f"MLflow UI ready at {url} ")
        with urllib.request.urlopen(f"{url}/health", timeout=30) as answer:  # ready: it answers at once
            assert answer.status == 200
        assert ui.stdout.readline().strip() == (
            f"{experiment}: {url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        tree = psutil.Process(ui.pid).children(recursive=True)
        assert len(_alive(tree)) >= 2  # mlflow server and its uvicorn worker(s)
        runs = MlflowClient(url).search_runs([exp_id])  # requests that would each log a line
        assert [r.info.run_id for r in runs] == [tracker.run_id]
        ui.send_signal(stop)
        out, err = ui.communicate(timeout=120)
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
    assert ui.returncode == 0 and out.strip() == "MLflow UI stopped" and "Traceback" not in err
    assert _alive(tree) == []
    check_port(port)  # nothing listens on the port any more (a new server could bind it)
    log = (runs_dir / MLFLOW_UI_LOG).read_text()
    assert "Uvicorn running" in log and "/health" not in log and "runs/search" not in log
