"""Every verb fed bad inputs and faults, one table per verb. Each case must end with its exit code
(2 unless said), no traceback, one error line that names the thing (the key, file, shard, option)
and its inputs unchanged: every file of the case's folder is hashed before and after. A few cases
must succeed instead (`regscale status` shows runs whose files are corrupt). In-process through
regscale.cli.main, as the `regscale` command runs it; Ctrl-C and REGSCALE_DEBUG in real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from regscale.cli import main
from regscale import rundir

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")
RUN = "{D}/runs/r1"
SECRET = "hunter2-n0t-pr1nted"  # a password in a URI: refused, never echoed
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                  "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
                  "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent"}


@dataclass
class Case:
    """argv ({D}: the case's copy of the materials, {RO}: a folder nobody may write); `names`: what
    the error must name (or, with code 0, what the output must show)."""

    id: str
    argv: list[str]
    names: str
    setup: Optional[Callable[[Path], object]] = None
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


# ---------------------------------------------------------------------------------------------
# materials: a dataset, a run with checkpoints, an export, samples, a reference, an MLflow store


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def _flip(path: Path, offset: int = -100) -> None:
    """One byte changed in place: same size, other content."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _empty_database(path: Path) -> None:
    """An SQLite database with no table in it (what a bare `sqlite3 FILE .databases` leaves)."""
    import sqlite3

    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 1")  # writes the header: a real, empty database


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _shard(d: Path) -> Path:
    index = json.loads((d / "data" / "index.json").read_text())
    return d / "data" / index["shards"][0]["raw_data"]["basename"]


def _images(n: int = 8, side: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), np.uint8)


def _reference(d: Path, *, poison: Optional[str] = None) -> None:
    """An ADM-shaped reference batch (float32 to stay small); `poison` puts a NaN into one array."""
    from regscale.eval.inception import POOL_DIM, SPATIAL_DIM

    stats = dict(mu=np.zeros(POOL_DIM, np.float32), sigma=np.eye(POOL_DIM, dtype=np.float32),
                 mu_s=np.zeros(SPATIAL_DIM, np.float32), sigma_s=np.eye(SPATIAL_DIM, dtype=np.float32))
    if poison:
        stats[poison].flat[3] = np.nan
    np.savez(d / "ref.npz", arr_0=_images(), **stats)


@pytest.fixture(scope="session")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the cases read: data/ (MDS shards), runs/r1 (config, a checkpoint, its bookkeeping),
    runs/mlflow.db, export.safetensors, samples.npz, src/ (an ImageFolder)."""
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import save_file

    from regscale.checkpoints import CheckpointStore, file_entry
    from regscale.config import load_config, to_yaml
    from regscale.data.synthetic import ensure_synthetic_dataset
    from tests.fixtures.data import make_imagefolder

    root = tmp_path_factory.mktemp("bad-inputs")
    smoke = load_config(SMOKE, [f"data.path={root / 'data'}", "data.synthetic=16"])
    ensure_synthetic_dataset(smoke.data, smoke.model.num_classes)
    shutil.rmtree(root / "data.images")
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    cfg = load_config(SMOKE, ["run.name=r1", f"run.dir={root / 'runs'}", "train.max_steps=4"])
    (run / rundir.CONFIG).write_text(to_yaml(cfg))
    store = CheckpointStore(run / rundir.CHECKPOINTS, keep_last=2, keep_every=0)
    tmp = store.tmp_dir(4)
    _write(tmp / "__0_0.distcp", b"weights" * 64)
    store.publish(tmp, {"step": 4, "images": 32}, {"__0_0.distcp": file_entry(tmp / "__0_0.distcp")})
    (run / rundir.METRICS).write_text('{"step": 4, "loss": 1.0, "images_per_s": 10.0}\n')
    client = MlflowClient(f"sqlite:///{root / 'runs' / rundir.MLFLOW_DB}")
    tracked = client.create_run(client.create_experiment("regscale"), run_name="r1",
                                tags={"regscale.kind": "train"})
    client.set_terminated(tracked.info.run_id)
    save_file({"w": torch.zeros(3)}, str(root / "export.safetensors"),
              metadata={"step": "4", "weights": "ema", "config_hash": "x", "config": to_yaml(cfg)})
    np.savez(root / "samples.npz", arr_0=_images(), arr_1=np.arange(8))
    make_imagefolder(root / "src", classes=2, per_class=2)
    return root


@pytest.fixture(scope="session")
def read_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in which creating a file fails (immutable for root, mode 555 for others)."""
    folder = tmp_path_factory.mktemp("read-only")
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    with pytest.raises(OSError):
        (folder / "probe").write_text("x")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def run_case(case: Case, materials: Path, read_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
             monkeypatch: pytest.MonkeyPatch) -> str:
    """Run one case in a copy of the materials, assert its outcome, return its stdout."""
    d = tmp_path / "D"
    shutil.copytree(materials, d)
    if case.setup is not None:
        case.setup(d)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(d)
    argv = [a.replace("{D}", str(d)).replace("{RO}", str(read_only)) for a in case.argv]
    before = _snapshot(d)
    environ = dict(os.environ)  # a verb may export a launcher's variables (RANK, WORLD_SIZE, ...)
    try:
        code = main(argv)
    except SystemExit as err:  # argparse
        code = err.code
    finally:
        os.environ.clear()
        os.environ.update(environ)
    out, err = capsys.readouterr()
    names = case.names.replace("{D}", str(d)).replace("{RO}", str(read_only))
    assert code == case.code, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err and SECRET not in out + err
    if case.code == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and names in errors[0], err
    else:  # a verb that reports on stdout: status (0), prepare --verify finding problems (1)
        assert names in out, out
    if case.code != 0:
        after = _snapshot(d)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert not changed, f"inputs changed: {sorted(changed)}"
    return out


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


