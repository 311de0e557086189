"""regscale's real training step and the official REG code's, timed side by side in one run.

regscale's side is `regscale.train.loop.train` itself (engine, loop, MDS data stream, frozen
DINOv2 stand-in, EMA, the per-step agreement), driven through its public tracker interface: with
`train.log_every=1` the loop hands every step's metrics to `StepClock`, which reads the clock at
each step boundary and, in between, runs the other contender's step, so both see the same
machine state (interleaved: A B A B ...). Setup, logging and the per-step all-reduce count for
regscale, as they do in a real run. Each step's wall time and the process's CPU time (all its
threads) are recorded: on a shared machine the CPU time is far less disturbed by other processes
than the wall clock, and the ratio of adjacent steps (A_s / B_s) cancels slow drifts of load.

The official side runs the body of the official `train.py` loop from a checkout (nothing is
copied into this repository): its `SiT`, `SILoss`, `sample_posterior`, `preprocess_raw_image` and
`update_ema`, its `CustomDataset` in a DataLoader, AdamW, gradient clipping and the five `.item()`
reads it logs every step. On one process accelerate adds nothing but autocast around the model
(outputs cast back to fp32) and, in fp16, its GradScaler (torch's defaults), both reproduced here; its DINOv2 comes from torch.hub, which needs
the internet, so a random timm DINOv2 of the same shape stands in, as on regscale's side.
Both sides read the same images and VAE moments: `write_dataset` writes the official layout and
`regscale prepare` turns it into MDS shards.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from machine import cpu_features, cpu_name
from torch import nn

from regscale.metrics import LOSS

REG_IMAGES = "imagenet_256_vae"  # the official dataset.py's image folder (regscale reads images/)


class StopRun(Exception):
    """Raised by `StepClock` once the measured steps are done: ends `train` without a final save."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A tracker for `regscale.train.loop.train` that times every step from boundary to boundary.

    With log_every=1 the loop hands over each step's metrics; after regscale's step `s`,
    `between()` runs (the official step, timed by itself) and the clock restarts, so regscale's
    time excludes it. Steps 1..warmup are discarded, warmup+1..warmup+steps are measured; then
    `StopRun` ends the run, or with `finish_run` the run goes on to its max_steps (checkpoint
    saves) and those steps' times land in `after_s`.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int,
                 between: Optional[Callable[[], None]] = None, finish_run: bool = False) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.between, self.finish_run = between, finish_run
        self.step_s: list[float] = []
        self.between_s: list[float] = []
        self.step_cpu_s: list[float] = []  # process CPU seconds (all threads) of the same steps
        self.between_cpu_s: list[float] = []
        self.after_s: list[float] = []
        self.rows: list[dict[str, float]] = []
        self.first_step_s = float("nan")
        self.begin()

    def begin(self) -> None:
        """Call right before `train`: time to the first step counts from here."""
        self.start = self.mark = time.perf_counter()
        self.cpu_mark = time.process_time()

    # the tracker interface the loop uses
    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_image(self, path: Path, step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append({"step": step, **metrics})
        if LOSS not in metrics:  # first-step time, checkpoint stall: rows only
            return
        synchronize(self.device)
        seconds, cpu_seconds = time.perf_counter() - self.mark, time.process_time() - self.cpu_mark
        last = self.warmup + self.steps
        if step == 1:
            self.first_step_s = time.perf_counter() - self.start
        elif step > last:
            self.after_s.append(seconds)
        elif step > self.warmup:
            self.step_s.append(seconds)
            self.step_cpu_s.append(cpu_seconds)
        if self.between is not None and step <= last:
            t0, cpu0 = time.perf_counter(), time.process_time()
            self.between()
            synchronize(self.device)
            if step > self.warmup:
                self.between_s.append(time.perf_counter() - t0)
                self.between_cpu_s.append(time.process_time() - cpu0)
        self.mark, self.cpu_mark = time.perf_counter(), time.process_time()
        if step >= last and not self.finish_run:
            raise StopRun

    def speedups(self, cpu: bool = False) -> list[float]:
        """Per measured step, the other contender's time over regscale's (> 1: regscale faster)."""
        ours, theirs = (self.step_cpu_s, self.between_cpu_s) if cpu else (self.step_s, self.between_s)
        return [b / a for a, b in zip(ours, theirs)]

    def metric(self, key: str) -> list[float]:
        """Every logged value of one metric, in step order."""
        return [row[key] for row in self.rows if key in row]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(cfg: Any, run_dir: Path, clock: StepClock) -> str:
    """`regscale.train.loop.train` in this process (a fresh one-process group), timed by `clock`."""
    from regscale.train.loop import train

    os.environ["MASTER_PORT"] = str(free_port())
    clock.begin()
    try:
        return train(cfg, run_dir, clock)
    except StopRun:
        return "measured"


def bench_config(overrides: list[str]) -> Any:
    """A one-process training configuration: random DINOv2/VAE stand-ins, metrics every step,
    no sample grids, no checkpoints unless the overrides ask, this process's thread count."""
    from regscale.config import load_config

    base = ["encoder.random_init=true", "vae.random_init=true", "slurm.nodes=1", "slurm.gpus_per_node=1",
            "slurm.cluster=local", f"slurm.cpus_per_task={torch.get_num_threads()}", "train.log_every=1", "train.sample_every=0", "train.max_steps=1000000",
            "train.ckpt_every=1000000", "train.keep_every=0", "run.name=bench"]
    return load_config(None, base + list(overrides))


# ---------------------------------------------------------------------------------------------
# the data both sides read


def write_dataset(root: Path, count: int, num_classes: int, seed: int = 0) -> Path:
    """`count` 256x256 class-coloured PNGs and VAE moments in the official layout
    (imagenet_256_vae/ + vae-sd/ with dataset.json), plus images/ -> imagenet_256_vae, which is
    the name `regscale prepare` reads. Returns the prepared MDS dataset (root/mds)."""
    from PIL import Image

    from regscale.data.prepare import PrepareOptions, prepare
    from regscale.data.synthetic import synthetic_image

    mds = root / "mds"
    if (mds / "summary.json").is_file():
        return mds
    images, feats = root / REG_IMAGES / "00000", root / "vae-sd" / "00000"
    images.mkdir(parents=True, exist_ok=True)
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(count):
        label = i % num_classes
        Image.fromarray(synthetic_image(label, i, num_classes, size=256)).save(images / f"img{i:08d}.png")
        mean = rng.normal(size=(1, 4, 32, 32))
        std = np.abs(rng.normal(0.5, 0.1, size=(1, 4, 32, 32)))
        name = f"00000/img-mean-std-{i:08d}.npy"
        np.save(root / "vae-sd" / name, np.concatenate([mean, std], axis=1).astype(np.float32))
        labels.append([name, label])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    alias = root / "images"
    if not alias.exists():
        alias.symlink_to(REG_IMAGES)
    prepare(str(root), str(mds), PrepareOptions(chunk_size=max(64, count), progress=False))
    return mds


# ---------------------------------------------------------------------------------------------
# the official code


def load_official_functions(checkout: Path, names: tuple[str, ...]) -> dict[str, Callable]:
    """Named top-level functions of the checkout's train.py, executed with the module's imports
    and constants that load here (its wandb/accelerate imports are not needed by these)."""
    tree = ast.parse((checkout / "train.py").read_text())
    namespace: dict[str, Any] = {"__name__": "official_train"}
    for node in tree.body:
        wanted = isinstance(node, ast.FunctionDef) and node.name in names
        if not (wanted or isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign))):
            continue
        try:
            exec(compile(ast.Module([node], type_ignores=[]), str(checkout / "train.py"), "exec"), namespace)
        except Exception:  # an import or constant that does not load here; a wanted function that
            continue  # needs it fails when called, naming it
    missing = [n for n in names if n not in namespace]
    if missing:
        raise RuntimeError(f"{checkout}/train.py does not define {missing}: not the official REG checkout?")
    return {n: namespace[n] for n in names}


