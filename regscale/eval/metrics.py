"""The ADM evaluator's metrics (guided-diffusion `evaluations/evaluator.py`), in PyTorch + SciPy.

- FID and sFID: Frechet distance between Gaussians, float64, `scipy.linalg.sqrtm` of
  sigma1 @ sigma2, with ADM's eps-offset retry when the square root is not finite. With fewer
  samples than dimensions (smoke runs, tests) a covariance is singular, and the same trace is
  taken exactly through a pivoted Cholesky factor instead (sqrtm needs minutes there).
- Inception Score: softmax of the bias-free logits, split in `splits` contiguous parts,
  exp(mean KL(p(y|x) || p(y))) per part, the mean over parts (ADM reports no std);
  0 log 0 = 0 where the softmax underflows (ADM would give NaN).
- Precision / recall: k-NN manifolds (k=3) on pool3 features. A point's radius is its squared
  distance to the (k+1)-th nearest point of its own set, itself included (ADM's `seq[k]`);
  precision is the fraction of samples inside some reference ball, recall the reverse.
- Statistics stream: mean and covariance accumulate in float64 batch by batch (Chan's merge), so
  50K feature vectors never need to sit in memory, and per-rank partial sums merge exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

SFID_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """mixed_6/conv activations [B,C,17,17] (NCHW) -> sFID features [B, 17*17*7], HWC order as in
    TensorFlow's NHWC `spatial[..., :7].reshape(B, -1)`."""
    first = mixed_6_conv[:, :SFID_CHANNELS]
    return first.permute(0, 2, 3, 1).reshape(first.shape[0], -1)


@dataclass
class FeatureStats:
    """Running count, mean and centred scatter matrix of feature vectors (float64)."""

    count: int
    mean: torch.Tensor  # [D] float64
    scatter: torch.Tensor  # [D, D] float64: sum of (x - mean)(x - mean)^T

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> "FeatureStats":
        return cls(0, torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dim, dtype=torch.float64, device=device))

    def update(self, feats: torch.Tensor) -> None:
        """Add a batch [B, D] of features."""
        x = feats.to(device=self.mean.device, dtype=torch.float64)
        b = x.shape[0]
        if b == 0:
            return
        batch_mean = x.mean(0)
        centred = x - batch_mean
        self._merge(b, batch_mean, centred.T @ centred)

    def merge(self, other: "FeatureStats") -> None:
        """Fold another partial (another rank's) into this one."""
        self._merge(other.count, other.mean.to(self.mean.device), other.scatter.to(self.mean.device))

    def _merge(self, n: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.scatter += scatter + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance) as float64 numpy arrays, as `np.cov` would give them."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors; have {self.count}")
        return self.mean.cpu().numpy(), (self.scatter / (self.count - 1)).cpu().numpy()

    def to_cpu(self) -> "FeatureStats":
        return FeatureStats(self.count, self.mean.cpu(), self.scatter.cpu())


def _psd_factor(sigma: np.ndarray) -> tuple[np.ndarray, int]:
    """(F, rank) with sigma = F F^T, F of shape [D, rank] (LAPACK pivoted Cholesky, dpstrf)."""
    from scipy.linalg.lapack import dpstrf

    chol, piv, rank, _ = dpstrf(sigma, lower=1, tol=-1)
    factor = np.zeros((sigma.shape[0], rank))
    factor[piv - 1] = np.tril(chol)[:, :rank]
    return factor, int(rank)


def _trace_sqrt_low_rank(factor: np.ndarray, sigma: np.ndarray) -> float:
    """tr sqrt(F F^T S) = sum of sqrt(eigenvalues of the small PSD matrix F^T S F): exact."""
    eig = linalg.eigvalsh(factor.T @ sigma @ factor)
    return float(np.sqrt(eig.clip(min=0)).sum())


def frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> tuple[float, str]:
    """(distance, method): ADM's 'sqrtm' when both covariances have full rank, as with 50K samples
    and the 10K reference; 'low-rank' when one has fewer independent samples than dimensions,
    where sqrtm is slow and unreliable (ADM would warn and retry with an eps offset)."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    (f1, r1), (f2, r2) = _psd_factor(s1), _psd_factor(s2)
    if r1 == s1.shape[0] and r2 == s2.shape[0]:
        return frechet_distance(mu1, s1, mu2, s2, method="sqrtm"), "sqrtm"
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    tr_covmean = _trace_sqrt_low_rank(f1, s2) if r1 <= r2 else _trace_sqrt_low_rank(f2, s1)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean), "low-rank"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2), in float64.

    method 'sqrtm': ADM's `scipy.linalg.sqrtm(sigma1 @ sigma2)` with its eps-offset retry and its
    imaginary-part check. 'low-rank': the same trace through a pivoted Cholesky factor of the
    lower-rank covariance (exact for any factor F of sigma = F F^T; used when a covariance is
    singular). `frechet` picks."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "low-rank":
        (f1, r1), (f2, r2) = _psd_factor(sigma1), _psd_factor(sigma2)
        tr_covmean = _trace_sqrt_low_rank(f1, sigma2) if r1 <= r2 else _trace_sqrt_low_rank(f2, sigma1)
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if method != "sqrtm":
        raise ValueError(f"method must be 'sqrtm' or 'low-rank'; got {method!r}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: sqrtm(sigma1 sigma2) is singular; adding {eps} to the "
                      "diagonals (as ADM does)", RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g} (statistics are not covariances?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> float:
    """ADM's IS from bias-free Inception logits [N, 1008]: `splits` contiguous parts of
    ceil(N / splits) samples (5,000 each at 50K), mean of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score expects logits [N, classes]; got {tuple(logits.shape)}")
    preds = torch.softmax(logits, dim=1)
    size = -(-preds.shape[0] // splits)
    scores = []
    for part in preds.split(size):
        marginal = part.mean(0, keepdim=True)  # xlogy: 0 log 0 = 0 where softmax underflows
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)
        scores.append(torch.exp(kl.sum(1).mean()).item())
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)], clamped at 0 (ADM's norm expansion)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(feats: torch.Tensor, k: int = 3, block: int = 10_000) -> torch.Tensor:
    """Squared distance from each point to its (k+1)-th nearest point in `feats` (itself included)."""
    if feats.shape[0] <= k:
        raise ValueError(f"a k={k} manifold needs more than {k} points; have {feats.shape[0]}")
    radii = []
    for rows in feats.split(block):
        dist = torch.cat([_sq_distances(rows, cols) for cols in feats.split(block)], dim=1)
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point: is it inside at least one ball (centre, radius)?"""
    inside = []
    for rows in points.split(block):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for c, r in zip(centres.split(block), radii.split(block)):
            hit |= (_sq_distances(rows, c) <= r[None, :]).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(ref: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, k: int = 3,
                     block: int = 10_000, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them on pool3."""
    ref_t = torch.as_tensor(ref).to(device=device, dtype=dtype)
    smp_t = torch.as_tensor(samples).to(device=device, dtype=dtype)
    ref_radii = manifold_radii(ref_t, k, block)
    smp_radii = manifold_radii(smp_t, k, block)
    precision = _coverage(smp_t, ref_t, ref_radii, block).double().mean().item()
    recall = _coverage(ref_t, smp_t, smp_radii, block).double().mean().item()
    return precision, recall