# ---------------------------------------------------------------------------------------------
# the tables, one per verb


def cfg(*overrides: str) -> list[str]:
    return ["config", SMOKE, *overrides]


CONFIG = [
    Case("lr-nan", cfg("train.lr=nan"), "'train.lr' must be a finite number"),
    Case("grad-clip-inf", cfg("train.grad_clip=inf"), "train.grad_clip"),
    Case("betas-nan", cfg("train.betas=[0.9,nan]"), "train.betas"),
    Case("cfg-scale-nan", cfg("eval.cfg_scale=nan"), "eval.cfg_scale"),
    Case("recipe-nan", ["config", "{D}/r.yaml"], "train.lr", lambda d: _write(d / "r.yaml", "train:\n  lr: .nan\n")),
    Case("eps-negative", cfg("train.eps=-1"), "train.eps"),
    Case("mlp-ratio-zero", cfg("model.mlp_ratio=0"), "model.mlp_ratio"),
    Case("vae-scale-zero", cfg("vae.scale=0"), "vae.scale"),
    Case("batch-0", cfg("train.batch_size=0"), "train.batch_size"),
    Case("nodes-0", cfg("slurm.nodes=0"), "slurm.nodes"),
    Case("gpus-0", cfg("slurm.gpus_per_node=0"), "slurm.gpus_per_node"),
    Case("mem-0", cfg("slurm.mem_gb=0"), "slurm.mem_gb"),
    Case("seed-negative", cfg("eval.seed=-1"), "eval.seed"),
    Case("resolution", cfg("encoder.resolution=100"), "encoder.resolution"),
    Case("newline-override", cfg("run.name=a\nb"), "run.name"),
    Case("newline-recipe", ["config", "{D}/r.yaml"], "slurm.partition",
         lambda d: _write(d / "r.yaml", 'slurm:\n  partition: "gpu\\n#SBATCH --x"\n')),
    Case("control-char", cfg("data.path=/x\x01y"), "data.path"),
    Case("empty-string", ["config", "{D}/r.yaml"], "slurm.partition",
         lambda d: _write(d / "r.yaml", 'slurm:\n  partition: ""\n')),
    Case("interpolation-missing", cfg("train.lr=${train.nope}"), "train.lr"),
    Case("interpolation-env", cfg("model.size=${oc.env:REGSCALE_NO_SUCH_VARIABLE}"), "model.size"),
    Case("interpolation-cycle", cfg("train.lr=${train.lr}"), "train.lr"),
    Case("interpolation-in-recipe", ["config", "{D}/r.yaml"], "train.lr",
         lambda d: _write(d / "r.yaml", "train:\n  lr: ${nope.x}\n")),
    Case("tracking-port", cfg("mlflow.tracking_uri=http://127.0.0.1:99999"), "mlflow.tracking_uri"),
    Case("tracking-scheme", cfg("mlflow.tracking_uri=nosuch://host"), "mlflow.tracking_uri"),
    Case("recipe-missing", ["config", "{D}/nope.yaml"], "nope.yaml"),
    Case("recipe-is-dir", ["config", "{D}/runs"], "runs"),
    Case("recipe-binary", ["config", "{D}/r.yaml"], "r.yaml", lambda d: _write(d / "r.yaml", b"\xff\xfe\x00garbage")),
    Case("recipe-list", ["config", "{D}/r.yaml"], "r.yaml", lambda d: _write(d / "r.yaml", "- 1\n")),
    Case("override-not-kv", cfg("train.lr"), "train.lr"),
    Case("recipe-scalar", ["config", "{D}/r.yaml"], "r.yaml", lambda d: _write(d / "r.yaml", "5\n")),
    Case("recipe-empty", ["config", "{D}/r.yaml"], "r.yaml", lambda d: _write(d / "r.yaml", "# nothing\n")),
    Case("list-of-lists", cfg("eval.at_steps=[[1]]"), "eval.at_steps"),
    Case("override-empty-value", cfg("eval.ref_batch="), "eval.ref_batch"),
    Case("override-key-syntax", cfg(".lr=5"), ".lr"),
    Case("override-section-scalar", cfg("model=5"), "model"),
    Case("line-separator", cfg("run.name=a\u2028b"), "run.name"),
    Case("tracking-ipv6-unclosed", cfg("mlflow.tracking_uri=http://[::1"), "mlflow.tracking_uri"),
    Case("tracking-sqlite-no-path", cfg("mlflow.tracking_uri=sqlite://"), "mlflow.tracking_uri"),
    Case("remote-without-bucket", cfg("data.path=s3://"), "data.path"),
]


