"""Training-step and sampler throughput of the REG SiT; the real step against the official code.

    .venv/bin/python bench/bench_model.py --size B/2 --batch 4 --threads 2 --official /path/to/REG
    .venv/bin/python bench/bench_model.py --parts model --size XL/2 --batch 32 --precision bf16 fp32 --compile off on
    .venv/bin/python bench/bench_model.py --parts model --size B/2 --batch 4 --threads 2 --precision fp16 bf16

1. step: the real training step, `regscale.train.loop.train` on one process (FSDP engine, MDS data
   stream, random DINOv2-B stand-in, EMA, the per-step agreement), and with --official PATH (a
   checkout of the REG repo; nothing is copied) the official train.py loop body on the same data,
   interleaved step by step in one run (bench/sidebyside.py says how). Prints the median wall and
   process-CPU seconds per step of each and the median ratio of adjacent steps (> 1: regscale is
   faster); on a shared machine the CPU-time ratio is the steadier one.
2. model: the model alone: REG loss forward + backward + AdamW step (+ the frozen DINOv2 forward with
   --encoder), per precision and compile setting, timed after warm-up; images/s and the achieved
   FLOP/s (FLOPs counted once with torch's FlopCounterMode, forward + backward, encoder excluded).
   fp16 is the paper's: autocast(fp16) and a GradScaler (scale, unscale, clip, step, update).
3. sampler: images/s per model call of the SDE sampler, without guidance and with guidance
   everywhere (2x batch in one forward).
Figures are for comparing within one run: say which CPU or GPU and precision they came from.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from sidebyside import device_name, synchronize
from torch import nn

from regscale.config import EncoderConfig, LossConfig
from regscale.metrics import DATA_WAIT_S
from regscale.models import build_model
from regscale.objective import draw, reg_loss
from regscale.sampling import sample


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


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
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op when disabled
    cfg = LossConfig()
    draws = draw(batch, x.shape[1:], dim, cfg.time_sampling, torch.Generator(device=device).manual_seed(0))

    def step() -> None:
        feats = encoder(images) if encoder is not None else tokens
        with autocast(device, precision):
            parts = reg_loss(model, x, y, feats, draws=draws, loss_cfg=cfg, class_dropout_prob=0.1)
        scaler.scale(parts.total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def count_flops() -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, autocast(device, precision):
            reg_loss(model, x, y, tokens, draws=draws, loss_cfg=cfg, class_dropout_prob=0.1).total.backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    return step, count_flops


def bench_step(args, device: torch.device) -> None:
    """The real training step of regscale (and of the official code), interleaved step by step."""
    import sidebyside as sbs

    precision = args.precision[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="regscale-bench-step-"))
    data_root = work / "data"
    mds = sbs.write_dataset(data_root, args.samples, num_classes=10)
    cfg = sbs.bench_config(step_overrides(args, precision, mds))
    official = sbs.OfficialStep(Path(args.official), cfg, device, data_root) if args.official else None
    clock = sbs.StepClock(device, args.warmup, args.steps, between=official)
    sbs.run_train(cfg, work / "run", clock)
    flops = sbs.step_flops(cfg)
    peak = sbs.matmul_flops(2048, DTYPES[precision], device)
    print(f"\n## training step, the real thing: size {args.size} batch {args.batch} {precision} on "
          f"{device_name(device)}, {torch.get_num_threads()} threads, {args.workers} data worker(s), random "
          f"DINOv2-B stand-in; median of {len(clock.step_s)} steps after {args.warmup} warm-up, interleaved")
    print(f"  one step's math: {flops / 1e9:.1f} GFLOP (SiT fwd+bwd + DINOv2 fwd, FlopCounterMode); "
          f"2048^3 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"  {'code':36s} {'s/step':>8s} {'img/s':>8s} {'GFLOP/s':>8s} {'of matmul':>9s} {'CPU s/step':>10s}")
    rows = [("regscale train (1 process)", clock.step_s, clock.step_cpu_s)]
    if official is not None:
        rows.append(("official train.py loop body", clock.between_s, clock.between_cpu_s))
    for name, times, cpu_times in rows:
        seconds = sbs.median(times)
        print(f"  {name:36s} {seconds:8.3f} {args.batch / seconds:8.3f} {flops / seconds / 1e9:8.1f} "
              f"{flops / seconds / peak:9.0%} {sbs.median(cpu_times):10.3f}")
    print(f"  data wait (regscale): {sbs.median(clock.metric(DATA_WAIT_S)[args.warmup:]):.4f} s/step")
    if official is not None:
        wall, cpu = clock.speedups(), clock.speedups(cpu=True)
        print(f"  regscale / official speed: {sbs.median(wall):.2f}x wall, {sbs.median(cpu):.2f}x process CPU "
              f"time (medians of the {len(wall)} adjacent-step ratios)")
        print(f"    per step, wall: {', '.join(f'{r:.2f}' for r in wall)}; CPU: {', '.join(f'{r:.2f}' for r in cpu)}")
        ceiling = sbs.median(clock.between_s) / (flops / peak)
        print(f"    ceiling for this math: {ceiling:.2f}x (the official step's time over the step's FLOPs "
              f"at the 2048^3 matmul rate: nothing but matmuls, all at that rate)")
        print(f"    s/step, wall: ours {', '.join(f'{t:.2f}' for t in clock.step_s)}; "
              f"official {', '.join(f'{t:.2f}' for t in clock.between_s)}", flush=True)


def step_overrides(args, precision: str, data: Path) -> list[str]:
    """The bench's training configuration as `key=value` overrides."""
    arch = {"depth": args.depth, "hidden_size": args.hidden_size, "num_heads": args.num_heads,
            "encoder_depth": args.encoder_depth}
    return [f"model.size={args.size}", "encoder.random_depth=12", f"train.batch_size={args.batch}",
            f"train.precision={precision}", f"data.path={data}", f"data.num_workers={args.workers}",
            f"engine.compile={args.compile[0] == 'on'}",
            *(f"model.{k}={v}" for k, v in arch.items() if v is not None), *args.set]


