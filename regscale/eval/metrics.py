"""The ADM evaluator's metrics (guided-diffusion `evaluations/evaluator.py`), in PyTorch + SciPy.

- FID and sFID: Frechet distance between Gaussians, float64, `scipy.linalg.sqrtm` of
  sigma1 @ sigma2, with ADM's eps-offset retry when the square root is not finite. With fewer
  samples than dimensions (smoke runs, tests) a covariance is singular, and the same trace is
  taken exactly through a pivoted Cholesky factor instead (sqrtm needs minutes there).
- Inception Score: softmax of the bias-free logits, in consecutive chunks of 5,000 samples (the
  last one shorter), exp(mean KL(p(y|x) || p(y))) per chunk, the unweighted mean over chunks
  (ADM reports no std); 0 log 0 = 0 where the softmax underflows (ADM would give NaN).
- Precision / recall: k-NN manifolds (k=3) on pool3 features. A point's radius is its squared
  distance to the (k+1)-th nearest point of its own set, itself included (ADM's `seq[k]`);
  precision is the fraction of samples inside some reference ball, recall the reverse. Squared
  distances are ADM's float16 norm expansion per 10,000 x 10,000 block (float32 only for a block
  with a non-finite entry), or float32 throughout when asked.
- Statistics stream: mean and covariance accumulate in float64 batch by batch (Chan's merge), so
  50K feature vectors never need to sit in memory, and per-rank partial sums merge exactly.

`ADM_UNDEFINED` lists what ADM leaves undefined and regscale decides; the eval record carries it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from scipy import linalg

SFID_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
IS_SPLIT_SIZE = 5_000  # ADM: consecutive chunks of 5,000 samples, the last one shorter
PR_BLOCK = 10_000  # ADM's row and column block of the pairwise distances
PR_DISTANCES = ("float16", "float32")  # ADM's default first

ADM_UNDEFINED = (
    "Inception Score: the softmax is taken in float64 from the float32 logits, and a class "
    "probability that underflows to 0 contributes 0 (0 log 0 = 0); ADM's float32 softmax and "
    "log(0) would make the score NaN.",
    "FID/sFID with fewer samples than feature dimensions (2,048 pool_3, 2,023 sFID): a covariance "
    "is singular, and tr sqrt(sigma1 sigma2) is taken exactly through a pivoted Cholesky factor "
    "('low-rank' in frechet_method); ADM's sqrtm would warn, add 1e-6 to both diagonals and "
    "return a number that depends on that offset.",
    "Feature means and covariances accumulate in float64 (streamed in batches, merged across "
    "ranks); ADM's np.mean of the float32 activations is float32 (its np.cov is float64).",
    "Precision/recall, float16 distances: operands and every elementwise step are IEEE float16; "
    "the two sums (squared norms, dot products) accumulate in float32 and round once to float16 "
    "(on CPU and GPU alike, TF32 off). ADM leaves those sums "
    "to its GPU's kernels: cuBLAS accumulates half GEMMs in float32, TF's half row sum "
    "accumulates in half in an order regscale does not reproduce.",
    "Precision/recall, float32 distances (a fallback block, or eval.pr_distances=float32): IEEE "
    "float32 with TF32 off; ADM's TensorFlow (2.4 and later) uses TF32 there by default on Ampere "
    "and newer GPUs.",
)


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


def chunk_sizes(n: int, size: int) -> list[int]:
    """Sizes of the consecutive chunks of `size` items that n items make (the last one shorter)."""
    return [min(size, n - start) for start in range(0, n, size)]


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's IS from bias-free Inception logits [N, 1008]: the unweighted mean over consecutive
    chunks of `split_size` samples (the last one shorter) of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score expects logits [N, classes]; got {tuple(logits.shape)}")
    preds = torch.softmax(logits, dim=1)
    scores = []
    for part in preds.split(chunk_sizes(len(preds), split_size)):
        marginal = part.mean(0, keepdim=True)  # xlogy: 0 log 0 = 0 where softmax underflows
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)
        scores.append(torch.exp(kl.sum(1).mean()).item())
    return float(np.mean(scores))


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in CUDA matmuls and convolutions inside the block (IEEE float32, as the evaluator
    needs); the previous settings come back on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _sq_distances_float32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((u * u).sum(1, keepdim=True) - 2.0 * (u @ v.T) + (v * v).sum(1)[None, :]).clamp_min(0.0)


def _sq_distances_float16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's half-precision norm expansion max(|u|^2 - 2 u.v + |v|^2, 0): operands and every
    elementwise step in float16 (each op rounds once; overflow gives inf, NaN survives the clamp),
    the two sums accumulated in float32 and rounded once to float16."""
    u16, v16 = u.half(), v.half()
    norm_u = (u16 * u16).sum(1, keepdim=True, dtype=torch.float32).half()
    norm_v = (v16 * v16).sum(1, dtype=torch.float32).half()[None, :]
    dot = (u16.float() @ v16.float().T).half()  # products of halves are exact in float32
    return ((norm_u - 2 * dot) + norm_v).clamp_min(0).float()