@pytest.mark.parametrize("case", CONFIG, ids=_ids(CONFIG))
def test_config_refuses_bad_values(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def sub(*overrides: str, dry_run: bool = True) -> list[str]:
    return ["submit", SMOKE, "run.dir={D}/runs", "data.path={D}/data", "data.synthetic=0", "run.name=new",
            *overrides, *(["--dry-run"] if dry_run else [])]


# What the request itself gets wrong: refused the same way with --dry-run and without.
REQUEST = [
    Case("nodes-0", ["slurm.nodes=0"], "slurm.nodes"),
    Case("local-2-nodes", ["slurm.nodes=2", "train.batch_size=16"], "slurm.nodes"),
    Case("profile-unknown", ["slurm.cluster=slurm", "slurm.profile=nope"], "nope"),
    Case("profile-bad-key", ["slurm.cluster=slurm", "slurm.profile={D}/p.yaml"], "bogus",
         lambda d: _write(d / "p.yaml", "bogus: 1\n")),
    Case("unsafe-partition", ["slurm.cluster=slurm", "slurm.partition=a;b"], "slurm.partition"),
    Case("name-with-space", ["run.name=a b"], "run.name"),
    Case("existing-run", ["run.name=r1"], "r1"),
    Case("run-dir-is-file", ["run.dir={D}/samples.npz"], "samples.npz"),
    Case("run-dir-read-only", ["run.dir={RO}"], "{RO}"),
    Case("tracking-port", ["mlflow.tracking_uri=http://127.0.0.1:0"], "mlflow.tracking_uri"),
    Case("no-sbatch", ["slurm.cluster=slurm"], "sbatch", env={"PATH": "/nonexistent"}),
    Case("run-is-the-dataset", ["run.dir={D}", "run.name=data"], "data"),
    Case("run-in-checkpoints", ["run.dir={D}/runs/r1/" + rundir.CHECKPOINTS], rundir.CHECKPOINTS),
    Case("run-in-another-run", ["run.dir={D}/runs/r1"], "r1"),
    Case("run-dir-foreign-folder", ["run.dir={D}", "run.name=src"], "src"),
]
# What the run's files get wrong: a real submit refuses, a dry run warns in its plan.
FILES = [
    Case("index-corrupt", [], "index.json", lambda d: _write(d / "data" / "index.json", "{oops")),
    Case("shard-truncated", [], "shard.00000.mds", lambda d: _truncate(_shard(d), 1000)),
    Case("ref-garbage", ["eval.ref_batch={D}/g.npz"], "g.npz", lambda d: _write(d / "g.npz", "garbage")),
    Case("ref-nan", ["eval.ref_batch={D}/ref.npz"], "ref.npz", lambda d: _reference(d, poison="sigma")),
    Case("index-empty", [], "index.json", lambda d: _write(d / "data" / "index.json", '{"shards": []}')),
    Case("store-not-sqlite", [], rundir.MLFLOW_DB, lambda d: _write(d / "runs" / rundir.MLFLOW_DB, "garbage")),
    Case("encoder-weights-garbage", ["encoder.weights={D}/g.pth", "encoder.random_init=false", "model.cls_token_dim=768"],
         "g.pth", lambda d: _write(d / "g.pth", "garbage")),
    Case("remote-without-credentials", ["data.path=s3://regscale-no-bucket/x"], "s3://regscale-no-bucket/x",
         env=NO_CREDENTIALS),
]
SUBMIT = [
    *[Case(f"{kind}-{c.id}", sub(*c.argv, dry_run=kind == "dry"), c.names, c.setup, c.env)
      for kind in ("dry", "real") for c in REQUEST],
    *[Case(f"real-{c.id}", sub(*c.argv, dry_run=False), c.names, c.setup, c.env) for c in FILES],
    *[Case(f"dry-warns-{c.id}", sub(*c.argv), c.names, c.setup, c.env, code=0) for c in FILES],
    Case("sweep-malformed", [*sub(), "--sweep", "train.lr"], "train.lr"),
    Case("sweep-unknown-key", [*sub(), "--sweep", "train.lrr=1,2"], "train.lrr"),
    Case("sweep-nan", [*sub(), "--sweep", "train.lr=1e-4,nan"], "train.lr"),
    Case("sweep-repeated", [*sub(), "--sweep", "train.lr=1e-4,1e-4"], "--sweep"),
    Case("sweep-key-twice", [*sub(), "--sweep", "train.lr=1e-4,2e-4", "--sweep", "train.lr=3e-4"], "train.lr"),
]


@pytest.mark.parametrize("case", SUBMIT, ids=_ids(SUBMIT))
def test_submit_and_dry_run_apply_the_same_checks(case, materials, read_only, tmp_path, capsys, monkeypatch):
    out = run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)
    if case.code == 0:  # the dry run's warning names the file a real submit refuses
        assert any(line.startswith("WARNING") and case.names in line for line in out.splitlines()), out
    assert not (tmp_path / "D" / "runs" / "new").exists()


