"""Checkpoint costs at a real model size: prints figures, asserts nothing.

One process, the real engines (FSDP2 + DCP, DeepSpeed ZeRO-2) and the real Checkpointer, with an
AdamW state after one real step, so the saved state is fp32 weights + 2 moments + EMA (10.8 GB
for SiT-XL/2). The "training" between saves is a sleep of --step-s (a GPU computing, the CPU
free); per save it prints:

    loop stall      what the loop waited for (ckpt/stall_s), the sum of:
      call            the save call (state dicts, the engine's synchronous part)
      copy            the wait, before the next optimizer step, for the copy to host memory
      publish         the gathering of the file tables and rank 0's manifest/rename/retention
                    (blocking saves: everything is in the call)
    save            from the save's start to its publication
    verify on start the newest-checkpoint verification a start does (this rank's share)
    sha256 on rank 0  what the publication cost before, when rank 0 hashed every file inside the
                    per-step agreement (for comparison, on the same files)

--ranks N holds the share of one rank of an N-rank job (the SiT's blocks cut to 1/N): an async
save keeps a host copy of the state, so one process with the whole XL/2 state needs ~22 GB. On one
process the fsdp engine holds plain tensors instead of DTensor shards: the same bytes through the
same DCP stager and writer.
Each engine and mode runs in a fresh process.

    .venv/bin/python bench/bench_checkpoint.py --size XL/2 --ranks 4
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return (f"{name}, {os.cpu_count()} cores, AVX-512 {'yes' if 'avx512f' in flags else 'no'}, "
            f"SHA-NI {'yes' if ' sha_ni' in flags else 'no'}; torch {torch.__version__}, fp32")


def hash_speeds() -> str:
    block = os.urandom(1 << 28)
    out = []
    for name, fn in (("xxh3-128", xxhash.xxh3_128), ("sha256", hashlib.sha256)):
        t0 = time.perf_counter()
        fn(block).hexdigest()
        out.append(f"{name} {len(block) / (time.perf_counter() - t0) / 1e9:.2f} GB/s")
    return ", ".join(out)


def build(kind: str, size: str, ranks: int, asynchronous: bool, run_dir: Path):
    """(engine, checkpointer, state bytes) for one rank's share of `size` after one AdamW step."""
    from regscale import dist
    from regscale.config import MODEL_SIZES, BatchPlan, EngineConfig, LossConfig, TrainConfig
    from regscale.engine import build_engine
    from regscale.models import build_model
    from regscale.objective import draw, reg_loss
    from regscale.train.checkpoint import Checkpointer

    env = dist.setup()
    depth = max(1, math.ceil(MODEL_SIZES[size]["depth"] / ranks))
    torch.manual_seed(0)
    model = build_model(size, depth=depth, encoder_depth=min(depth, MODEL_SIZES[size]["encoder_depth"]))
    engine_cfg = EngineConfig(kind=kind, zero_stage=2, async_checkpoint=asynchronous)
    train_cfg = TrainConfig(batch_size=1, precision="fp32")
    engine = build_engine(engine_cfg, train_cfg, model, env, BatchPlan(1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)  # one real step: creates the Adam moments
    x = torch.randn(1, 4, 32, 32)
    tokens = torch.randn(1, 257, 768)
    draws = draw(1, x.shape[1:], tokens.shape[-1], "uniform", g)
    parts = reg_loss(engine.module, x, torch.tensor([1]), tokens, draws=draws, loss_cfg=LossConfig(),
                     class_dropout_prob=0.0)
    engine.backward(parts.total, last_micro=True, accumulation=1)
    engine.step(1e-4)
    engine.update_ema(0.9999)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt = Checkpointer(run_dir, engine, env, keep_last=1, keep_every=0, asynchronous=asynchronous)
    ckpt.prepare()
    return engine, ckpt, params * 4 * 4


def measure(kind: str, mode: str, args: argparse.Namespace, root: Path) -> str:
    from regscale import dist

    run_dir = root / f"{kind}-{mode}"
    engine, ckpt, state_bytes = build(kind, args.size, args.ranks, mode == "async", run_dir)
    manifest = {"step": 0, "images": 0}
    stalls, calls, copies, publishes, saves = [], [], [], [], []
    try:
        for step in range(1, args.saves + 1):
            manifest = dict(manifest, step=step)
            t0 = time.perf_counter()
            done = ckpt.save(step, lambda: dict(manifest), blocking=mode == "blocking")
            calls.append(time.perf_counter() - t0)
            copies.append(0.0)
            publishes.append(0.0)
            while done is None:  # the loop: compute, copy done before the optimizer step, agree
                time.sleep(args.step_s)
                t0 = time.perf_counter()
                ckpt.wait_staged()
                copies[-1] += time.perf_counter() - t0
                writing, failed = dist.all_max(ckpt.flags())
                t0 = time.perf_counter()
                done = ckpt.agreed(writing, failed)
                publishes[-1] += time.perf_counter() - t0
            stalls.append(done.stall_s)
            saves.append(done.save_s)
        t0 = time.perf_counter()
        found = ckpt.newest_valid(at_start=True)
        verify_s = time.perf_counter() - t0
        files = [found[0] / rel for rel in found[1]["files"]]
        t0 = time.perf_counter()
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 23), b""):
                    h.update(chunk)
        sha_s = time.perf_counter() - t0
        on_disk = found[1]["total_bytes"]
    finally:
        ckpt.close()
        dist.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (f"{kind:9} {mode:8} {state_bytes / 1e9:8.2f} {on_disk / 1e9:7.2f} {mean(stalls):7.2f} "
            f"{mean(calls):6.2f} {mean(copies):6.2f} {mean(publishes):7.2f} {mean(saves):6.2f} "
            f"{verify_s:8.2f} {sha_s:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="XL/2", choices=["S/2", "B/2", "L/2", "XL/2"])
    parser.add_argument("--ranks", type=int, default=1, help="hold one rank's share of an N-rank job")
    parser.add_argument("--engines", nargs="+", default=["fsdp", "deepspeed"], choices=["fsdp", "deepspeed"])
    parser.add_argument("--modes", nargs="+", default=["async", "blocking"], choices=["async", "blocking"])
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=1.0, help="simulated step time between agreements")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--one", nargs=3, metavar=("ENGINE", "MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        os.environ.pop(var, None)
    if args.one:  # the child process of one measurement
        print(measure(args.one[0], args.one[1], args, Path(args.one[2])), flush=True)
        return
    print(f"# bench_checkpoint: {cpu_line()}")
    print(f"# SiT-{args.size}, the share of 1 rank of {args.ranks}; {args.saves} saves, a simulated "
          f"{args.step_s:.1f} s step between agreements; hashing: {hash_speeds()}")
    print(f"{'engine':9} {'mode':8} {'state GB':>8} {'disk GB':>7} {'stall s':>7} {'call s':>6} "
          f"{'copy s':>6} {'publish':>7} {'save s':>6} {'verify s':>8} {'sha256 s':>8}")
    root = Path(tempfile.mkdtemp(prefix="regscale-bench-ckpt-", dir=args.dir))
    try:
        for kind in args.engines:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--size", args.size, "--ranks", str(args.ranks),
                       "--saves", str(args.saves), "--step-s", str(args.step_s), "--one", kind, mode, str(root)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
                print(line[0] if line else f"{kind:9} {mode:8} failed: {done.stderr.strip()[-800:]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
