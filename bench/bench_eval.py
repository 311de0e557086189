"""Evaluation throughput: the sampler against the official loop, and Inception feature extraction.

    .venv/bin/python bench/bench_eval.py                       # CPU-sized defaults
    .venv/bin/python bench/bench_eval.py --size S/2 --batch 64 --device cuda

1. Sampler, the paper's setting (Euler-Maruyama SDE, 250 steps, cfg 2.3 on image and class token,
   guidance interval [0, 0.85]), on a small REG SiT: `regscale.sampling.sample`, which runs the
   unconditional branch only inside the guidance interval, against a straightforward
   reimplementation of the official loop, which doubles the batch (cond + uncond) at every step
   and throws the unconditional half away outside the interval. Same model, same noise, one run.
2. Inception features (pool3 + mixed_6/conv + logits, the TF-ported network) in images/s.
Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch


def official_loop(model, labels: torch.Tensor, seeds: Sequence[int], *, steps: int, cfg_scale: float,
                  cls_cfg_scale: float, guidance_low: float, guidance_high: float) -> torch.Tensor:
    """The upstream Euler-Maruyama loop as written there: 2B forward every step, CFG mixing only
    inside the interval. Per-sample noise as ours, so the two can be compared sample by sample."""
    device, dtype = labels.device, next(model.parameters()).dtype
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def noise(*shape):
        return torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float64) for g in gens])

    x = noise(model.in_channels, model.input_size, model.input_size)
    cls = noise(model.cls_token_dim)
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    grid = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]).tolist()
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        last = i == len(grid) - 2
        time_in = torch.full((2 * len(labels),), t, device=device, dtype=dtype)
        v, _, v_cls = model(torch.cat([x, x]).to(dtype), time_in, y, torch.cat([cls, cls]).to(dtype))
        v_c, v_u = v.double().chunk(2)
        c_c, c_u = v_cls.double().chunk(2)
        if guidance_low <= t <= guidance_high:
            v, v_cls = v_u + cfg_scale * (v_c - v_u), c_u + cls_cfg_scale * (c_c - c_u)
        else:
            v, v_cls = v_c, c_c
        s, s_cls = -((1 - t) * v + x) / t, -((1 - t) * v_cls + cls) / t
        d, d_cls = v - t * s, v_cls - t * s_cls
        dt = t_next - t
        x, cls = x + d * dt, cls + d_cls * dt
        if not last:
            w = (2.0 * t * abs(dt)) ** 0.5
            x, cls = x + w * noise(*x.shape[1:]), cls + w * noise(*cls.shape[1:])
    return x.float()


def _timed(fn, device: torch.device) -> tuple[float, object]:
    """Seconds: wall clock on GPU; process CPU time on CPU (a shared CPU box's wall clock measures
    the neighbours; run with --threads 1 so CPU time is the work done)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start, out


def bench_sampler(args: argparse.Namespace, device: torch.device) -> None:
    from regscale.models import build_model
    from regscale.sampling import sample

    options = {} if args.size != "smoke" else dict(depth=4, hidden_size=64, num_heads=2, encoder_depth=2,
                                                    projector_dim=128)
    model = build_model("S/2" if args.size == "smoke" else args.size, **options).to(device).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-zero heads: the init zeroes them
            p.add_(torch.randn_like(p) * 0.02)
    setting = dict(steps=args.steps, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85)
    labels = torch.arange(args.batch, device=device) % model.num_classes
    seeds = list(range(args.batch))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"sampler: {args.size} ({params:.1f}M params), batch {args.batch}, {args.steps} SDE steps, "
          f"cfg 2.3 / cls 2.3, guidance [0, 0.85], {device}")
    with torch.no_grad():
        sample(model, labels[:2], seeds[:2], sampler="sde", **{**setting, "steps": 3})  # warm-up
        runs = {"official loop (2B every step)": lambda: official_loop(model, labels, seeds, **setting),
                "regscale.sampling.sample": lambda: sample(model, labels, seeds, sampler="sde", **setting)[0]}
        results = {name: [0.0, None] for name in runs}
        for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
            for name, fn in runs.items():
                seconds, out = _timed(fn, device)
                results[name][0] += seconds
                results[name][1] = out
        for name, (seconds, _) in results.items():
            n = args.batch * args.repeats
            print(f"  {name:<32} {n / seconds:8.2f} images/s  ({seconds:.1f} s for {n})")
    (t_off, x_off), (t_ours, x_ours) = results.values()
    print(f"  speed-up {t_off / t_ours:.2f}x; max |latent difference| {(x_off - x_ours).abs().max().item():.2e} "
          f"(same math; float rounding of the 2B vs B forward outside the interval)")


def bench_inception(args: argparse.Namespace, device: torch.device) -> None:
    from regscale.eval.inception import load_inception

    net = load_inception(random_init=True, device=device)  # same network and cost as the real weights
    x = torch.randint(0, 256, (args.inception_batch, 3, 256, 256), dtype=torch.uint8, device=device)
    net(x)  # warm-up
    seconds, _ = _timed(lambda: [net(x) for _ in range(args.inception_iters)], device)
    n = args.inception_batch * args.inception_iters
    print(f"inception: batch {args.inception_batch} of 256x256 uint8 -> pool3 + mixed_6/conv + logits, "
          f"{device}: {n / seconds:.2f} images/s ({seconds:.1f} s for {n})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="smoke", help="smoke (the smoke recipe's tiny SiT) or S/2, B/2, L/2, XL/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each sampler")
    p.add_argument("--inception-batch", type=int, default=16)
    p.add_argument("--inception-iters", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--skip", choices=("sampler", "inception"), help="leave one benchmark out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.skip != "sampler":
        bench_sampler(args, device)
    if args.skip != "inception":
        bench_inception(args, device)


if __name__ == "__main__":
    main()