CKPT = f"runs/r1/{rundir.CHECKPOINTS}/step_00000004"
RESUME = [
    Case("missing", ["resume", "{D}/nope"], "nope"),
    Case("not-a-run", ["resume", "{D}/data"], rundir.CONFIG),
    Case("config-corrupt", ["resume", RUN], rundir.CONFIG, lambda d: _write(d / "runs/r1" / rundir.CONFIG, "a: [1\n")),
    Case("config-list", ["resume", RUN], rundir.CONFIG, lambda d: _write(d / "runs/r1" / rundir.CONFIG, "- 1\n")),
    Case("config-bad-value", ["resume", RUN], "train.batch_size",
         lambda d: _write(d / "runs/r1" / rundir.CONFIG, "train:\n  batch_size: 0\n")),
    Case("key-not-resumable", ["resume", RUN, "train.lr=1"], "train.lr"),
    Case("nodes-0", ["resume", RUN, "slurm.nodes=0"], "slurm.nodes"),
    Case("jobs-corrupt", ["resume", RUN], rundir.JOBS, lambda d: _write(d / "runs/r1" / rundir.JOBS, "{")),
    Case("finished", ["resume", RUN], "finished training (step 4)"),
    Case("checkpoint-broken", ["resume", RUN, "train.max_steps=8"], "every checkpoint",
         lambda d: _flip(d / CKPT / "__0_0.distcp")),
    Case("newest-broken-skipped", ["resume", RUN], "finished training (step 4)",  # not step 6
         lambda d: _flip(Path(shutil.copytree(d / CKPT, d / CKPT.replace("4", "6"))) / "__0_0.distcp")),
    Case("config-empty", ["resume", RUN], rundir.CONFIG, lambda d: _write(d / "runs/r1" / rundir.CONFIG, "")),
    Case("reference-garbage", ["resume", RUN, "train.max_steps=8", "eval.ref_batch={D}/g.npz"], "g.npz",
         lambda d: _write(d / "g.npz", "garbage")),
]


@pytest.mark.parametrize("case", RESUME, ids=_ids(RESUME))
def test_resume_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def _second_run(d: Path, name: str = "r2") -> Path:
    shutil.copytree(d / "runs" / "r1", d / "runs" / name)
    return d / "runs" / name


STATUS = [
    Case("config-corrupt", ["status", "{D}/runs"], "r1",
         lambda d: _write(_second_run(d) / rundir.CONFIG, "a: [1\n"), code=0),
    Case("config-corrupt-names-it", ["status", "{D}/runs"], "r2/" + rundir.CONFIG,
         lambda d: _write(_second_run(d) / rundir.CONFIG, "a: [1\n"), code=0),
    Case("attempt-half-written", ["status", "{D}/runs"], "r1",
         lambda d: _write(d / "runs/r1" / rundir.ATTEMPTS,
                          '{"event": "start", "job_id": "1", "restart": 0, "start_step": 0, "started_at": 1}\n'
                          '{"event": "end", "en'), code=0),
    Case("attempt-lines-mangled", ["status", "{D}/runs"], "r1",
         lambda d: _write(d / "runs/r1" / rundir.ATTEMPTS, '{"event": "start"}\n[1]\n"x"\n\xff\n'), code=0),
    Case("jobs-corrupt", ["status", "{D}/runs"], "r1",
         lambda d: _write(_second_run(d) / rundir.JOBS, "{"), code=0),
    Case("stop-report-corrupt", ["status", "{D}/runs"], "r1",
         lambda d: _write(_second_run(d) / rundir.STOP_REPORT, "[]"), code=0),
    Case("metrics-garbage", ["status", "{D}/runs"], "r1",
         lambda d: _write(_second_run(d) / rundir.METRICS, b'{"step": "abc"}\n\xff\xfe'), code=0),
    Case("one-run-corrupt", ["status", RUN], "r1",
         lambda d: _write(d / "runs/r1" / rundir.CONFIG, "a: [1\n"), code=0),
    Case("stop-report-wrong-types", ["status", "{D}/runs"], "r2",
         lambda d: _write(_second_run(d) / rundir.STOP_REPORT, '{"reason": 5, "stopped_at": "x"}'), code=0),
    Case("missing", ["status", "{D}/nope"], "nope"),
]


