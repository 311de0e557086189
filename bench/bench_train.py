"""Training benchmarks: prints figures, asserts nothing.

1. throughput and MFU per engine and precision, smoke-to-S/2 sizes (2 processes, gloo on CPU,
   NCCL on GPUs; MFU needs a known device peak or --peak FLOP/s per process);
2. the stall a checkpoint save costs the loop, async (FSDP + DCP async_save) against blocking;
3. time from process start to the first resumed step.

    .venv/bin/python bench/bench_train.py                      # everything, CPU-sized
    .venv/bin/python bench/bench_train.py --sizes S/2 --engines fsdp --precisions bf16 --nproc 8

Each figure comes from the run's own metrics.jsonl (the last logged window, after warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from regscale.metrics import CKPT_STALL_S, FIRST_STEP_S, IMAGES_PER_S, MFU, STEP_S
from regscale.rundir import CHECKPOINTS, METRICS

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"

SIZES = {  # SiT architecture overrides on top of the smoke recipe
    "smoke": [],
    "tiny": ["model.depth=6", "model.hidden_size=192", "model.num_heads=3", "model.encoder_depth=2"],
    "S/2": ["model.depth=12", "model.hidden_size=384", "model.num_heads=6", "model.encoder_depth=4",
            "model.projector_dim=2048"],
}
ENGINES = {"fsdp": ["engine.kind=fsdp"],
           "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(run_dir: Path, data: Path, overrides: list[str], nproc: int, peak: float | None) -> float:
    """One `regscale train` launch; returns its wall time."""
    threads = max(1, (os.cpu_count() or 2) // nproc)  # the loop pins this many intra-op threads
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(nproc),
           "--master-port", str(_port()), "-m", "regscale.cli", "train", "--no-track", str(SMOKE),
           f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.path={data}",
           f"slurm.cpus_per_task={threads}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/regscale/torch_extensions"))
    if peak:
        env["REGSCALE_PEAK_FLOPS"] = str(peak)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(overrides)}):\n{done.stderr[-3000:]}")
    return time.time() - t0


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def throughput(args: argparse.Namespace, work: Path) -> None:
    from regscale.config import load_config
    from regscale.train.health import train_flops_per_image

    print(f"\n## throughput ({args.nproc} processes, global batch {args.batch}, last "
          f"{args.steps // 2} of {args.steps} steps)")
    print(f"{'size':6} {'engine':6} {'prec':5} {'img/s':>8} {'s/step':>7} {'GFLOP/img':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6}")
    for size in args.sizes:
        for engine in args.engines:
            for precision in args.precisions:
                over = SIZES[size] + ENGINES[engine] + [
                    f"train.precision={precision}", f"train.max_steps={args.steps}",
                    f"train.log_every={args.steps // 2}", f"train.ckpt_every={10 * args.steps}",
                    f"train.batch_size={args.batch}", f"data.num_workers={args.workers}"]
                name = f"tp-{size.replace('/', '')}-{engine}-{precision}"
                shutil.rmtree(work / name, ignore_errors=True)
                run(work / name, args.data, over, args.nproc, args.peak)
                last = [r for r in rows(work / name) if IMAGES_PER_S in r][-1]
                cfg = load_config(SMOKE, over + [f"data.path={args.data}"])
                flops = train_flops_per_image(cfg)
                tflops = last[IMAGES_PER_S] * flops / 1e12
                mfu = f"{100 * last[MFU]:.1f}%" if MFU in last else "n/a"
                print(f"{size:6} {engine:6} {precision:5} {last[IMAGES_PER_S]:8.2f} "
                      f"{last[STEP_S]:7.3f} {flops / 1e9:10.2f} {tflops:8.4f} {mfu:>6}", flush=True)


def checkpoint_stall(args: argparse.Namespace, work: Path) -> None:
    print(f"\n## checkpoint save stall ({args.stall_size}, fp32; save every 2 steps; mean over saves "
          "but the final, always blocking, one)")
    print(f"{'engine':6} {'mode':9} {'stall s':>8} {'saves':>5} {'ckpt MB':>8}")
    for engine, mode in (("fsdp", "async"), ("fsdp", "blocking"), ("zero2", "blocking")):
        name = f"stall-{engine}-{mode}"
        shutil.rmtree(work / name, ignore_errors=True)
        over = SIZES[args.stall_size] + ENGINES[engine] + [
            "train.max_steps=9", "train.ckpt_every=2", "train.log_every=3", "train.keep_last=1",
            f"engine.async_checkpoint={mode == 'async'}", f"data.num_workers={args.workers}"]
        run(work / name, args.data, over, args.nproc, args.peak)
        stalls = [r[CKPT_STALL_S] for r in rows(work / name) if CKPT_STALL_S in r][:-1]
        manifest = json.loads((work / name / CHECKPOINTS / "step_00000009" / "manifest.json").read_text())
        print(f"{engine:6} {mode:9} {sum(stalls) / len(stalls):8.3f} {len(stalls):5d} "
              f"{manifest['total_bytes'] / 1e6:8.1f}", flush=True)


def first_resumed_step(args: argparse.Namespace, work: Path) -> None:
    print(f"\n## process start -> first resumed step ({args.stall_size}, includes imports, process "
          "group, model/encoder build, checkpoint verification + load, data stream restore)")
    print(f"{'engine':6} {'first step s':>12} {'launch wall s':>13}")
    for engine in args.engines:
        name = f"resume-{engine}"
        shutil.rmtree(work / name, ignore_errors=True)
        over = SIZES[args.stall_size] + ENGINES[engine] + [
            "train.ckpt_every=2", "train.log_every=1", f"data.num_workers={args.workers}"]
        run(work / name, args.data, over + ["train.max_steps=2"], args.nproc, args.peak)
        wall = run(work / name, args.data, over + ["train.max_steps=3"], args.nproc, args.peak)
        first = [r[FIRST_STEP_S] for r in rows(work / name) if FIRST_STEP_S in r][-1]
        print(f"{engine:6} {first:12.1f} {wall:13.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["smoke", "tiny", "S/2"], choices=list(SIZES))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--peak", type=float, default=None, help="device peak FLOP/s (for MFU on CPU)")
    parser.add_argument("--stall-size", default="S/2", choices=list(SIZES))
    parser.add_argument("--parts", nargs="+", default=["throughput", "stall", "resume"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/regscale-bench-train"))
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        from regscale.config import load_config
        from regscale.data.synthetic import ensure_synthetic_dataset

        args.data = args.work / "data"
        smoke = load_config(SMOKE, [f"data.path={args.data}"])
        ensure_synthetic_dataset(smoke.data, smoke.model.num_classes)
    import torch

    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    if "throughput" in args.parts:
        throughput(args, args.work)
    if "stall" in args.parts:
        checkpoint_stall(args, args.work)
    if "resume" in args.parts:
        first_resumed_step(args, args.work)


if __name__ == "__main__":
    main()
