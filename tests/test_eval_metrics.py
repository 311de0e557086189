"""ADM-protocol metrics against independent computations; npz and reference-batch checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch

from regscale.errors import UserError
from regscale.eval.metrics import (FeatureStats, frechet_distance, inception_score,
                                   precision_recall, spatial_features)
from regscale.eval.npz import NpzArray, check_samples, load_reference, write_npz


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_matches_eigenvalue_formula():
    rng = np.random.default_rng(0)
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    # tr sqrt(s1 s2) = sum of sqrt(eigenvalues of s1^1/2 s2 s1^1/2), a symmetric PSD matrix.
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner.clip(0)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_low_rank_path_equals_sqrtm_and_eigenvalues():
    from regscale.eval.metrics import frechet

    rng = np.random.default_rng(5)
    d = 40
    a = rng.standard_normal((d, 6))
    s1, s2 = a @ a.T, _random_cov(rng, d)  # s1 has rank 6: fewer samples than dimensions
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert frechet(mu1, s1, mu2, s2)[1] == "low-rank" and frechet(mu1, s2, mu2, s2)[1] == "sqrtm"
    w, v = scipy.linalg.eigh(s2)
    root2 = (v * np.sqrt(w)) @ v.T
    inner = scipy.linalg.eigvalsh(root2 @ s1 @ root2).clip(0)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2, method="low-rank") == pytest.approx(expected, rel=1e-7)
    assert frechet(mu1, s1, mu2, s2)[0] == pytest.approx(expected, rel=1e-7)
    assert frechet(mu2, s2, mu1, s1)[0] == pytest.approx(expected, rel=1e-7)  # the factor of either side
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s2, mu2, s2 * 1.5, method="low-rank") == pytest.approx(
        frechet_distance(mu1, s2, mu2, s2 * 1.5, method="sqrtm"), rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_equal_numpy_mean_and_cov_in_any_split():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((203, 17)).astype(np.float32) * 3 + 5
    a, b = FeatureStats.empty(17), FeatureStats.empty(17)
    for chunk in np.array_split(x[:120], 7):
        a.update(torch.from_numpy(chunk))
    for chunk in np.array_split(x[120:], 3):
        b.update(torch.from_numpy(chunk))
    a.merge(b)
    mu, sigma = a.mu_sigma()
    assert a.count == 203
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_inception_score_matches_entropy_formula():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1000, 1008)).astype(np.float32) * 4
    expected = []
    for part in np.split(logits.astype(np.float64), [100 * i for i in range(1, 10)]):
        p = scipy.special.softmax(part, axis=1)
        # E_x KL(p(y|x) || p(y)) = H(p(y)) - E_x H(p(y|x))
        expected.append(np.exp(scipy.stats.entropy(p.mean(0)) - scipy.stats.entropy(p, axis=1).mean()))
    assert inception_score(logits, split_size=100) == pytest.approx(np.mean(expected), rel=1e-9)


def test_inception_score_extremes():
    assert inception_score(np.zeros((50, 1008))) == pytest.approx(1.0)
    confident = np.full((100, 1008), -1e4)  # every probability but one underflows: 0 log 0 = 0
    confident[np.arange(100), np.arange(100)] = 1e4  # chunks of 10 distinct sure classes
    assert inception_score(confident, split_size=10) == pytest.approx(10.0, rel=1e-6)


def _brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2) ** 2
        return np.sort(d, axis=1)[:, k]  # k-th neighbour other than itself

    def covered(points, centres, r):
        d = np.linalg.norm(points[:, None] - centres[None], axis=2) ** 2
        return float(np.mean((d <= r[None]).any(axis=1)))

    return covered(smp, ref, radii(ref)), covered(ref, smp, radii(smp))


@pytest.mark.parametrize("block", [7, 10_000])
def test_precision_recall_match_brute_force_knn(block):
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((60, 6))
    smp = rng.standard_normal((45, 6)) * 1.3 + 0.4
    expected = _brute_force_pr(ref, smp, k=3)
    got = precision_recall(ref, smp, k=3, block=block, distances="float32")
    assert (got.precision, got.recall) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got.precision < 1.0 and 0.0 < got.recall < 1.0  # the sets overlap only partly: a real test
    same = precision_recall(ref, ref, k=3)
    assert (same.precision, same.recall) == (1.0, 1.0)


def test_spatial_features_are_hwc_flattened_first_seven_channels():
    x = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    f = spatial_features(x)
    assert f.shape == (2, 17 * 17 * 7)
    for b, h, w, c in [(0, 0, 0, 0), (1, 3, 5, 6), (0, 16, 16, 2), (1, 9, 0, 4)]:
        assert f[b, (h * 17 + w) * 7 + c] == x[b, c, h, w]


def test_write_npz_streams_chunks_and_reads_back(tmp_path):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int64)
    path = write_npz(tmp_path / "s.npz", {
        "arr_0": (imgs.shape, np.uint8, [imgs[:3], imgs[3:7], imgs[7:]]),
        "arr_1": (labels.shape, np.int64, [labels])})
    with np.load(path) as npz:  # what the ADM evaluator does
        np.testing.assert_array_equal(npz["arr_0"], imgs)
        np.testing.assert_array_equal(npz["arr_1"], labels)
    arr = check_samples(path, expected=10)
    np.testing.assert_array_equal(arr.read(2, 9), imgs[2:9])
    np.savez_compressed(tmp_path / "c.npz", imgs)  # compressed members are streamed
    np.testing.assert_array_equal(NpzArray(tmp_path / "c.npz", "arr_0").read(4, 10), imgs[4:])
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="header says"):
        write_npz(tmp_path / "bad.npz", {"arr_0": ((5, 2), np.uint8, [np.zeros((3, 2))])})
    assert not (tmp_path / "bad.npz").exists() and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("array,match", [
    (np.zeros((4, 8, 8, 3), np.float32), "float32 .* expected uint8"),
    (np.zeros((4, 3, 8, 8), np.uint8), r"\[4, 3, 8, 8\]; expected uint8 \[N,H,W,3\]"),
])
def test_samples_of_wrong_dtype_or_layout_are_refused(tmp_path, array, match):
    np.savez(tmp_path / "s.npz", array)
    with pytest.raises(UserError, match=match):
        check_samples(tmp_path / "s.npz")


def test_too_few_samples_and_missing_arrays_are_named(tmp_path):
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="holds 4 samples, fewer than the 5 asked"):
        check_samples(tmp_path / "s.npz", expected=5)
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="no array 'arr_0' \\(has: images\\)"):
        check_samples(tmp_path / "x.npz")
    (tmp_path / "t.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not an .npz"):
        check_samples(tmp_path / "t.npz")


def test_reference_batch_checks_name_missing_and_malformed_arrays(tmp_path):
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "r.npz", arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(UserError, match="missing 'mu_s' \\(mixed_6/conv mean\\), 'sigma_s'"):
        load_reference(tmp_path / "r.npz")
    np.savez(tmp_path / "r.npz", arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(5),
             sigma_s=np.eye(5))
    with pytest.raises(UserError, match="'mu_s' \\(mixed_6/conv mean\\) has shape \\[5\\]; expected \\[2023\\]"):
        load_reference(tmp_path / "r.npz")
    np.savez(tmp_path / "r.npz", arr_0=imgs, mu=np.ones(2048, np.float32), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    ref = load_reference(tmp_path / "r.npz")
    assert ref.mu.dtype == np.float64 and len(ref.images) == 4 and len(ref.sha256) == 64


def test_missing_or_wrong_inception_weights_are_named(tmp_path, monkeypatch):
    from regscale.eval.inception import MissingInceptionWeights, load_inception

    with pytest.raises(MissingInceptionWeights, match=f"'eval.inception' points to {tmp_path}/w.pth .*curl -L"):
        load_inception(str(tmp_path / "w.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(MissingInceptionWeights, match="torch-fidelity cache: .*home/hub/checkpoints/weights-inception"):
        load_inception(None)
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="w.pth: not the TF-ported InceptionV3 state dict"):
        load_inception(str(tmp_path / "w.pth"))


def test_inception_outputs_and_the_sfid_tap(one_thread):
    from regscale.eval.inception import load_inception

    net = load_inception(random_init=True, seed=1)
    assert not net.comparable and "RANDOM" in net.description
    taps = []
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.append(o))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    pool, spatial, logits = net(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, 2023)
    assert taps[0].shape == (2, 192, 17, 17)  # mixed_6/conv: the 1x1 branch of TF's mixed_6 (Mixed_6d)
    torch.testing.assert_close(spatial, taps[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.isfinite(pool).all() and pool.std() > 0
    with pytest.raises(ValueError, match="uint8"):
        net(x.float())


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from regscale.cli import main

    np.savez(tmp_path / "s.npz", np.zeros((4, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected uint8 [N,H,W,3]" in err
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception",
                 str(tmp_path / "w.pth")]) == 2
    assert "Inception weights 'eval.inception' points to" in capsys.readouterr().err
    (tmp_path / "w.pth").write_bytes(b"")
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception",
                 str(tmp_path / "w.pth")]) == 2
    assert "not an ADM reference batch: missing 'mu' (pool3 mean)" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert "no such run directory or .safetensors file" in capsys.readouterr().err