@pytest.mark.parametrize("case", STATUS, ids=_ids(STATUS))
def test_status_shows_every_run(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


CANCEL = [
    Case("missing", ["cancel", "{D}/nope"], "nope"),
    Case("no-jobs", ["cancel", RUN], "r1"),
    Case("jobs-corrupt", ["cancel", RUN], rundir.JOBS, lambda d: _write(d / "runs/r1" / rundir.JOBS, "{")),
    Case("config-corrupt", ["cancel", RUN], rundir.CONFIG, lambda d: _write(d / "runs/r1" / rundir.CONFIG, "a: [1\n")),
    Case("no-scancel", ["cancel", RUN], "scancel",
         lambda d: _write(d / "runs/r1" / rundir.JOBS, '{"jobs": [{"id": "9", "kind": "train", "cluster": "slurm"}]}'),
         env={"PATH": "/nonexistent"}),
]


@pytest.mark.parametrize("case", CANCEL, ids=_ids(CANCEL))
def test_cancel_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def export(out: str, *extra: str) -> list[str]:
    return ["export", RUN, "--out", out, *extra]


EXPORT = [
    Case("out-is-a-checkpoint-file", export(f"{RUN}/{rundir.CHECKPOINTS}/step_00000004/__0_0.distcp"), "__0_0.distcp"),
    Case("out-into-checkpoints", export(f"{RUN}/{rundir.CHECKPOINTS}/x.safetensors"), rundir.CHECKPOINTS),
    Case("out-over-foreign-safetensors", export("{D}/g.safetensors"), "g.safetensors", lambda d: _foreign_export(d, None)),
    Case("out-is-config", export(f"{RUN}/{rundir.CONFIG}"), rundir.CONFIG),
    Case("out-is-dir", export("{D}/data"), "data"),
    Case("out-parent-is-file", export("{D}/samples.npz/x.safetensors"), "samples.npz"),
    Case("out-read-only", export("{RO}/x.safetensors"), "{RO}"),
    Case("run-missing", ["export", "{D}/nope", "--out", "{D}/x.safetensors"], "nope"),
    Case("step-missing", export("{D}/x.safetensors", "--step", "3"), "step 3"),
    Case("step-negative", export("{D}/x.safetensors", "--step", "-1"), "--step"),
    Case("checkpoint-truncated", export("{D}/x.safetensors"), rundir.CHECKPOINTS,
         lambda d: _truncate(d / "runs/r1" / rundir.CHECKPOINTS / "step_00000004/__0_0.distcp", 10)),
    Case("manifest-corrupt", export("{D}/x.safetensors"), rundir.CHECKPOINTS,
         lambda d: _write(d / "runs/r1" / rundir.CHECKPOINTS / "step_00000004/manifest.json", "{")),
    Case("manifest-step-not-int", export("{D}/x.safetensors"), rundir.CHECKPOINTS,
         lambda d: _edit_manifest(d, step="abc")),
    Case("manifest-file-entry", export("{D}/x.safetensors"), rundir.CHECKPOINTS,
         lambda d: _edit_manifest(d, files={"__0_0.distcp": 5})),
    Case("checkpoint-foreign", export("{D}/x.safetensors"), "step_00000004"),
    Case("config-corrupt", export("{D}/x.safetensors"), rundir.CONFIG,
         lambda d: _write(d / "runs/r1" / rundir.CONFIG, "a: [1")),
    Case("out-empty", export(""), "--out"),
]


@pytest.mark.parametrize("case", EXPORT, ids=_ids(EXPORT))
def test_export_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


SAMPLE = [
    Case("missing", ["sample", "{D}/nope"], "nope"),
    Case("not-a-run", ["sample", "{D}/data"], "data"),
    Case("safetensors-truncated", ["sample", "{D}/export.safetensors"], "export.safetensors",
         lambda d: _truncate(d / "export.safetensors", 50)),
    Case("safetensors-garbage", ["sample", "{D}/g.safetensors"], "g.safetensors",
         lambda d: _write(d / "g.safetensors", "garbage garbage garbage")),
    Case("safetensors-bad-config", ["sample", "{D}/g.safetensors"], "g.safetensors", lambda d: _foreign_export(d, "a: [1")),
    Case("safetensors-no-config", ["sample", "{D}/g.safetensors"], "g.safetensors", lambda d: _foreign_export(d, None)),
    Case("setting-nan", ["sample", RUN, "eval.cfg_scale=nan"], "eval.cfg_scale"),
    Case("no-valid-checkpoint", ["sample", RUN], rundir.CHECKPOINTS,
         lambda d: _flip(d / "runs/r1" / rundir.CHECKPOINTS / "step_00000004/__0_0.distcp")),
    Case("step-missing", ["sample", RUN, "--step", "3"], "step 3"),
    Case("out-is-file", ["sample", RUN, "--out", "{D}/samples.npz"], "samples.npz"),
    Case("out-into-checkpoints", ["sample", RUN, "--out", f"{RUN}/{rundir.CHECKPOINTS}/s"], rundir.CHECKPOINTS),
    Case("out-is-the-run", ["sample", RUN, "--out", RUN], "r1"),
    Case("out-is-the-input", ["sample", "{D}/export.safetensors", "--out", "{D}/export.safetensors"],
         "export.safetensors"),
    Case("out-foreign-folder", ["sample", RUN, "--out", "{D}/data"], "data"),
    Case("out-read-only", ["sample", RUN, "--out", "{RO}/s"], "{RO}"),
    Case("model-key", ["sample", RUN, "model.depth=3"], "model.depth"),
    Case("step-of-an-export", ["sample", "{D}/export.safetensors", "--step", "4"], "--step"),
    Case("weights-of-an-export", ["sample", "{D}/export.safetensors", "--weights", "model"], "--weights"),
    Case("export-of-another-model", ["sample", "{D}/export.safetensors"], "export.safetensors"),
    Case("target-empty", ["sample", ""], "CHECKPOINT_OR_RUN"),
    Case("stray-rank", ["sample", RUN], "RANK", env={"RANK": "1"}),
    Case("stray-slurm-variables", ["sample", RUN], "SLURM_PROCID", env={"SLURM_PROCID": "3", "SLURM_NTASKS": "2"}),
    Case("rendezvous-seconds-negative", ["sample", RUN], "REGSCALE_RENDEZVOUS_S",
         env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
              "REGSCALE_RENDEZVOUS_S": "-5"}),
]


def _edit_manifest(d: Path, **changes) -> None:
    path = d / "runs/r1" / rundir.CHECKPOINTS / "step_00000004/manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _foreign_export(d: Path, config: Optional[str]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(d / "g.safetensors"), metadata={} if config is None else {"config": config})


@pytest.mark.parametrize("case", SAMPLE, ids=_ids(SAMPLE))
def test_sample_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def evaluate(*extra: str, samples: str = "{D}/samples.npz") -> list[str]:
    return ["eval", samples, "--ref", "{D}/ref.npz", *extra]


def _bad_member(d: Path) -> None:
    with zipfile.ZipFile(d / "s.npz", "w") as zf:
        zf.writestr("arr_0.npy", b"\x93NUMPY garbage")


