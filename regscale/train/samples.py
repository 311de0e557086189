"""The sample grid the loop sends to the tracker every `train.sample_every` steps.

Rank 0 alone, from the checkpoint just published (so no collective is needed whatever the
engine): EMA weights -> a plain SiT -> the eval sampler with per-sample seeds -> VAE decode ->
a JPEG grid at <run_dir>/samples/step_XXXXXXXX.jpg (quality 90: a 4x4 grid of 256 px
samples is ~0.2-0.6 MB, against 2.5 MB as PNG).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from regscale.config import Config
from regscale.fsutil import atomic_path
from regscale.rundir import SAMPLES, step_name

GRID = 16
MAX_STEPS = 50  # a preview, not an evaluation: fewer sampler steps than eval.steps
JPEG_QUALITY = 90


def sample_grid(cfg: Config, run_dir: Path, step: int, device: torch.device) -> Path:
    """Write and return the JPEG grid of EMA samples of checkpoint `step`."""
    from PIL import Image

    from regscale.models import build_model_from_config
    from regscale.models.encoders import decode_latents, load_vae
    from regscale.sampling import sample
    from regscale.engine.export import load_consolidated

    state, _ = load_consolidated(run_dir, step=step, weights="ema")
    model = build_model_from_config(cfg.model)
    model.load_state_dict(state)
    model.to(device).eval()
    labels = torch.arange(GRID, device=device) % cfg.model.num_classes
    e = cfg.eval
    latents, _ = sample(model, labels, list(range(GRID)), sampler=e.sampler,
                        steps=min(e.steps, MAX_STEPS), cfg_scale=e.cfg_scale,
                        cls_cfg_scale=e.cls_cfg_scale, guidance_low=e.guidance_low,
                        guidance_high=e.guidance_high)
    vae = load_vae(cfg.vae.decoder, random_init=cfg.vae.random_init).to(device)
    images = decode_latents(vae, latents, scale=cfg.vae.scale).cpu().numpy()  # [B,3,H,W]
    side = int(math.sqrt(GRID))
    b, c, h, w = images.shape
    grid = images.reshape(side, side, c, h, w).transpose(0, 3, 1, 4, 2).reshape(side * h, side * w, c)
    out = run_dir / SAMPLES / f"{step_name(step)}.jpg"
    with atomic_path(out) as tmp:
        Image.fromarray(np.ascontiguousarray(grid)).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    return out