def sq_distances(u: torch.Tensor, v: torch.Tensor, distances: str = "float16") -> tuple[torch.Tensor, bool]:
    """(squared Euclidean distances [len(u), len(v)] as float32, whether float32 was used).

    "float16": ADM's half-precision block, recomputed in float32 if any entry is not finite;
    "float32": float32 throughout. Call with blocks of at most PR_BLOCK rows and columns, as ADM
    decides the fallback per such block."""
    if distances not in PR_DISTANCES:
        raise ValueError(f"distances must be one of {PR_DISTANCES}; got {distances!r}")
    u, v = u.float(), v.float()
    with exact_float32():
        if distances == "float16":
            d = _sq_distances_float16(u, v)
            if torch.isfinite(d).all():
                return d, False
        return _sq_distances_float32(u, v), True


@dataclass
class PrecisionRecall:
    """Improved precision and recall and how their distances were computed."""

    precision: float
    recall: float
    distances: str  # "float16" (ADM) | "float32"
    float32_blocks: int  # distance blocks that fell back to (or were asked in) float32
    blocks: int


class DistanceBlocks:
    """`sq_distances` with one precision for every block, counting the blocks and the float32 ones."""

    def __init__(self, distances: str = "float16") -> None:
        self.distances, self.blocks, self.float32_blocks = distances, 0, 0

    def __call__(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d, used_float32 = sq_distances(u, v, self.distances)
        self.blocks += 1
        self.float32_blocks += used_float32
        return d


def manifold_radii(feats: torch.Tensor, k: int = 3, block: int = PR_BLOCK,
                   dist: DistanceBlocks | None = None) -> torch.Tensor:
    """Squared distance from each point to its (k+1)-th nearest point in `feats` (itself included),
    from `block` x `block` distance blocks (ADM's float16 ones by default)."""
    if feats.shape[0] <= k:
        raise ValueError(f"a k={k} manifold needs more than {k} points; have {feats.shape[0]}")
    dist = dist or DistanceBlocks()
    radii = []
    for rows in feats.split(block):
        nearest = torch.empty(rows.shape[0], 0, device=rows.device)
        for cols in feats.split(block):  # the k+1 smallest of each row, merged across column blocks
            nearest = torch.cat([nearest, dist(rows, cols)], dim=1)
            nearest = nearest.topk(k + 1, dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(ref: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, k: int = 3,
                     block: int = PR_BLOCK, device: torch.device | str = "cpu",
                     distances: str = "float16") -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them on pool3.

    Every reference block (rows) meets every sample block (columns) once: the same distance
    block decides which samples fall in a reference ball and which references in a sample ball."""
    ref_t = torch.as_tensor(ref).to(device=device, dtype=torch.float32)
    smp_t = torch.as_tensor(samples).to(device=device, dtype=torch.float32)
    dist = DistanceBlocks(distances)
    ref_radii = manifold_radii(ref_t, k, block, dist)
    smp_radii = manifold_radii(smp_t, k, block, dist)
    ref_in = torch.zeros(len(ref_t), dtype=torch.bool, device=ref_t.device)
    smp_in = torch.zeros(len(smp_t), dtype=torch.bool, device=smp_t.device)
    for i in range(0, len(ref_t), block):
        for j in range(0, len(smp_t), block):
            d = dist(ref_t[i:i + block], smp_t[j:j + block])
            ref_in[i:i + block] |= (d <= smp_radii[None, j:j + block]).any(dim=1)
            smp_in[j:j + block] |= (d <= ref_radii[i:i + block, None]).any(dim=0)
    return PrecisionRecall(precision=smp_in.double().mean().item(), recall=ref_in.double().mean().item(),
                           distances=distances, float32_blocks=dist.float32_blocks, blocks=dist.blocks)