class DinoHubStandIn(nn.Module):
    """A timm DINOv2 behind torch.hub DINOv2's `forward_features` dict (what the official loop reads)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit.forward_features(x)
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}


class _Fp32Outputs(nn.Module):
    """What accelerate's `prepare` does to the model on one process: autocast, fp32 outputs."""

    def __init__(self, module: nn.Module, dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next(self.module.parameters()).device.type
        with torch.autocast(device, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.module(*args, **kwargs)
        return _to_fp32(out)


def _to_fp32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_fp32(o) for o in out)
    return out


class OfficialStep:
    """One step of the official training loop, from a checkout at `checkout`.

    arch: regscale's resolved model architecture (so both sides train the same shape);
    precision: "fp32", "bf16" or "fp16" (accelerate's mixed precision); data_root: `write_dataset`'s root.
    """

    def __init__(self, checkout: Path, cfg: Any, device: torch.device, data_root: Path) -> None:
        sys.path.insert(0, str(checkout))
        try:
            from dataset import CustomDataset
            from loss import SILoss
            from models.sit import SiT
        finally:
            sys.path.remove(str(checkout))
        from regscale.models.encoders import load_dinov2

        fns = load_official_functions(checkout, ("sample_posterior", "preprocess_raw_image", "update_ema"))
        self.sample_posterior, self.preprocess, self.update_ema = (
            fns["sample_posterior"], fns["preprocess_raw_image"], fns["update_ema"])
        m, arch = cfg.model, cfg.model.resolved()
        self.device = device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
        # accelerate's fp16: torch.amp.GradScaler with no arguments
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
        torch.manual_seed(cfg.train.seed)
        model = SiT(input_size=m.input_size, patch_size=arch["patch_size"], in_channels=m.in_channels,
                    hidden_size=arch["hidden_size"], decoder_hidden_size=arch["hidden_size"], depth=arch["depth"],
                    num_heads=arch["num_heads"], encoder_depth=arch["encoder_depth"], num_classes=m.num_classes,
                    use_cfg=m.class_dropout_prob > 0, class_dropout_prob=m.class_dropout_prob,
                    z_dims=[m.cls_token_dim], projector_dim=m.projector_dim, fused_attn=m.fused_attn,
                    qk_norm=m.qk_norm).to(device)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.model = model.train()
        self.forward = _Fp32Outputs(model, self.dtype)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay, eps=t.eps)
        self.encoder = DinoHubStandIn(load_dinov2(cfg.encoder, m.cls_token_dim, seed=t.seed).vit).to(device)
        scale = torch.full((1, 4, 1, 1), cfg.vae.scale, device=device)
        self.latents = dict(latents_scale=scale, latents_bias=torch.zeros_like(scale))
        self.loss_fn = SILoss(prediction="v", path_type="linear", weighting=cfg.loss.time_sampling,
                              encoders=[self.encoder], accelerator=None, **self.latents)
        self.coeffs = cfg.loss.proj_coeff, cfg.loss.cls_coeff, t.grad_clip
        self.loader = torch.utils.data.DataLoader(
            CustomDataset(str(data_root)), batch_size=t.batch_size, shuffle=True, drop_last=True,
            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0)
        self._batches = iter(self.loader)

    def _batch(self) -> tuple[torch.Tensor, ...]:
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def __call__(self) -> None:
        raw_image, x, y = self._batch()
        raw_image, x, y = raw_image.to(self.device), x.squeeze(dim=1).to(self.device), y.to(self.device)
        amp = torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)
        with torch.no_grad():
            x = self.sample_posterior(x, **self.latents)
            with amp:
                z = self.encoder.forward_features(self.preprocess(raw_image, "dinov2-vit-b"))
                cls_token = z["x_norm_clstoken"]
                zs = [torch.cat([cls_token.unsqueeze(1), z["x_norm_patchtokens"]], dim=1)]
        loss1, proj1, _, _, loss2 = self.loss_fn(self.forward, x, dict(y=y), zs=zs, cls_token=cls_token)
        proj_coeff, cls_coeff, clip = self.coeffs
        loss_mean, proj_mean, cls_mean = loss1.mean(), proj1.mean() * proj_coeff, loss2.mean() * cls_coeff
        loss = loss_mean + proj_mean + cls_mean
        if self.scaler is None:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema(self.ema, self.model)
        for value in (loss, loss_mean, proj_mean, cls_mean, grad_norm):  # the loop's per-step log
            value.mean().detach().item()