EVAL = [
    Case("out-is-the-samples", evaluate("--random-inception", "--out", "{D}/samples.npz"), "samples.npz", _reference),
    Case("out-is-the-reference", evaluate("--random-inception", "--out", "{D}/ref.json"), "ref.json",
         lambda d: (_reference(d), shutil.copy(d / "ref.npz", d / "ref.json"))),
    Case("out-foreign-json", evaluate("--random-inception", "--out", "{D}/notes.json"), "notes.json",
         lambda d: (_reference(d), _write(d / "notes.json", '{"mine": 1}'))),
    Case("out-is-dir", evaluate("--random-inception", "--out", "{D}/data"), "data", _reference),
    Case("out-into-checkpoints", evaluate("--random-inception", "--out", f"{RUN}/{rundir.CHECKPOINTS}/x.json"),
         rundir.CHECKPOINTS, _reference),
    Case("out-read-only", evaluate("--random-inception", "--out", "{RO}/x.json"), "{RO}", _reference),
    Case("samples-missing", evaluate(samples="{D}/nope.npz"), "nope.npz", _reference),
    Case("samples-not-npz", evaluate(samples="{D}/g.npz"), "g.npz", lambda d: (_reference(d), _write(d / "g.npz", "x"))),
    Case("samples-truncated", evaluate("--random-inception"), "samples.npz",
         lambda d: (_reference(d), _truncate(d / "samples.npz", 3000))),
    Case("samples-bad-member", evaluate("--random-inception", samples="{D}/s.npz"), "s.npz",
         lambda d: (_reference(d), _bad_member(d))),
    Case("samples-float", evaluate("--random-inception", samples="{D}/s.npz"), "s.npz",
         lambda d: (_reference(d), np.savez(d / "s.npz", arr_0=_images().astype(np.float32)))),
    Case("samples-too-few", evaluate("--random-inception", samples="{D}/s.npz"), "s.npz",
         lambda d: (_reference(d), np.savez(d / "s.npz", arr_0=_images(2)))),
    Case("reference-is-the-samples", ["eval", "{D}/samples.npz", "--ref", "{D}/samples.npz"], "--ref"),
    Case("reference-nan-mu", evaluate("--random-inception"), "ref.npz", lambda d: _reference(d, poison="mu")),
    Case("reference-nan-sigma", evaluate("--random-inception"), "ref.npz", lambda d: _reference(d, poison="sigma")),
    Case("reference-missing-arrays", evaluate("--inception", "{D}/w.pth"), "ref.npz",
         lambda d: (np.savez(d / "ref.npz", arr_0=_images()), _write(d / "w.pth", ""))),
    Case("num-samples-0", evaluate("--random-inception", "--num-samples", "0"), "--num-samples", _reference),
    Case("batch-size-0", evaluate("--random-inception", "--batch-size", "0"), "--batch-size", _reference),
    Case("inception-missing", evaluate("--inception", "{D}/nope.pth"), "nope.pth", _reference),
    Case("inception-garbage", evaluate("--inception", "{D}/g.pth"), "g.pth",
         lambda d: (_reference(d), _write(d / "g.pth", "garbage"))),
    Case("inception-and-random", evaluate("--inception", "{D}/w.pth", "--random-inception"), "--inception",
         _reference),
    Case("out-empty", evaluate("--random-inception", "--out", ""), "--out", _reference),
]


@pytest.mark.parametrize("case", EVAL, ids=_ids(EVAL))
def test_eval_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def prep(src: str, out: str, *extra: str) -> list[str]:
    return ["prepare", src, out, "--random-vae", "--quiet", *extra]


