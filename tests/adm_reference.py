"""An independent reading of the ADM evaluator's Inception Score and precision/recall, in NumPy.

Written from the protocol's description (guided-diffusion `evaluations/evaluator.py` as the
REG_SPEC "Evaluation" section and issue 16 describe it), not from regscale's code, so the tests
and bench/bench_eval_metrics.py can pin regscale against it:

- IS: softmax of the logits; consecutive chunks of 5,000 samples, the last one shorter; per chunk
  exp of the mean over samples of KL(p(y|x) || p(y)), p(y) the chunk's mean; the plain mean of
  the chunk scores.
- Precision/recall (k=3): a point's radius is the (k+1)-th smallest of its squared distances to
  its own set (itself included). Squared distances come in blocks of `block` rows x `block`
  columns (10,000 in ADM): both operands cast to float16, |u|^2 - 2 u.v + |v|^2 with float16
  arithmetic, clamped at 0; a block with any non-finite entry is computed again in float32.
  Reference features are the rows and samples the columns of the blocks that decide
  membership: a sample is in the reference manifold when some reference point's ball holds it.

The two sums of the float16 expansion (squared norms, dot products) are taken here exactly
(float64, then rounded to float16 once): the ideal that float32 accumulation approximates.
Synthetic inputs for both: `pool3_like` features, `concentrated` ones (a float16 stress case) and
`confident_logits`.
"""

from __future__ import annotations

import numpy as np
import scipy.special


def inception_score(logits: np.ndarray, split_size: int = 5_000) -> float:
    """ADM's Inception Score of logits [N, classes]."""
    scores = []
    for start in range(0, len(logits), split_size):
        p = scipy.special.softmax(np.asarray(logits[start:start + split_size], np.float64), axis=1)
        kl = scipy.special.rel_entr(p, p.mean(axis=0, keepdims=True)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def float16_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) in float16 arithmetic (exact sums rounded once), as float16."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u = np.square(u16).astype(np.float64).sum(axis=1).astype(np.float16)
        norm_v = np.square(v16).astype(np.float64).sum(axis=1).astype(np.float16)
        dot = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
        d = (norm_u[:, None] - np.float16(2) * dot) + norm_v[None, :]
        return np.maximum(d, np.float16(0))  # NaN stays NaN


def float32_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) in float32."""
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    d = (u32 * u32).sum(axis=1)[:, None] - np.float32(2) * (u32 @ v32.T) + (v32 * v32).sum(axis=1)[None, :]
    return np.maximum(d, np.float32(0))


class Distances:
    """Row-block distances to a whole set, block by block with ADM's float32 fallback."""

    def __init__(self, mode: str, block: int, float16_fn=float16_distances) -> None:
        assert mode in ("float16", "float32")
        self.mode, self.block, self.fallbacks, self.blocks = mode, block, 0, 0
        self.float16_fn = float16_fn

    def rows_to(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), len(others)), np.float32)
        for start in range(0, len(others), self.block):
            cols = others[start:start + self.block]
            d = self.float16_fn(rows, cols) if self.mode == "float16" else None
            if d is None or not np.isfinite(d).all():
                d = float32_distances(rows, cols)
                self.fallbacks += 1
            self.blocks += 1
            out[:, start:start + len(cols)] = d
        return out


def radii(feats: np.ndarray, k: int, dist: Distances) -> np.ndarray:
    out = np.empty(len(feats), np.float32)
    for start in range(0, len(feats), dist.block):
        d = dist.rows_to(feats[start:start + dist.block], feats)
        out[start:start + len(d)] = np.partition(d, k, axis=1)[:, k]
    return out


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, mode: str = "float16",
                     block: int = 10_000, float16_fn=float16_distances) -> tuple[float, float, int]:
    """(precision, recall, blocks computed in float32); float16_fn: the float16 block."""
    dist = Distances(mode, block, float16_fn)
    ref_radii, smp_radii = radii(ref, k, dist), radii(samples, k, dist)
    ref_in = np.zeros(len(ref), bool)
    smp_in = np.zeros(len(samples), bool)
    for start in range(0, len(ref), block):
        d = dist.rows_to(ref[start:start + block], samples)
        ref_in[start:start + len(d)] = (d <= smp_radii[None, :]).any(axis=1)
        smp_in |= (d <= ref_radii[start:start + len(d), None]).any(axis=0)
    return float(smp_in.mean()), float(ref_in.mean()), dist.fallbacks


def pool3_like(n: int, rng: np.random.Generator, spread: float = 1.0, noise: float = 0.085,
               dim: int = 2048, latent: int = 32, classes: int = 100) -> np.ndarray:
    """float32 features shaped like Inception pool_3: non-negative, mean ~0.4, |x|^2 ~ 1,200, on a
    low-dimensional clustered manifold (a ReLU of a random linear map of `latent` dims) plus noise.
    `spread` and `noise` below 1.0 and 0.085 make a less diverse set than the defaults."""
    fixed = np.random.default_rng(1234)
    lift = fixed.normal(0.0, 0.85 / np.sqrt(latent), size=(latent, dim))
    centres = fixed.normal(0.0, 1.0, size=(classes, latent))
    z = centres[rng.integers(0, classes, n)] + rng.normal(0.0, spread, size=(n, latent))
    return np.maximum(z @ lift - 0.17 + rng.normal(0.0, noise, size=(n, dim)), 0).astype(np.float32)


def concentrated(n: int, rng: np.random.Generator, shift: float = 0.0, dim: int = 2048) -> np.ndarray:
    """Clustered features under isotropic noise in every dimension: all distances nearly equal,
    so float16 rounding moves precision/recall by points (a stress case, not pool_3)."""
    centres = np.random.default_rng(1234).gamma(0.6, 0.6, size=(50, dim))
    x = centres[rng.integers(0, 50, n)] * rng.gamma(8.0, 1 / 8.0, size=(n, 1)) + rng.normal(shift, 0.25, (n, dim))
    return np.maximum(x, 0).astype(np.float32)


def confident_logits(n: int, seed: int) -> np.ndarray:
    """float32 logits [n, 1008] of a sharp classifier over 1,000 classes (an IS in the hundreds)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, 1008)) * 2.0
    logits[np.arange(n), rng.integers(0, 1000, n)] += rng.uniform(8.0, 16.0, n)
    return logits.astype(np.float32)
