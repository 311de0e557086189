"""Health of a running job: non-finite steps, FLOPs and MFU, metrics (hangs: regscale.train.heartbeat;
test-only faults are injected through regscale.faults)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from regscale.config import Config

# dense bf16 peak FLOP/s per device, for MFU; unknown devices report no MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


class NonFiniteGuard:
    """Counts skipped steps; `rollback_due` after `limit` in a row (None: never, fp16, whose loss
    scale skips steps by design and has its own guard, LossScaleGuard)."""

    def __init__(self, limit: Optional[int], total: int = 0) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = total

    def record(self, applied: bool) -> None:
        if applied:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.total += 1

    @property
    def rollback_due(self) -> bool:
        return self.limit is not None and self.in_a_row >= self.limit


class LossScaleGuard:
    """fp16: the loss scale has collapsed once the scale of `limit` steps in a row was below `floor`
    (steps, not skips: a scale regrows only after 2000 good steps)."""

    def __init__(self, floor: float, limit: int, low_steps: int = 0) -> None:
        self.floor = floor
        self.limit = limit
        self.low_steps = low_steps

    def record(self, scale: float) -> None:
        self.low_steps = self.low_steps + 1 if scale < self.floor else 0

    @property
    def collapsed(self) -> bool:
        return self.low_steps >= self.limit


def train_flops_per_image(cfg: Config) -> float:
    """Forward + backward FLOPs of the SiT for one image (3x the forward's matmuls), plus the
    frozen encoder's forward. Matmul terms only: 2 FLOPs per multiply-add."""
    arch = cfg.model.resolved()
    d, depth, p = arch["hidden_size"], arch["depth"], arch["patch_size"]
    tokens = (cfg.model.input_size // p) ** 2 + 1  # + the class token
    mlp = cfg.model.mlp_ratio
    # qkv + out projection + MLP per token, attention scores and mixing, adaLN (per image)
    per_block = 2 * tokens * (4 * d * d + 2 * mlp * d * d) + 4 * tokens * tokens * d + 12 * d * d
    proj = 2 * (tokens - 1) * (d * cfg.model.projector_dim + 2 * cfg.model.projector_dim ** 2
                               + cfg.model.projector_dim * cfg.model.cls_token_dim)
    sit = depth * per_block + proj
    enc_d = cfg.model.cls_token_dim
    enc_depth = cfg.encoder.random_depth if cfg.encoder.random_init else 12
    enc_tokens = (cfg.encoder.resolution // 14) ** 2 + 1
    encoder = enc_depth * (2 * enc_tokens * 12 * enc_d * enc_d + 4 * enc_tokens ** 2 * enc_d)
    return 3 * sit + encoder


def device_peak_flops(device: torch.device) -> Optional[float]:
    override = os.environ.get("REGSCALE_PEAK_FLOPS")
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem/allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem/host_rss_gb": rss_kb / 2**20}


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) plus the tracker, on rank 0."""

    def __init__(self, path: Path, tracker: Any = None, enabled: bool = True) -> None:
        self.path = path
        self.tracker = tracker
        self.enabled = enabled

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "time": time.time(), **metrics})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)
