"""Evaluation throughput: the sampler against the official loop, its precision and compile
settings, Inception feature extraction, and the XL/2 50K evaluation cost on paper.

    .venv/bin/python bench/bench_eval.py --threads 2           # CPU-sized defaults
    .venv/bin/python bench/bench_eval.py --size S/2 --batch 64 --device cuda
    .venv/bin/python bench/bench_eval.py --only estimate        # the paper estimate alone (instant)

1. Sampler, the paper's setting (Euler-Maruyama SDE, 250 steps, cfg 2.3 on image and class token,
   guidance interval [0, 0.85]), on a small REG SiT: `regscale.sampling.sample`, which runs the
   unconditional branch only inside the guidance interval, against a straightforward
   reimplementation of the official loop, which doubles the batch (cond + uncond) at every step
   and throws the unconditional half away outside the interval. Same model, same noise, one run.
2. `eval.precision` (fp32, published | bf16 autocast) x `eval.compile` (eager | torch.compile),
   interleaved in one run, as images/s and ratios to fp32 eager, plus each one's largest latent
   difference from fp32 eager. The CPU, its bf16 instructions and a measured bf16/fp32 matmul
   ratio are printed: without AVX512-BF16/AMX (an AMD EPYC without AVX-512) a bf16 matmul is ~100x
   slower than fp32, with them (Zen 4 EPYC) ~4x faster; CPU figures say nothing about GPUs.
3. Inception features (pool3 + mixed_6/conv + logits, the TF-ported network) in images/s.
4. On paper, the published XL/2 evaluation: 50K samples x 250 SDE steps, cfg on t <= 0.85.
   Counted with torch.utils.flop_counter on the meta device: 242 GFLOP per image forward of
   REG SiT-XL/2 (257 tokens, 28 blocks, projector included), 250 calls of which 211 guided (a
   doubled batch), so 461 image-forwards per sample, 5.6e18 FLOP for 50K (+0.6% SD-VAE decoding,
   Inception negligible). An H100 SXM's dense bf16 peak (989 TFLOP/s) does that in 1.58 h at 100%
   MFU; 2 H100-hours need 79% MFU. At a realistic 40-50% bf16 MFU it is 3.2-3.9 H100-hours, and
   the published fp32 (TF32 tensor cores, 495 TFLOP/s peak) 6.3-7.9 h: the 2-hour goal does not
   fit the published protocol on paper; only lower-precision arithmetic (FP8: 1979 TFLOP/s, ~2 h
   at 40% MFU) or another protocol (fewer steps, a narrower guidance interval) would.
Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

H100_PEAK_TFLOPS = {"bf16": 989.4, "tf32": 494.7, "fp8": 1978.9}  # H100 SXM, dense tensor-core peaks
SD_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)


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
    from regscale.sampling import sample

    model = _bench_model(args, device)
    setting = dict(steps=args.steps, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0, guidance_high=0.85)
    labels = torch.arange(args.batch, device=device) % model.num_classes
    seeds = list(range(args.batch))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"sampler: {args.size} ({params:.1f}M params), batch {args.batch}, {args.steps} SDE steps, "
          f"cfg 2.3 / cls 2.3, guidance [0, 0.85], fp32, {machine(device)}")
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


def _matmul_gflops(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    a = torch.randn(512, 512, device=device).to(dtype)
    a @ a
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 512**3 * n / (time.perf_counter() - start) / 1e9


def machine(device: torch.device) -> str:
    """The device in words; on CPU its model, threads, bf16 instructions and the measured speed of a
    bf16 matmul against fp32 (CPUs here differ: from ~4x faster to ~100x slower)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16_flags = sorted({"avx512_bf16", "amx_bf16"} & flags) or ["no AVX512-BF16/AMX"]
    ratio = _matmul_gflops(torch.bfloat16, device) / _matmul_gflops(torch.float32, device)
    return (f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, {'/'.join(bf16_flags)}: "
            f"a 512^3 bf16 matmul runs at {ratio:.2f}x fp32 here")


