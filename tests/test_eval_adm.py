"""Inception Score and precision/recall pinned against an independent reading of the ADM protocol
(tests/adm_reference.py): ADM's IS chunks of 5,000 and its float16 distance blocks with the
float32 fallback, at sample counts where the old rules gave other numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regscale.eval.metrics import inception_score, precision_recall, sq_distances
from tests import adm_reference as adm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [10_000, 12_345])
def test_inception_score_takes_adm_chunks_of_5000(n):
    logits = adm.confident_logits(n, seed=n)
    got = inception_score(logits)
    assert got == pytest.approx(adm.inception_score(logits, split_size=5_000), rel=1e-9)
    assert 100 < got < 1000
    # ten equal splits (the old rule) is another number at these counts: the test tells them apart
    assert abs(adm.inception_score(logits, split_size=-(-n // 10)) - got) > 20


def test_inception_score_short_last_chunk_counts_like_a_full_one():
    logits = adm.confident_logits(12_345, seed=1)
    chunks = [adm.inception_score(logits[a:b], split_size=5_000) for a, b in
              ((0, 5_000), (5_000, 10_000), (10_000, 12_345))]
    assert inception_score(logits) == pytest.approx(np.mean(chunks), rel=1e-9)


def test_float16_distances_are_adm_half_arithmetic():
    rng = np.random.default_rng(0)
    u, v = adm.pool3_like(300, rng), adm.pool3_like(400, rng, spread=0.95, noise=0.075)
    got, used_float32 = sq_distances(torch.from_numpy(u), torch.from_numpy(v))
    expected = adm.float16_distances(u, v).astype(np.float32)
    assert not used_float32 and got.dtype == torch.float32
    assert np.all(got.numpy() == got.numpy().astype(np.float16))  # float16 values
    # float32 accumulation of the dot products against exact sums: rare 1-ulp rounding flips only
    ulp = np.spacing(expected.astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(got.numpy() - expected) <= ulp) and np.mean(got.numpy() != expected) < 1e-3
    exact32, _ = sq_distances(torch.from_numpy(u), torch.from_numpy(v), "float32")
    assert torch.mean((got != exact32).float()) > 0.5  # the half rounding is really there


def test_float16_overflow_of_the_dot_product_gives_zero_as_in_half():
    u = torch.full((1, 4), 100.0)  # |u|^2 = 40000 fits float16; 2 u.u = 80000 overflows to inf
    d, used_float32 = sq_distances(u, u + 1.0)
    assert d.item() == 0.0 and not used_float32  # |u|^2 - inf + |v|^2 = -inf, clamped: finite
    big = torch.full((1, 4), 200.0)  # 200^2 * 4 = 160000: the norm overflows, inf - inf = NaN
    d, used_float32 = sq_distances(big, big + 1.0)
    assert used_float32 and d.item() == pytest.approx(4.0)


@pytest.mark.parametrize("mode", ["float16", "float32"])
def test_precision_recall_match_adm_reference(mode):
    rng = np.random.default_rng(7)
    ref, smp = adm.pool3_like(1_000, rng), adm.pool3_like(1_200, rng, spread=0.95, noise=0.075)
    got = precision_recall(ref, smp, block=400, distances=mode)  # 3 x 3 blocks, a short last one
    precision, recall, float32_blocks = adm.precision_recall(ref, smp, mode=mode, block=400)
    assert (got.precision, got.recall) == pytest.approx((precision, recall), abs=1e-3)
    assert got.distances == mode and got.float32_blocks == float32_blocks
    assert got.blocks == 9 + 9 + 9  # reference radii, sample radii, reference x samples
    assert 0.5 < got.precision < 1.0 and 0.5 < got.recall <= 1.0


def test_float16_and_float32_distances_give_other_precision():
    rng = np.random.default_rng(7)  # nearly equal distances: float16 rounding decides memberships
    ref, smp = adm.concentrated(1_000, rng), adm.concentrated(1_200, rng, shift=0.03)
    half, single = (precision_recall(ref, smp, block=400, distances=m) for m in ("float16", "float32"))
    assert abs(half.precision - single.precision) > 5e-3  # the default matters
    precision, recall, _ = adm.precision_recall(ref, smp, block=400)
    assert (half.precision, half.recall) == pytest.approx((precision, recall), abs=1e-3)


def test_only_blocks_with_a_non_finite_entry_fall_back_to_float32():
    rng = np.random.default_rng(3)
    ref, smp = adm.pool3_like(1_000, rng), adm.pool3_like(1_200, rng, spread=0.95, noise=0.075)
    smp[500, :8] = 300.0  # its squares overflow float16: every block holding sample 500 is redone
    got = precision_recall(ref, smp, block=400)
    precision, recall, float32_blocks = adm.precision_recall(ref, smp, block=400)
    # sample radii: its row block (3) + its column block in the 2 other row blocks; cross: 3
    assert got.float32_blocks == float32_blocks == 3 + 2 + 3
    assert (got.precision, got.recall) == pytest.approx((precision, recall), abs=1e-3)
