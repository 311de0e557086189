"""Training-step and sampler throughput of the REG SiT.

    .venv/bin/python bench/bench_model.py --size XL/2 --batch 32 --precision bf16 fp32 --compile off on
    .venv/bin/python bench/bench_model.py --size S/2 --batch 8 --official /path/to/REG   # vs upstream

Training step = REG loss forward + backward + AdamW step (+ the frozen DINOv2 forward with
--encoder), timed after warm-up; prints images/s and the achieved FLOP/s (FLOPs counted once with
torch's FlopCounterMode, forward + backward, encoder excluded). Sampler: images/s per model call
of the SDE sampler, without guidance and with guidance everywhere (2x batch in one forward).
With --official PATH (a checkout of the REG repo; nothing is copied), the same step is timed on
upstream's `SiT` as the reference, with the same objective code around it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Callable

import torch
from torch import nn

from regscale.config import EncoderConfig, LossConfig
from regscale.models import build_model
from regscale.objective import draw, reg_loss
from regscale.sampling import sample


class Upstream(nn.Module):
    """Upstream REG's SiT behind our call signature (for timing only)."""

    def __init__(self, module: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.module, self.num_classes = module, num_classes

    def forward(self, x, t, y, cls_t):
        return self.module(x, t, y, cls_token=cls_t)


def upstream_model(path: str, size: str, options: dict) -> nn.Module:
    """Upstream's `SiT` (from the checkout at `path`) with our resolved architecture."""
    from regscale.models.build import model_config

    sys.path.insert(0, path)
    from models.sit import SiT as UpstreamSiT  # upstream's module, from the given checkout

    cfg = model_config(size, **options)
    arch = cfg.resolved()
    model = UpstreamSiT(depth=arch["depth"], hidden_size=arch["hidden_size"], decoder_hidden_size=arch["hidden_size"],
                        num_heads=arch["num_heads"], patch_size=arch["patch_size"], encoder_depth=arch["encoder_depth"],
                        num_classes=cfg.num_classes, z_dims=[cfg.cls_token_dim], projector_dim=cfg.projector_dim,
                        qk_norm=False, fused_attn=cfg.fused_attn)
    model.train()  # upstream drops labels inside forward when training; same cost
    return Upstream(model, cfg.num_classes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def train_step_fn(model: nn.Module, batch: int, device: torch.device, precision: str, encoder=None):
    """Closures: one full training step on fixed random data, and its FLOP count (fwd + bwd)."""
    side, dim = getattr(model, "input_size", 32), getattr(model, "cls_token_dim", 768)
    x = torch.randn(batch, 4, side, side, device=device)
    y = torch.randint(0, 1000, (batch,), device=device) % model.num_classes
    tokens = torch.randn(batch, 1 + (side // 2) ** 2, dim, device=device)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            fused=device.type == "cuda")
    cfg = LossConfig()
    draws = draw(batch, x.shape[1:], dim, cfg.time_sampling, torch.Generator(device=device).manual_seed(0))

    def step() -> None:
        feats = encoder(images) if encoder is not None else tokens
        with autocast(device, precision):
            parts = reg_loss(model, x, y, feats, draws=draws, loss_cfg=cfg, class_dropout_prob=0.1)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def count_flops() -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, autocast(device, precision):
            reg_loss(model, x, y, tokens, draws=draws, loss_cfg=cfg, class_dropout_prob=0.1).total.backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    return step, count_flops


def bench_training(args, device: torch.device, options: dict) -> None:
    """Every (model, precision, compile) variant timed in interleaved rounds; the best round is printed."""
    encoder = None
    if args.encoder:
        from regscale.models.encoders import load_dinov2

        encoder = load_dinov2(EncoderConfig(random_init=True, random_depth=12), 768).to(device)  # ViT-B/14 cost
    makers = [("regscale", lambda: build_model(args.size, **options))]
    if args.official:
        makers.append(("upstream", lambda: upstream_model(args.official, args.size, options)))
    variants = []
    for name, make in makers:
        for precision in args.precision:
            for comp in args.compile:
                torch.manual_seed(0)
                model = make().to(device).train()
                step, count_flops = train_step_fn(model, args.batch, device, precision, encoder)
                flops = count_flops()
                if comp == "on":
                    model.forward = torch.compile(model.forward)
                for _ in range(args.warmup):  # warm-up (and compilation) outside the timed rounds
                    step()
                variants.append(dict(name=name, precision=precision, comp=comp, step=step, flops=flops, best=float("inf")))
    for _ in range(args.rounds):
        for v in variants:
            v["best"] = min(v["best"], timed(v["step"], device, 0, args.iters))
    print(f"training step: size {args.size} {options or ''} batch {args.batch} on {device}, "
          f"{torch.get_num_threads()} threads ({'with' if encoder else 'without'} the DINOv2 forward); "
          f"best of {args.rounds} interleaved rounds of {args.iters} steps")
    print(f"  {'model':9s} {'precision':9s} {'compile':7s} {'img/s':>9s} {'ms/step':>9s} {'GFLOP/step':>10s} {'TFLOP/s':>8s}")
    for v in variants:
        seconds = v["best"]
        print(f"  {v['name']:9s} {v['precision']:9s} {v['comp']:7s} {args.batch / seconds:9.2f} {seconds * 1e3:9.1f} "
              f"{v['flops'] / 1e9:10.2f} {v['flops'] / seconds / 1e12:8.4f}", flush=True)


@torch.no_grad()
def bench_sampler(args, device: torch.device, options: dict) -> None:
    torch.manual_seed(0)
    model = build_model(args.size, **options).to(device).eval()
    labels = torch.arange(args.sample_batch, device=device) % model.num_classes
    seeds = list(range(args.sample_batch))
    steps = args.sample_steps
    print(f"sampler (SDE, {steps} model calls, batch {args.sample_batch}, {args.precision[0]}): img/s per model call")
    for label, kw in (("no guidance", {}), ("cfg in whole interval", dict(cfg_scale=2.3, cls_cfg_scale=2.3))):
        def run() -> None:
            with autocast(device, args.precision[0]):
                sample(model, labels, seeds, steps=steps, **kw)

        seconds = timed(run, device, 1, 1)
        per_call = seconds / steps
        print(f"  {label:22s} {args.sample_batch / per_call:9.2f} img/s/call  ({per_call * 1e3:.1f} ms per call, "
              f"{args.sample_batch / seconds:.3f} img/s for {steps} steps)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="S/2")
    p.add_argument("--depth", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--encoder-depth", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--encoder", action="store_true", help="include a (random) ViT-B/14 DINOv2 forward per step")
    p.add_argument("--official", metavar="PATH", help="a checkout of the official REG repo to time as reference")
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    options = {k: v for k, v in dict(depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads,
                                     encoder_depth=args.encoder_depth).items() if v is not None}
    bench_training(args, device, options)
    bench_sampler(args, device, options)


if __name__ == "__main__":
    main()
