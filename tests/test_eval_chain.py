"""The whole evaluation with random networks: sample -> Inception features -> metrics -> record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from regscale.errors import UserError
from regscale.rundir import EVAL_RECORD, EVAL_SAMPLES
from tests.fixtures.eval import tiny_eval_config, tiny_state


class RecordingTracker:
    """Collects what the evaluation hands to the tracker (the MLflow area tests the real one)."""

    def __init__(self) -> None:
        self.evals: list[tuple[dict, int, dict]] = []
        self.artifacts: list[tuple[Path, str]] = []

    def log_eval(self, metrics: dict, step: int, info: dict) -> None:
        self.evals.append((metrics, step, info))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))


def _write_shards(out: Path, n: int) -> Path:
    from streaming import MDSWriter

    from regscale.data.shards import columns

    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns=columns("raw")) as writer:
        for i in range(n):
            writer.write({"image": rng.integers(0, 256, (3, 256, 256), dtype=np.uint8),
                          "moments": np.zeros((8, 32, 32), np.float32), "label": i % 10, "index": i})
    return out


def test_tiny_chain_with_random_networks(tmp_path, one_thread):
    from regscale.eval.job import evaluate

    data = _write_shards(tmp_path / "data", 4)
    cfg = tiny_eval_config(f"data.path={data}", "eval.num_samples=4", "eval.batch_size=4")
    tracker = RecordingTracker()
    record = evaluate(cfg, tiny_state(cfg), tmp_path / "eval", step=20, tracker=tracker)

    names = ["fid", "sfid", "inception_score", "precision", "recall"]
    assert list(record["metrics"]) == [f"{n}_not_comparable" for n in names]
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert record["metrics"]["fid_not_comparable"] > 0 and record["metrics"]["inception_score_not_comparable"] >= 1
    assert record["comparable"] is False and "not comparable" in record["note"]
    assert record["reference"]["kind"] == "training-shards" and record["reference"]["images"] == 4
    assert len(record["reference"]["sha256"]) == 64
    assert record["evaluator"]["version"] and "RANDOM" in record["evaluator"]["network"]
    assert record["settings"]["cfg_scale"] == 1.5 and record["settings"]["guidance_high"] == 0.85
    assert record["samples"]["count"] == 4 and record["samples"]["labels"] == "uniform"
    assert record["settings"]["precision"] == "fp32" and record["settings"]["compile"] is False
    assert record["inception_score"] == {"chunk_sizes": [4]}  # ADM's chunks of 5,000: one short chunk
    assert record["precision_recall"] == {"distances": "float16", "float32_blocks": 0, "blocks": 3}
    assert any("0 log 0" in line for line in record["evaluator"]["adm_undefined"])
    assert json.loads((tmp_path / "eval" / EVAL_RECORD).read_text()) == json.loads(json.dumps(record, default=str))
    with np.load(tmp_path / "eval" / EVAL_SAMPLES) as npz:
        assert npz["arr_0"].shape == (4, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    (metrics, step, info), = tracker.evals
    assert step == 20 and metrics == record["metrics"] and info["comparable"] is False
    assert info["precision"] == "fp32" and info["pr_distances"] == "float16"
    assert tracker.artifacts == [(tmp_path / "eval" / EVAL_RECORD, "eval/step_00000020")]


def test_precomputed_reference_statistics_are_used_as_they_are(tmp_path, one_thread):
    from regscale.eval.features import extract
    from regscale.eval.inception import load_inception
    from regscale.eval.job import Reference, score
    from regscale.eval.npz import check_samples, load_reference

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
             mu=np.full(2048, 0.5), sigma=np.eye(2048) * 0.1, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    ref = load_reference(tmp_path / "r.npz")
    net = load_inception(random_init=True)
    samples = check_samples(tmp_path / "s.npz")
    got = score(samples, Reference(ref.images, (ref.mu, ref.sigma, ref.mu_s, ref.sigma_s), {}), net,
                batch_size=4, device=torch.device("cpu"))
    feats = extract(net, samples, 4)
    mu, sigma = feats.pool_stats.mu_sigma()
    assert got["frechet"] == {"fid": "low-rank", "sfid": "low-rank"}  # 4 samples: singular covariance
    # sigma_ref = 0.1 I as stored: FID = ||mu - 0.5||^2 + tr sigma + 204.8 - 2 sqrt(0.1) tr sqrt(sigma),
    # tr sqrt(sigma) from the 4x4 Gram matrix of the centred features (same non-zero eigenvalues)
    centred = feats.pool.astype(np.float64) - mu
    root = np.sqrt(np.linalg.eigvalsh(centred @ centred.T / 3).clip(0)).sum()
    expected = np.sum((mu - 0.5) ** 2) + np.trace(sigma) + 204.8 - 2 * np.sqrt(0.1) * root
    assert got["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)


def test_missing_evaluator_inputs_fail_before_any_sampling(tmp_path):
    from regscale.eval.inception import MissingInceptionWeights
    from regscale.eval.job import evaluate

    cfg = tiny_eval_config("eval.random_inception=false", f"eval.inception={tmp_path}/none.pth")
    with pytest.raises(MissingInceptionWeights, match="none.pth"):
        evaluate(cfg, tiny_state(cfg), tmp_path / "eval", step=1)
    (tmp_path / "w.pth").write_bytes(b"")
    cfg = tiny_eval_config("eval.random_inception=false", f"eval.inception={tmp_path}/w.pth")
    with pytest.raises(UserError, match="'eval.ref_batch' is required: the ADM reference batch"):
        evaluate(cfg, tiny_state(cfg), tmp_path / "eval", step=1)
    assert not (tmp_path / "eval").exists()
