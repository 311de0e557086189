"""The evaluator's Inception Score and precision/recall against an independent reference at
realistic sizes: agreement and time, in one run.

    .venv/bin/python bench/bench_eval_metrics.py --threads 2 --only is
    .venv/bin/python bench/bench_eval_metrics.py --threads 2 --only pr            # 10K x 50K x 2048
    .venv/bin/python bench/bench_eval_metrics.py --threads 2 --only pr-sensitivity

The reference is tests/adm_reference.py, an independent NumPy reading of the ADM protocol (IS in
consecutive chunks of 5,000; precision/recall from float16 distance blocks of 10,000 x 10,000
with the float32 fallback, exact sums rounded once to float16). Features are synthetic, shaped
like Inception pool_3 (non-negative, mean ~0.4, a low-dimensional clustered manifold; the samples
a little less diverse than the reference); logits those of a sharp classifier.

1. is: regscale's IS against the reference at --is-counts samples, and what 10 equal splits gave.
2. pr: precision/recall at --ref x --samples, regscale float16 (ADM) against the reference, and
   regscale float32 against float16 (what eval.pr_distances=float32 changes).
3. pr-sensitivity: the reference with the squared norms summed in float16 in a CUB-like order
   (256 threads x 8 items in sequence, then a tree), as TensorFlow's GPU row sum of a half tensor
   does, against regscale's float32 sums: how closely any port can pin ADM's numbers.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.adm_reference (site-packages may hold another `tests`)

from bench.bench_eval import machine  # noqa: E402
from regscale.eval.metrics import inception_score, precision_recall  # noqa: E402
from tests import adm_reference as adm  # noqa: E402


def bench_is(args: argparse.Namespace) -> None:
    for n in args.is_counts:
        logits = adm.confident_logits(n, seed=n)
        ours, ref = inception_score(logits), adm.inception_score(logits)
        ten = adm.inception_score(logits, split_size=-(-n // 10))
        print(f"IS at {n} samples: regscale {ours:.6f}, reference {ref:.6f}, |diff| {abs(ours - ref):.1e} "
              f"(10 equal splits, the old rule: {ten:.3f})")


def _features(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (adm.pool3_like(args.ref, rng, dim=args.dim),
            adm.pool3_like(args.samples, rng, spread=args.spread, noise=args.noise, dim=args.dim))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_pr(args: argparse.Namespace) -> None:
    ref, smp = _features(args)
    print(f"precision/recall: {args.ref} reference x {args.samples} samples x {args.dim} dims, blocks of "
          f"{args.block}, {machine(torch.device('cpu'))}")
    half, t_half = _timed(lambda: precision_recall(ref, smp, block=args.block))
    (p, r, fallbacks), t_ref = _timed(lambda: adm.precision_recall(ref, smp, block=args.block))
    single, t_single = _timed(lambda: precision_recall(ref, smp, block=args.block, distances="float32"))
    print(f"  regscale float16: P {half.precision:.6f} R {half.recall:.6f} ({half.float32_blocks} of "
          f"{half.blocks} blocks in float32) {t_half:.0f} s")
    print(f"  reference float16: P {p:.6f} R {r:.6f} ({fallbacks} blocks in float32) {t_ref:.0f} s; "
          f"|diff| P {abs(half.precision - p):.1e} R {abs(half.recall - r):.1e}")
    print(f"  regscale float32: P {single.precision:.6f} R {single.recall:.6f} {t_single:.0f} s; against "
          f"float16 P {single.precision - half.precision:+.2e} R {single.recall - half.recall:+.2e}")


def _half_sum_cub_like(squares: np.ndarray) -> np.ndarray:
    """Row sums of float16 values in float16: 256 lanes sum their items in sequence, then a tree."""
    n, d = squares.shape
    lanes = squares.reshape(n, 256, d // 256)
    acc = lanes[:, :, 0].copy()
    for i in range(1, lanes.shape[2]):
        acc = acc + lanes[:, :, i]
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc[:, 0]


def float16_distances_half_norms(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The reference's float16 block with TensorFlow-GPU-like half-accumulated squared norms."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u, norm_v = _half_sum_cub_like(np.square(u16)), _half_sum_cub_like(np.square(v16))
        dot = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
        return np.maximum((norm_u[:, None] - np.float16(2) * dot) + norm_v[None, :], np.float16(0))


def bench_pr_sensitivity(args: argparse.Namespace) -> None:
    ref, smp = _features(args)
    print(f"precision/recall sensitivity to the norms' accumulation: {args.ref} x {args.samples} x {args.dim}")
    ours, t_ours = _timed(lambda: precision_recall(ref, smp, block=args.block))
    (p, r, _), t_half = _timed(lambda: adm.precision_recall(ref, smp, block=args.block,
                                                            float16_fn=float16_distances_half_norms))
    print(f"  regscale float16 (float32 sums):        P {ours.precision:.6f} R {ours.recall:.6f} ({t_ours:.0f} s)")
    print(f"  reference, norms summed in float16:     P {p:.6f} R {r:.6f} ({t_half:.0f} s); "
          f"moves P {p - ours.precision:+.2e} R {r - ours.recall:+.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", type=int, default=10_000, help="reference feature vectors (ADM: 10,000)")
    p.add_argument("--samples", type=int, default=50_000, help="sample feature vectors (ADM: 50,000)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--spread", type=float, default=0.95, help="samples' spread on the manifold (reference: 1.0)")
    p.add_argument("--noise", type=float, default=0.075, help="samples' noise (reference: 0.085)")
    p.add_argument("--block", type=int, default=10_000, help="distance block (ADM: 10,000)")
    p.add_argument("--is-counts", type=int, nargs="+", default=[10_000, 12_345])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parts = {"is": bench_is, "pr": bench_pr, "pr-sensitivity": bench_pr_sensitivity}
    p.add_argument("--only", choices=tuple(parts), action="append", help="run only these parts (repeatable)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.only or parts:
        parts[name](args)


if __name__ == "__main__":
    main()
