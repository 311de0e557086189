"""Cost of the per-sample training draws (regscale.train.noise) on the host: prints figures.

    .venv/bin/python bench/bench_noise.py                # XL/2 shapes (latents 4x32x32, class token 768)
    .venv/bin/python bench/bench_noise.py --batch 8 --cls-dim 64

Each micro-batch's draws (posterior noise, label-dropout coin, t, image noise, class-token noise)
come from one CPU generator per sample; compared, within this run, with one CPU generator for the
whole micro-batch (the per-rank derivation it replaced). On a GPU the per-sample draws add no
kernel launches: they reach the device in one non-blocking copy per tensor.
"""

from __future__ import annotations

import argparse
import time

import torch

from machine import cpu_name
from regscale.objective import draw
from regscale.train.noise import SampleNoise


def timed(fn, iters: int) -> float:
    """Process CPU seconds per call (on a shared machine the wall clock measures the neighbours)."""
    fn()  # warm-up
    t0 = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - t0) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (samples per rank per micro-step)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 at 256 px)")
    parser.add_argument("--cls-dim", type=int, default=768)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (4, args.latent, args.latent)
    indices = torch.arange(args.batch) * 7919
    noise = SampleNoise(0, args.cls_dim, "uniform", torch.device("cpu"))

    def per_sample() -> None:
        noise(3, indices, shape)

    def per_batch() -> None:
        g = torch.Generator().manual_seed(3)
        torch.randn((args.batch, *shape), generator=g)
        draw(args.batch, shape, args.cls_dim, "uniform", g)

    a, b = timed(per_sample, args.iters), timed(per_batch, args.iters)
    print(f"CPU: {cpu_name()}, {args.threads} thread(s), float32, process CPU time; "
          f"micro-batch {args.batch}, latents {shape}, class token {args.cls_dim}")
    print(f"one generator per sample:      {1e3 * a:8.3f} ms / micro-batch ({1e6 * a / args.batch:7.1f} us / sample)")
    print(f"one generator per micro-batch: {1e3 * b:8.3f} ms / micro-batch")
    print(f"ratio per-sample / per-batch:  {a / b:8.2f}")


if __name__ == "__main__":
    main()