def bench_precision_compile(args: argparse.Namespace, device: torch.device) -> None:
    """eval.precision x eval.compile, interleaved; compile time reported apart from throughput."""
    from regscale.sampling import compile_for_sampling, sample

    model = _bench_model(args, device)
    setting = dict(sampler="sde", steps=args.steps, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_low=0.0,
                   guidance_high=0.85)
    labels = torch.arange(args.batch, device=device) % model.num_classes
    seeds = list(range(args.batch))
    print(f"precision x compile: {args.size}, batch {args.batch}, {args.steps} SDE steps, cfg 2.3 on "
          f"[0, 0.85], {machine(device)}")
    compiled = compile_for_sampling(model)
    variants = {(precision, name): (net, precision) for name, net in (("eager", model), ("compiled", compiled))
                for precision in ("fp32", "bf16")}
    for (precision, name), (net, _) in variants.items():  # warm-up: both batch shapes, compile included
        seconds, _ = _timed(lambda: sample(net, labels, seeds, **{**setting, "steps": 3}, precision=precision), device)
        if name == "compiled":
            print(f"  warm-up of {precision} {name}: {seconds:.1f} s (compilation of 2 graphs, once per process)")
    results = {key: [0.0, None] for key in variants}
    for _ in range(args.repeats):
        for key, (net, precision) in variants.items():
            seconds, out = _timed(lambda: sample(net, labels, seeds, **setting, precision=precision)[0], device)
            results[key][0] += seconds
            results[key][1] = out
    base_s, base_x = results[("fp32", "eager")]
    n = args.batch * args.repeats
    for (precision, name), (seconds, x) in results.items():
        print(f"  {precision} {name:<9} {n / seconds:8.2f} images/s  {base_s / seconds:6.2f}x fp32 eager  "
              f"max |latent - fp32 eager| {(x - base_x).abs().max().item():.2e}")
    if device.type == "cpu":
        print("  (CPU figures: compare within this run only; they predict nothing about a GPU's bf16)")


def xl2_estimate(samples: int = 50_000, steps: int = 250, guidance: tuple[float, float] = (0.0, 0.85)) -> None:
    """FLOPs of the published XL/2 evaluation, counted on the meta device, against H100 peaks."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from regscale.models import build_model
    from regscale.sampling import sde_time_grid

    with torch.device("meta"):
        model = build_model("XL/2")
        inputs = (torch.randn(1, model.in_channels, model.input_size, model.input_size), torch.rand(1),
                  torch.zeros(1, dtype=torch.long), torch.randn(1, model.cls_token_dim))
        with FlopCounterMode(display=False) as model_count:
            model(*inputs)
        vae = AutoencoderKL(in_channels=3, out_channels=3, **SD_VAE)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(torch.randn(1, 4, 32, 32))
    times = sde_time_grid(steps)[:-1].tolist()
    guided = sum(guidance[0] <= t <= guidance[1] for t in times)
    forwards = len(times) + guided
    per_forward, per_decode = model_count.get_total_flops(), vae_count.get_total_flops()
    total = samples * (forwards * per_forward + per_decode)
    print(f"XL/2 evaluation on paper: {samples} samples x {len(times)} SDE calls ({guided} guided on "
          f"t in [{guidance[0]}, {guidance[1]}]: doubled batch) = {forwards} image-forwards per sample")
    print(f"  REG SiT-XL/2 forward {per_forward / 1e9:.1f} GFLOP/image (flop_counter, meta device); "
          f"SD-VAE decode {per_decode / 1e9:.0f} GFLOP/image ({per_decode / (forwards * per_forward):.1%} of "
          f"sampling); total {total:.2e} FLOP")
    for precision, peak in H100_PEAK_TFLOPS.items():
        hours = {mfu: total / (peak * 1e12 * mfu) / 3600 for mfu in (1.0, 0.5, 0.4)}
        need = total / (2 * 3600) / (peak * 1e12)
        print(f"  H100 {precision:<4} dense peak {peak:6.1f} TFLOP/s: "
              + ", ".join(f"{h:.2f} h at {m:.0%} MFU" for m, h in hours.items())
              + f"; under 2 H100-hours needs {need:.0%} MFU")
    print("  published precision is fp32 (TF32 matmuls on GPU); bf16 and fp8 change the samples")


def _bench_model(args: argparse.Namespace, device: torch.device):
    """A REG SiT of --size with non-zero weights (the init zeroes the heads), eval mode."""
    from regscale.models import build_model

    options = {} if args.size != "smoke" else dict(depth=4, hidden_size=64, num_heads=2, encoder_depth=2,
                                                    projector_dim=128)
    model = build_model("S/2" if args.size == "smoke" else args.size, **options).to(device).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def bench_inception(args: argparse.Namespace, device: torch.device) -> None:
    from regscale.eval.inception import load_inception

    net = load_inception(random_init=True, device=device)  # same network and cost as the real weights
    x = torch.randint(0, 256, (args.inception_batch, 3, 256, 256), dtype=torch.uint8, device=device)
    net(x)  # warm-up
    seconds, _ = _timed(lambda: [net(x) for _ in range(args.inception_iters)], device)
    n = args.inception_batch * args.inception_iters
    print(f"inception: batch {args.inception_batch} of 256x256 uint8 -> pool3 + mixed_6/conv + logits, fp32, "
          f"{machine(device)}: {n / seconds:.2f} images/s ({seconds:.1f} s for {n})")


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
    parts = {"sampler": bench_sampler, "precision": bench_precision_compile, "inception": bench_inception,
             "estimate": lambda args, device: xl2_estimate()}
    p.add_argument("--only", choices=tuple(parts), action="append", help="run only these parts (repeatable)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.only or parts:
        parts[name](args, device)


if __name__ == "__main__":
    main()