def step_flops(cfg: Any) -> float:
    """FLOPs of one training step's math, the same on both sides: the frozen DINOv2 forward and the
    SiT's forward + backward at train.batch_size, counted by FlopCounterMode on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from regscale.models import build_model_from_config
    from regscale.models.encoders import load_dinov2

    b, m = cfg.train.batch_size, cfg.model
    with torch.device("meta"):
        model = build_model_from_config(m)
        encoder = load_dinov2(cfg.encoder, m.cls_token_dim)
        images = torch.randint(0, 256, (b, 3, 256, 256), dtype=torch.uint8)
        x, t = torch.randn(b, m.in_channels, m.input_size, m.input_size), torch.rand(b)
        y = torch.randint(0, m.num_classes, (b,))
    counter = FlopCounterMode(display=False)
    with counter:
        tokens = encoder.vit.forward_features(encoder.preprocess(images))
        v, zs, v_cls = model(x, t, y, tokens[:, 0])
        sum(out.float().square().mean() for out in (v, *zs, v_cls)).backward()
    return float(counter.get_total_flops())


def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, iters: int = 10) -> float:
    """Dense n x n x n matmul FLOP/s on random data: the machine's practical peak (median)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times)


def device_name(device: torch.device) -> str:
    """The CPU or GPU the figures come from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({cpu_features()})"


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")
