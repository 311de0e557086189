"""The GPU check in one call: parity, the real training step, the official step beside it, the
sampler, the evaluator, the checkpoint stall and the optimizer and compile choices.

    python3 bench/device_check.py --out $OUT --official .official-REG      # the GPU machine
    .venv/bin/python bench/device_check.py --smoke --out /tmp/device-check  # CPU, tiny sizes, < 3 min

Writes device_check.json (every figure, the machine, what was skipped and why) and
device_check.md (the table) to --out, after each part, so a run stopped by its time limit still
leaves what it measured. Parts, in order of importance:
  parity     a small SiT on the device (fp32, TF32 off) against the CPU forward, max |diff| <= 1e-4;
             bf16 autocast against fp32, relative L2 error <= 3e-2 (bf16 keeps 8 mantissa bits),
             fp16 autocast <= 1e-2 (11 bits)
  peak       the measured dense bf16, fp16 and fp32 matmul FLOP/s: the MFU denominators
  train      `regscale.train.loop.train` at SiT-XL/2, batch 32, bf16, random DINOv2-B and VAE
             stand-ins, one process (where the fsdp engine runs the model unwrapped): FSDP
             compile off (beside the official step when --official is given, interleaved), the
             same in fp16 (the paper's precision, with its loss scale) against it, FSDP compile
             on, DeepSpeed ZeRO-2, FSDP compile on + foreach AdamW; images/s, MFU, peak memory,
             time to first step, data wait
  optimizer  one AdamW step over XL/2's parameters, per implementation (fused, foreach, for-loop)
  sampler    XL/2 model calls/s without and with guidance, fp32 and bf16, and the hours 50K
             samples x 250 steps would take at that rate with the published guidance interval
  evaluator  Inception feature throughput (random weights) and the metric time for 50K x 2048
             against a 10K reference (FID, sFID, IS, precision/recall)
  checkpoint the loop's stall for an async and a blocking save of the XL/2 training state (FSDP)
Goals reported against (issue 13): MFU >= 50% at bf16 + compile; regscale's step >= 1.5x the
official one; sampler bf16 >= 2x fp32.

The GPU machine has torch, timm, scipy, ... but not omegaconf, streaming, deepspeed, diffusers
or torch-fidelity, and no package index: where they are missing, the wheels in .whl/
(scripts/device_wheels.sh) are installed into a temporary target and the script restarts itself
with that target on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"


def ensure_dependencies() -> None:
    """Where the project's dependencies are missing, install .whl/ into a temporary target and
    restart this script with it (and the repository) on PYTHONPATH."""
    try:
        import omegaconf  # noqa: F401
        import streaming  # noqa: F401
        return
    except ImportError as err:
        missing = err.name
    if os.environ.get("REGSCALE_WHEELS_TARGET"):
        sys.exit(f"device_check: {missing} is still missing after installing {WHEELS}; "
                 "rerun scripts/device_wheels.sh and carry .whl")
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    if not wheels:
        sys.exit(f"device_check: {missing} is not installed and {WHEELS} holds no wheels; run "
                 "scripts/device_wheels.sh where pip reaches an index, and carry .whl")
    target = tempfile.mkdtemp(prefix="regscale-wheels-")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", target, *wheels], check=True)
    path = os.pathsep.join(p for p in (target, str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "REGSCALE_WHEELS_TARGET": target,
           "REGSCALE_WHEELS_INSTALL_S": f"{time.perf_counter() - t0:.1f}"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    ensure_dependencies()
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sidebyside as sbs  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: the full check on a GPU, or the CPU smoke test of the kit."""

    size: str
    arch: dict[str, int]  # model.* overrides of the size
    encoder_depth: int  # blocks of the random DINOv2 stand-in (ViT-B/14: 12)
    batch: int
    precision: str
    warmup: int
    steps: int
    samples: int  # images in the generated dataset
    workers: int
    compile: bool  # the compile-on training variants
    parity_arch: dict[str, int]
    parity_batch: int
    matmul: int
    sampler_batch: int
    sampler_calls: int
    inception_batch: int
    metric_samples: int
    metric_reference: int


FULL = Sizes(size="XL/2", arch={}, encoder_depth=12, batch=32, precision="bf16", warmup=3, steps=8,
             samples=256, workers=8, compile=True, parity_arch=dict(depth=4), parity_batch=8, matmul=8192,
             sampler_batch=125, sampler_calls=6, inception_batch=250, metric_samples=50_000,
             metric_reference=10_000)
