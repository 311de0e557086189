"""The random draws of training samples, the same for any number of processes.

Every draw of one sample at one step (its VAE posterior noise, label-dropout coin, time, image
noise, class-token noise) comes from a generator of its own, seeded by (seed, step, the sample's
dataset index), in that order (`objective.draw` for the last four). The data stream gives every
step the same global batch whatever the world size, so a step sees the same samples with the same
noise on 1, 2 or N processes and any micro-batching; only the order of the reductions differs.

Why a CPU generator per sample: the draws must not depend on how a global batch is cut, so one
generator per rank or micro-batch is out, and one global draw per step sliced by position would
tie the noise to streaming's internal placement of samples on ranks. A CUDA generator per sample
would cost several kernel launches per sample; here the whole micro-batch's draws are made on the
host (about 9K numbers per sample at 256 px: ~40 us per sample, 1.2 ms for a micro-batch of 32
on one AMD EPYC core, 1.6x one generator for the whole micro-batch; bench/bench_noise.py) and
reach the GPU in one pinned, non-blocking copy per tensor. The draws are then also identical on
CPU and GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from regscale.objective import Draws, draw

DERIVATION = ("per sample: CPU torch.Generator seeded by sha256('regscale:seed:step:index')[:8] "
              "(index: the sample's dataset index); posterior noise, then objective.draw")
TRACE_ENV = "REGSCALE_TRACE_DRAWS"


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of one sample's draws at one step: a pure function of (seed, step, index)."""
    key = hashlib.sha256(f"regscale:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(key[:8], "little") & (2**63 - 1)


class SampleNoise:
    """Draws for the samples of a micro-batch, by dataset index (see the module docstring).

    With REGSCALE_TRACE_DRAWS=1 in the environment each call also appends the step, the indices
    and a digest of every sample's draws to <run_dir>/draws/rank*.jsonl (tests, debugging).
    """

    def __init__(self, seed: int, cls_dim: int, time_sampling: str, device: torch.device,
                 trace: Optional[Path] = None) -> None:
        self.seed, self.cls_dim, self.time_sampling, self.device = seed, cls_dim, time_sampling, device
        self.trace = trace if os.environ.get(TRACE_ENV) == "1" else None

    def __call__(self, step: int, indices: torch.Tensor, latent_shape: Sequence[int]
                 ) -> tuple[torch.Tensor, Draws]:
        """(posterior noise [B, *latent_shape], Draws) on the device, for dataset indices [B]."""
        eps, rows = [], []
        for index in indices.tolist():
            g = torch.Generator().manual_seed(sample_seed(self.seed, step, index))
            eps.append(torch.randn(tuple(latent_shape), generator=g))
            rows.append(draw(1, latent_shape, self.cls_dim, self.time_sampling, g))
        host = [torch.stack(eps), *(torch.cat(parts) for parts in zip(*rows))]
        if self.trace is not None:
            self._record(step, indices, host)
        if self.device.type == "cuda":
            host = [t.pin_memory() for t in host]
        on_device = [t.to(self.device, non_blocking=True) for t in host]
        return on_device[0], Draws(*on_device[1:])

    def _record(self, step: int, indices: torch.Tensor, host: list[torch.Tensor]) -> None:
        digests = []
        for i in range(len(indices)):
            h = hashlib.sha256()
            for t in host:
                h.update(t[i].contiguous().numpy().tobytes())
            digests.append(h.hexdigest()[:16])
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        with open(self.trace, "a") as f:
            f.write(json.dumps({"step": step, "index": indices.tolist(), "draws": digests}) + "\n")