def bench_training(args, device: torch.device, options: dict) -> None:
    """Every (model, precision, compile) variant timed in interleaved rounds; the best round is printed."""
    encoder = None
    if args.encoder:
        from regscale.models.encoders import load_dinov2

        encoder = load_dinov2(EncoderConfig(random_init=True, random_depth=12), 768).to(device)  # ViT-B/14 cost
    variants = []
    for precision in args.precision:
        for comp in args.compile:
            torch.manual_seed(0)
            model = build_model(args.size, **options).to(device).train()
            step, count_flops = train_step_fn(model, args.batch, device, precision, encoder)
            flops = count_flops()
            if comp == "on":
                model.forward = torch.compile(model.forward)
            for _ in range(args.warmup):  # warm-up (and compilation) outside the timed rounds
                step()
            variants.append(dict(precision=precision, comp=comp, step=step, flops=flops, best=float("inf")))
    for _ in range(args.rounds):
        for v in variants:
            v["best"] = min(v["best"], timed(v["step"], device, 0, args.iters))
    print(f"\n## model alone: size {args.size} {options or ''} batch {args.batch} on {device_name(device)}, "
          f"{torch.get_num_threads()} threads ({'with' if encoder else 'without'} the DINOv2 forward); "
          f"best of {args.rounds} interleaved rounds of {args.iters} steps")
    print(f"  {'precision':9s} {'compile':7s} {'img/s':>9s} {'ms/step':>9s} {'GFLOP/step':>10s} {'TFLOP/s':>8s}")
    for v in variants:
        seconds = v["best"]
        print(f"  {v['precision']:9s} {v['comp']:7s} {args.batch / seconds:9.2f} {seconds * 1e3:9.1f} "
              f"{v['flops'] / 1e9:10.2f} {v['flops'] / seconds / 1e12:8.4f}", flush=True)


@torch.no_grad()
def bench_sampler(args, device: torch.device, options: dict) -> None:
    torch.manual_seed(0)
    model = build_model(args.size, **options).to(device).eval()
    labels = torch.arange(args.sample_batch, device=device) % model.num_classes
    seeds = list(range(args.sample_batch))
    steps = args.sample_steps
    print(f"\n## sampler (SDE, {steps} model calls, batch {args.sample_batch}, {args.precision[0]}): img/s per model call")
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
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--encoder", action="store_true", help="include a (random) ViT-B/14 DINOv2 forward per step")
    p.add_argument("--official", metavar="PATH", help="step: a checkout of the official REG repo, timed beside ours")
    p.add_argument("--parts", nargs="+", default=["step", "model", "sampler"], choices=["step", "model", "sampler"])
    p.add_argument("--steps", type=int, default=6, help="step: measured steps of each side")
    p.add_argument("--samples", type=int, default=64, help="step: images in the generated dataset")
    p.add_argument("--workers", type=int, default=1, help="step: DataLoader workers of each side")
    p.add_argument("--work", help="step: where the dataset and run go (default: a new temp dir)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="step: more regscale config overrides")
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
    print(f"# torch {torch.__version__}, {device_name(device)}, precision {' '.join(args.precision)}")
    if "step" in args.parts:
        bench_step(args, device)
    if "model" in args.parts:
        bench_training(args, device, options)
    if "sampler" in args.parts:
        bench_sampler(args, device, options)


if __name__ == "__main__":
    main()