SMOKE = Sizes(size="S/2", arch=dict(depth=2, hidden_size=64, num_heads=2, encoder_depth=1, projector_dim=64,
                                    cls_token_dim=64),
              encoder_depth=1, batch=4, precision="fp32", warmup=1, steps=2, samples=16, workers=1, compile=False,
              parity_arch=dict(depth=2, hidden_size=64, num_heads=2, encoder_depth=1), parity_batch=2, matmul=256,
              sampler_batch=2, sampler_calls=3, inception_batch=2, metric_samples=600, metric_reference=300)

PARITY_FP32_MAX_ABS = 1e-4
PARITY_BF16_REL_L2 = 3e-2
PARITY_FP16_REL_L2 = 1e-2
PUBLISHED_GUIDANCE_HIGH = 0.85  # XL/2 4M: CFG on t <= 0.85 (eval.guidance_high in sit_xl_4m.yaml)


@dataclass
class Report:
    """device_check.json: written after every part."""

    out: Path
    machine: dict[str, Any]
    sizes: dict[str, Any]
    parts: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def write(self) -> None:
        from regscale.fsutil import write_atomic

        body = {"machine": self.machine, "sizes": self.sizes, "elapsed_s": round(time.perf_counter() - self.started, 1),
                "goals": goals(self.parts), "parts": self.parts}
        for name, text in (("device_check.json", json.dumps(body, indent=1, default=float)),
                           ("device_check.md", table(body))):
            write_atomic(self.out / name, text + "\n")