PREPARE = [
    Case("src-missing", prep("{D}/nope", "{D}/out"), "nope"),
    Case("out-is-src", prep("{D}/src", "{D}/src"), "src"),
    Case("out-inside-src", prep("{D}/src", "{D}/src/cls_0/out"), "src"),
    Case("src-inside-out", prep("{D}/src", "{D}"), "src"),
    Case("out-is-file", prep("{D}/src", "{D}/samples.npz"), "samples.npz"),
    Case("out-read-only", prep("{D}/src", "{RO}/out"), "{RO}"),
    Case("out-into-checkpoints", prep("{D}/src", f"{RUN}/{rundir.CHECKPOINTS}/x"), rundir.CHECKPOINTS),
    Case("out-foreign-folder", prep("{D}/src", RUN), "r1"),
    Case("out-other-dataset", prep("{D}/src", "{D}/data"), "data"),
    Case("workers-0", prep("{D}/src", "{D}/out", "--workers", "0"), "--workers"),
    Case("part-out-of-range", prep("{D}/src", "{D}/out", "--part", "3/2"), "--part"),
    Case("part-not-i-n", prep("{D}/src", "{D}/out", "--part", "x"), "--part"),
    Case("array-variables", prep("{D}/src", "{D}/out"), "SLURM_ARRAY_TASK_ID",
         env={"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}),
    Case("array-task-outside", prep("{D}/src", "{D}/out"), "SLURM_ARRAY_TASK_ID",
         env={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "2"}),
    Case("no-readable-image", prep("{D}/s2", "{D}/../out2"), "s2",
         lambda d: (_write(d / "s2/c0/a.png", "x"), _write(d / "s2/c0/b.jpg", "y"))),
    Case("device-unknown", prep("{D}/src", "{D}/out", "--device", "bogus"), "--device"),
    Case("device-absent", prep("{D}/src", "{D}/out", "--device", "cuda"), "--device"),
    Case("vae-missing", ["prepare", "{D}/src", "{D}/out", "--vae", "{D}/novae", "--quiet"], "novae"),
    Case("stage-for-local-out", prep("{D}/src", "{D}/out", "--stage", "{D}/st"), "--stage"),
    Case("remote-without-credentials", prep("{D}/src", "s3://regscale-no-bucket/x"), "s3://", env=NO_CREDENTIALS),
    Case("verify-missing", ["prepare", "--verify", "{D}/nope"], "nope"),
    Case("verify-index-corrupt", ["prepare", "--verify", "{D}/data"], "index.json",
         lambda d: _write(d / "data/index.json", "{")),
    Case("verify-index-shape", ["prepare", "--verify", "{D}/data"], "index.json",
         lambda d: _write(d / "data/index.json", '{"shards": [{"x": 1}]}')),
    Case("verify-shard-changed", ["prepare", "--verify", "{D}/data"], "shard.00000.mds: xxh64 hash mismatch",
         lambda d: _flip(_shard(d)), code=1),
    Case("verify-remote-without-credentials", ["prepare", "--verify", "s3://regscale-no-bucket/x"], "s3://",
         env=NO_CREDENTIALS),
]


@pytest.mark.parametrize("case", PREPARE, ids=_ids(PREPARE))
def test_prepare_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "D" / "out").exists()


FETCH = [
    Case("encoder-unknown", ["fetch-weights", "--encoder", "nope", "--dry-run"], "nope"),
    Case("repo-id-invalid", ["fetch-weights", "--vae", "not a repo!!", "--dry-run"], "not a repo!!"),
    Case("offline", ["fetch-weights"], "127.0.0.1", env={"HF_ENDPOINT": "http://127.0.0.1:9"}),
    Case("endpoint-port-out-of-range", ["fetch-weights"], "127.0.0.1", env={"HF_ENDPOINT": "http://127.0.0.1:99999"}),
    Case("cache-read-only", ["fetch-weights"], "{RO}", env={"HF_HUB_CACHE": "{RO}/hub"}),
]


@pytest.mark.parametrize("case", FETCH, ids=_ids(FETCH))
def test_fetch_weights_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    env = {k: v.replace("{RO}", str(read_only)) for k, v in case.env.items()}
    for name, constant in (("HF_HUB_CACHE", "HF_HUB_CACHE"), ("HF_ENDPOINT", "ENDPOINT")):
        if name in env:  # huggingface_hub reads these at import: point its constants there too
            monkeypatch.setattr(huggingface_hub.constants, constant, env[name])
    run_case(Case(case.id, case.argv, case.names, case.setup, env), materials, read_only, tmp_path, capsys,
             monkeypatch)


def comp(*extra: str) -> list[str]:
    return ["compare", "--runs-dir", "{D}/runs", *extra]


COMPARE = [
    Case("store-missing", ["compare", "--runs-dir", "{D}/nope"], "nope"),
    Case("store-not-sqlite", comp(), rundir.MLFLOW_DB, lambda d: _write(d / "runs" / rundir.MLFLOW_DB, "garbage")),
    Case("uri-unknown-scheme", ["compare", "--tracking-uri", "nosuch://x"], "nosuch://x"),
    Case("uri-port-out-of-range", ["compare", "--tracking-uri", "http://127.0.0.1:99999"], "99999"),
    Case("uri-env", ["compare"], "nosuch://y", env={"MLFLOW_TRACKING_URI": "nosuch://y"}),
    Case("plot-over-the-store", comp("--plot", "{D}/runs/" + rundir.MLFLOW_DB), "--plot"),
    Case("csv-over-the-store", comp("--csv", "{D}/runs/" + rundir.MLFLOW_DB), "--csv"),
    Case("plot-over-a-foreign-png", comp("--plot", "{D}/photo.png"), "photo.png",
         lambda d: _write(d / "photo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)),
    Case("csv-over-a-foreign-csv", comp("--csv", "{D}/mine.csv"), "mine.csv", lambda d: _write(d / "mine.csv", "a,b\n")),
    Case("plot-is-dir", comp("--plot", "{D}/data.png"), "data.png", lambda d: (d / "data.png").mkdir()),
    Case("plot-read-only", comp("--plot", "{RO}/x.png"), "{RO}"),
    Case("experiment-missing", comp("--experiment", "nope"), "nope"),
    Case("filter-invalid", comp("--filter", "params.x ==== 1"), "--filter"),
    Case("run-missing", comp("nosuchrun"), "nosuchrun"),
    Case("run-name-with-quote", comp("a'b"), "a'b"),
    Case("store-damaged", comp(), rundir.MLFLOW_DB, lambda d: _truncate(d / "runs" / rundir.MLFLOW_DB, 5000)),
    Case("store-empty-file", comp(), rundir.MLFLOW_DB, lambda d: _write(d / "runs" / rundir.MLFLOW_DB, "")),
    Case("store-no-tables", comp(), "is empty", lambda d: _empty_database(d / "runs" / rundir.MLFLOW_DB)),
    Case("uri-file-store-is-a-file", ["compare", "--tracking-uri", "file://{D}/samples.npz"], "samples.npz"),
]


@pytest.mark.parametrize("case", COMPARE, ids=_ids(COMPARE))
def test_compare_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def test_compare_does_not_wait_for_an_absent_server(materials, read_only, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_case(Case("unreachable", ["compare", "--tracking-uri", f"http://127.0.0.1:{port}"], f"127.0.0.1:{port}"),
             materials, read_only, tmp_path, capsys, monkeypatch)


UI = [
    Case("store-missing", ["ui", "--runs-dir", "{D}/nope"], "nope"),
    Case("store-not-sqlite", ["ui", "--runs-dir", "{D}/runs"], rundir.MLFLOW_DB,
         lambda d: _write(d / "runs" / rundir.MLFLOW_DB, "x")),
    Case("uri-unknown-scheme", ["ui", "--tracking-uri", "nosuch://x"], "nosuch://x"),
    Case("store-damaged", ["ui", "--runs-dir", "{D}/runs"], rundir.MLFLOW_DB,
         lambda d: _truncate(d / "runs" / rundir.MLFLOW_DB, 5000)),
    Case("store-empty-file", ["ui", "--runs-dir", "{D}/runs"], "is empty",
         lambda d: _write(d / "runs" / rundir.MLFLOW_DB, "")),
    Case("port-out-of-range", ["ui", "--runs-dir", "{D}/runs", "--port", "99999"], "--port"),
]


@pytest.mark.parametrize("case", UI, ids=_ids(UI))
def test_ui_refuses(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)


def train(*overrides: str) -> list[str]:
    return ["train", "--no-track", SMOKE, "run.dir={D}/../out", "run.name=t", "data.path={D}/data", "data.synthetic=0",
            *overrides]


TRAIN = [
    Case("data-missing", train("data.path={D}/nope"), "nope"),
    Case("index-corrupt", train(), "index.json", lambda d: _write(d / "data/index.json", "{")),
    Case("index-entries", train(), "index.json", lambda d: _write(d / "data/index.json", '{"shards": [{"raw_data": {}}]}')),
    Case("shard-missing", train(), "shard.00000.mds", lambda d: _shard(d).unlink()),
    Case("shard-truncated", train(), "shard.00000.mds", lambda d: _truncate(_shard(d), 1000)),
    Case("lr-nan", train("train.lr=nan"), "train.lr"),
    Case("tracking-port", train("mlflow.tracking_uri=http://127.0.0.1:99999"), "mlflow.tracking_uri"),
    Case("remote-without-credentials", train("data.path=s3://regscale-no-bucket/x"), "s3://regscale-no-bucket/x",
         env=NO_CREDENTIALS),
]


@pytest.mark.parametrize("case", TRAIN, ids=_ids(TRAIN))
def test_train_refuses_before_making_the_run(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "out").exists()


# Credentials in a URI would be written into the run's config, every checkpoint's manifest and
# MLflow: refused wherever a URI goes, naming the variables that carry them (the secret unprinted).
CREDENTIALS = [
    Case("tracking-uri", cfg(f"mlflow.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000"),
         "MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD"),
    Case("tracking-uri-in-recipe", ["config", "{D}/r.yaml"], "'mlflow.tracking_uri' 'https://alice:***@mlflow.example",
         lambda d: _write(d / "r.yaml", f"mlflow:\n  tracking_uri: https://alice:{SECRET}@mlflow.example.org\n")),
    Case("data-path-keys", cfg(f"data.path=s3://AKIAEXAMPLE:{SECRET}@bucket/ds"), "'s3://***@bucket/ds'"),
    Case("submit", sub(f"mlflow.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000", dry_run=False),
         "MLFLOW_TRACKING_PASSWORD"),
    Case("train", train(f"data.path=s3://{SECRET}@bucket/ds"), "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY"),
    Case("prepare-out", prep("{D}/src", f"s3://AKIAEXAMPLE:{SECRET}@bucket/ds"), "AWS_ACCESS_KEY_ID"),
    Case("verify", ["prepare", "--verify", f"gs://{SECRET}@bucket/ds"], "GOOGLE_APPLICATION_CREDENTIALS"),
    Case("compare", ["compare", "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:5000"], "MLFLOW_TRACKING_PASSWORD"),
    Case("compare-env", ["compare"], "$MLFLOW_TRACKING_URI",
         env={"MLFLOW_TRACKING_URI": f"https://alice:{SECRET}@mlflow.example.org"}),
]


@pytest.mark.parametrize("case", CREDENTIALS, ids=_ids(CREDENTIALS))
def test_credentials_in_a_uri_are_refused_unprinted(case, materials, read_only, tmp_path, capsys, monkeypatch):
    run_case(case, materials, read_only, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "D" / "runs" / "new").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the command line itself, in real processes


def _cli(*argv: str, env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regscale.cli", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, **kwargs)


def test_debug_shows_the_traceback_behind_the_one_line(tmp_path):
    plain = _cli("config", str(tmp_path / "nope.yaml"))
    out, err = plain.communicate(timeout=120)
    assert plain.returncode == 2 and err.count("\n") == 1 and "nope.yaml" in err and "Traceback" not in err
    debug = _cli("config", str(tmp_path / "nope.yaml"), env={"REGSCALE_DEBUG": "1"})
    out, err = debug.communicate(timeout=120)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("regscale config: error: recipe file not found")


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    """fetch-weights against a server that accepts and never answers: interrupted while it waits."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        proc = _cli("fetch-weights", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")})
        conn, _ = server.accept()  # the reachability probe
        conn.close()
        conn, _ = server.accept()  # the download request: never answered
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        conn.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("regscale fetch-weights: interrupted")