def sync(device: torch.device) -> None:
    sbs.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median seconds of one call, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def machine(device: torch.device) -> dict[str, Any]:
    """Which machine, software and precision the figures come from."""
    info = {"device": sbs.device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wheels_install_s": float(os.environ.get("REGSCALE_WHEELS_INSTALL_S", "nan"))}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except OSError:
        info["commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gb=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    return info


# ---------------------------------------------------------------------------------------------
# parts


def part_parity(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """A small SiT: device fp32 (TF32 off) against CPU fp32, and device bf16 and fp16 autocast
    against fp32."""
    from regscale.eval.metrics import exact_float32
    from regscale.models import build_model

    torch.manual_seed(0)
    model = build_model("S/2", **sizes.parity_arch).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-zero heads: the init zeroes them
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    n = sizes.parity_batch
    inputs = (torch.randn(n, 4, 32, 32, generator=g), torch.rand(n, generator=g),
              torch.randint(0, model.num_classes, (n,), generator=g), torch.randn(n, model.cls_token_dim, generator=g))

    def outputs(m: torch.nn.Module, dev: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            v, zs, v_cls = m(*(t.to(dev) for t in inputs))
        return torch.cat([v.flatten(1), zs[0].flatten(1), v_cls.flatten(1)], 1).double().cpu()

    with exact_float32():
        ref = outputs(model, torch.device("cpu"), None)
        on_device = model.to(device)
        fp32 = outputs(on_device, device, None)
        bf16 = outputs(on_device, device, torch.bfloat16)
        fp16 = outputs(on_device, device, torch.float16)
    fp32_abs = (fp32 - ref).abs().max().item()
    bf16_rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    fp16_rel = ((fp16 - fp32).norm() / fp32.norm()).item()
    return {"model": f"S/2 {sizes.parity_arch}", "batch": n, "outputs_max_abs": ref.abs().max().item(),
            "fp32_max_abs_diff": fp32_abs, "fp32_bound": PARITY_FP32_MAX_ABS, "fp32_ok": fp32_abs <= PARITY_FP32_MAX_ABS,
            "bf16_rel_l2": bf16_rel, "bf16_bound": PARITY_BF16_REL_L2, "bf16_ok": bf16_rel <= PARITY_BF16_REL_L2,
            "fp16_rel_l2": fp16_rel, "fp16_bound": PARITY_FP16_REL_L2, "fp16_ok": fp16_rel <= PARITY_FP16_REL_L2}


def part_peak(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Dense matmul FLOP/s on random data, bf16, fp16 and fp32 (TF32 as the training default allows)."""
    dtypes = (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))
    return {"n": sizes.matmul, **{f"{name}_tflops": sbs.matmul_flops(sizes.matmul, dtype, device) / 1e12
                                  for name, dtype in dtypes}}


def train_overrides(sizes: Sizes, data: Path, engine: str, compile_: bool, adamw: str, precision: str) -> list[str]:
    kind = ["engine.kind=fsdp"] if engine == "fsdp" else ["engine.kind=deepspeed", "engine.zero_stage=2"]
    return [f"model.size={sizes.size}", *(f"model.{k}={v}" for k, v in sizes.arch.items()),
            f"encoder.random_depth={sizes.encoder_depth}", f"train.batch_size={sizes.batch}",
            f"train.precision={precision}", f"data.path={data}", f"data.num_workers={sizes.workers}",
            f"engine.compile={compile_}", f"engine.adamw={adamw}", *kind]


def train_variant(sizes: Sizes, device: torch.device, work: Path, peak: Optional[float], *, engine: str = "fsdp",
                  compile_: bool = False, adamw: str = "fused", official: Optional[Path] = None,
                  checkpoint: bool = False, precision: Optional[str] = None) -> dict[str, Any]:
    """One `regscale.train.loop.train` run (in `precision`, default the sizes'): warm-up, timed
    steps (beside the official step when `official` is a checkout); with `checkpoint`, one warm-up
    and one timed step, then an async save, one more step and the final blocking save of the whole
    training state."""
    from regscale.metrics import CKPT_ASYNC, CKPT_STALL_S, DATA_WAIT_S
    from regscale.train.health import device_peak_flops, train_flops_per_image

    free_memory(device)
    warmup, steps = (1, 1) if checkpoint else (sizes.warmup, sizes.steps)
    extra = [f"train.ckpt_every={warmup + steps + 1}", f"train.max_steps={warmup + steps + 2}", "train.keep_last=1",
             "engine.async_checkpoint=true"] if checkpoint else []
    precision = precision or sizes.precision
    cfg = sbs.bench_config(train_overrides(sizes, work / "data" / "mds", engine, compile_, adamw, precision) + extra)
    theirs = sbs.OfficialStep(official, cfg, device, work / "data") if official else None
    clock = sbs.StepClock(device, warmup, steps, between=theirs, finish_run=checkpoint)
    run_dir = work / f"run-{engine}-{'compiled' if compile_ else 'eager'}-{adamw}-{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)
    status = sbs.run_train(cfg, run_dir, clock)
    step_s = sbs.median(clock.step_s)
    flops = sbs.step_flops(cfg) / sizes.batch
    images_s = sizes.batch / step_s
    out: dict[str, Any] = {
        "engine": engine, "compile": compile_, "adamw": adamw, "batch": sizes.batch, "precision": precision,
        "status": status, "step_s": step_s, "steps_s": clock.step_s, "images_s": images_s,
        "tflops": images_s * flops / 1e12, "gflop_per_image": flops / 1e9,
        "gflop_per_image_loop_formula": train_flops_per_image(cfg) / 1e9,
        "first_step_s": clock.first_step_s, "data_wait_s": sbs.median(clock.metric(DATA_WAIT_S)[warmup:]),
    }
    if peak:
        out["mfu_measured_peak"] = images_s * flops / peak
    datasheet = device_peak_flops(device)
    if datasheet:
        out["mfu_datasheet_peak"] = images_s * flops / datasheet
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_memory_includes_official"] = theirs is not None
    if theirs is not None:
        official_s = sbs.median(clock.between_s)
        out.update(official_step_s=official_s, official_steps_s=clock.between_s,
                   official_images_s=sizes.batch / official_s, speed_vs_official=official_s / step_s)
    if checkpoint:
        stalls = clock.metric(CKPT_STALL_S)
        kinds = clock.metric(CKPT_ASYNC)
        out.update(async_stall_s=next((s for s, a in zip(stalls, kinds) if a), None),
                   blocking_stall_s=next((s for s, a in zip(stalls, kinds) if not a), None),
                   step_with_async_save_s=clock.after_s[0] if clock.after_s else None,
                   step_with_final_save_s=clock.after_s[1] if len(clock.after_s) > 1 else None,
                   checkpoint_bytes=checkpoint_bytes(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)
    del theirs, clock
    free_memory(device)
    return out


def checkpoint_bytes(run_dir: Path) -> Optional[int]:
    from regscale.rundir import CHECKPOINTS

    ckpts = sorted((run_dir / CHECKPOINTS).glob("step_*"))
    if not ckpts:
        return None
    return sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file())


def part_optimizer(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """One AdamW step over parameters shaped like the model's, per implementation."""
    from regscale.config import TrainConfig
    from regscale.engine.base import adamw
    from regscale.models import build_model

    with torch.device("meta"):
        shapes = [p.shape for p in build_model(sizes.size, **sizes.arch).parameters()]
    out: dict[str, Any] = {"parameters": sum(math.prod(s) for s in shapes), "tensors": len(shapes)}
    for impl in ("fused", "foreach", "for-loop"):
        free_memory(device)
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = adamw(TrainConfig(), impl, params)
        out[f"{impl}_step_s"] = timed(opt.step, device, iters=5, warmup=2)
        del params, opt
    free_memory(device)
    return out


def part_sampler(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Model calls/s of the SDE sampler at the training size, without and with guidance, fp32 (TF32
    off, as the evaluation samples) and bf16 autocast."""
    from regscale.eval.metrics import exact_float32
    from regscale.models import build_model
    from regscale.sampling import sample

    free_memory(device)
    torch.manual_seed(0)
    model = build_model(sizes.size, **sizes.arch).to(device).eval()
    n, calls = sizes.sampler_batch, sizes.sampler_calls
    labels = torch.arange(n, device=device) % model.num_classes
    seeds = list(range(n))
    out: dict[str, Any] = {"batch": n, "calls": calls}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for guided, kw in (("unguided", {}), ("guided", dict(cfg_scale=2.3, cls_cfg_scale=2.3))):
            def run() -> None:
                with exact_float32(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    sample(model, labels, seeds, steps=calls, **kw)

            seconds = timed(run, device, iters=2, warmup=1)
            out[f"{precision}_{guided}_calls_s"] = calls / seconds
            out[f"{precision}_{guided}_images_s_per_call"] = n * calls / seconds
        unguided, guided = (1 / out[f"{precision}_{k}_calls_s"] for k in ("unguided", "guided"))
        per_batch = 250 * (PUBLISHED_GUIDANCE_HIGH * guided + (1 - PUBLISHED_GUIDANCE_HIGH) * unguided)
        out[f"{precision}_50k_x_250_hours"] = math.ceil(50_000 / n) * per_batch / 3600
    out["bf16_speedup"] = out["bf16_guided_calls_s"] / out["fp32_guided_calls_s"]
    del model
    free_memory(device)
    return out


def part_evaluator(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Inception throughput (random weights: the same network and cost) and the metric time."""
    from regscale.eval.inception import LOGITS_DIM, POOL_DIM, SPATIAL_DIM, load_inception
    from regscale.eval.metrics import FeatureStats, frechet, inception_score, precision_recall

    free_memory(device)
    net = load_inception(random_init=True, device=device)
    images = torch.randint(0, 256, (sizes.inception_batch, 3, 256, 256), dtype=torch.uint8, device=device)
    seconds = timed(lambda: net(images), device, iters=3, warmup=1)
    out: dict[str, Any] = {"inception_batch": sizes.inception_batch, "inception_images_s": sizes.inception_batch / seconds}
    del net, images
    n, m = sizes.metric_samples, sizes.metric_reference
    g = torch.Generator(device=device).manual_seed(0)
    pool, ref_pool = (torch.randn(k, POOL_DIM, generator=g, device=device).relu() for k in (n, m))
    spatial, ref_spatial = (torch.randn(k, SPATIAL_DIM, generator=g, device=device) for k in (n, m))
    logits = torch.randn(n, LOGITS_DIM, generator=g, device=device)
    timings: dict[str, float] = {}

    def clock(name: str, fn: Callable[[], Any]) -> Any:
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        timings[name] = time.perf_counter() - t0
        return result

    def stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        s = FeatureStats.empty(feats.shape[1], device)
        for chunk in feats.split(1000):
            s.update(chunk)
        return s.mu_sigma()

    fid_stats = clock("stats_s", lambda: [stats(f) for f in (pool, ref_pool, spatial, ref_spatial)])
    fid, method = clock("fid_s", lambda: frechet(*fid_stats[0], *fid_stats[1]))
    clock("sfid_s", lambda: frechet(*fid_stats[2], *fid_stats[3]))
    clock("inception_score_s", lambda: inception_score(logits.cpu().numpy()))
    clock("precision_recall_s", lambda: precision_recall(ref_pool, pool, device=device))
    out.update(metric_samples=n, metric_reference=m, frechet_method=method, **timings,
               metrics_total_s=sum(timings.values()))
    free_memory(device)
    return out


# ---------------------------------------------------------------------------------------------
# the report


def goals(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's goals against what was measured (value None: not measured in this run)."""
    train = parts.get("train", {})
    measured = (("MFU >= 50% (XL/2 step, bf16, compile)", train.get("fsdp_compiled", {}).get("mfu_measured_peak"), 0.5),
                ("regscale's step >= 1.5x the official one", train.get("fsdp_eager", {}).get("speed_vs_official"), 1.5),
                ("sampler bf16 >= 2x fp32", parts.get("sampler", {}).get("bf16_speedup"), 2.0))
    return [{"goal": name, "value": value, "target": target, "met": None if value is None else value >= target}
            for name, value, target in measured]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(body: dict[str, Any]) -> str:
    """The markdown table of the issue note: one row per measured figure."""
    m = body["machine"]
    lines = [f"device_check on {m['device']} (torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}), "
             f"{m['date']}, commit {m['commit']}, {body['elapsed_s']} s", "", "| part | figure | value |", "|---|---|---|"]
    for part, figures in body["parts"].items():
        rows = figures.items() if part != "train" else (
            (f"{variant}: {k}", v) for variant, fig in figures.items() for k, v in fig.items())
        for key, value in rows:
            if key.endswith("traceback"):
                continue  # in the JSON
            if isinstance(value, dict):
                lines += [f"| {part} | {key}.{k} | {_fmt(v)} |" for k, v in value.items()]
            elif not isinstance(value, list):
                lines.append(f"| {part} | {key} | {_fmt(value)} |")
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {_fmt(g['value'])} | {g['met']} |" for g in body["goals"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "device-check"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: tests the kit (< 3 min)")
    p.add_argument("--official", type=Path, help="a checkout of the official REG code (train.py, loss.py, models/)")
    p.add_argument("--budget-s", type=float, default=400.0, help="skip parts that would not fit in this time")
    p.add_argument("--work", type=Path, help="scratch space (default: a temp dir, removed at the end)")
    args = p.parse_args()
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="regscale-device-check-"))
    report = Report(args.out, machine(device), {"smoke": args.smoke, **asdict(sizes)})
    report.parts["skipped"] = {}

    def part(name: str, estimate_s: float, fn: Callable[[], Any], into: Optional[dict] = None) -> Any:
        """Run one part unless it would overrun the budget; a failure is recorded, not raised."""
        left = args.budget_s - (time.perf_counter() - report.started)
        if not args.smoke and left < estimate_s:
            report.parts["skipped"][name] = f"time budget: {left:.0f} s left, needs ~{estimate_s:.0f} s"
            report.write()
            return None
        t0 = time.perf_counter()
        print(f"[device_check] {name} ...", file=sys.stderr, flush=True)
        try:
            result = fn()
        except Exception as err:  # keep going: one broken part must not cost the others
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        (into if into is not None else report.parts)[name] = result
        report.write()
        return result

    part("parity", 20, lambda: part_parity(sizes, device))
    peak = part("peak", 10, lambda: part_peak(sizes, device)) or {}
    peak_flops = peak.get(f"{sizes.precision}_tflops", 0) * 1e12 or None
    part("data", 30, lambda: {"mds": str(sbs.write_dataset(work / "data", sizes.samples, num_classes=10))})
    train: dict[str, Any] = {}
    report.parts["train"] = train
    official = args.official.resolve() if args.official else None
    if official is None:
        report.parts["skipped"]["official"] = "no --official checkout given"
    eager = part("fsdp_eager", 100, lambda: train_variant(sizes, device, work, peak_flops, official=official),
                 into=train)
    fp16_peak = peak.get("fp16_tflops", 0) * 1e12 or None
    fp16 = part("fsdp_eager_fp16", 70, lambda: train_variant(sizes, device, work, fp16_peak, precision="fp16"),
                into=train)
    if eager and fp16 and "step_s" in eager and "step_s" in fp16:  # > 1: fp16 is faster
        fp16[f"speed_vs_{sizes.precision}"] = eager["step_s"] / fp16["step_s"]
        report.write()
    if sizes.compile:
        part("fsdp_compiled", 150, lambda: train_variant(sizes, device, work, peak_flops, compile_=True), into=train)
    else:
        report.parts["skipped"]["compile"] = "smoke: inductor on CPU takes minutes (the same code path as eager)"
    part("sampler", 40, lambda: part_sampler(sizes, device))
    part("evaluator", 60, lambda: part_evaluator(sizes, device))
    part("optimizer", 20, lambda: part_optimizer(sizes, device))
    part("checkpoint", 90, lambda: train_variant(sizes, device, work, peak_flops, checkpoint=True))
    part("zero2_eager", 60, lambda: train_variant(sizes, device, work, peak_flops, engine="deepspeed"), into=train)
    if sizes.compile:
        part("fsdp_compiled_foreach", 60, lambda: train_variant(sizes, device, work, peak_flops, compile_=True,
                                                                adamw="foreach"), into=train)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    report.write()
    print((args.out / "device_check.md").read_text())


if __name__ == "__main__":
    main()
