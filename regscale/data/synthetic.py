"""Synthetic data for the smoke recipe: class-coloured images, prepared with a tiny random VAE.

`ensure_synthetic_dataset(cfg.data, cfg.model.num_classes)` is called by every rank: rank 0
generates the images (next to data.path, in <data.path>.images/) and runs `prepare`; the other
ranks wait for its summary.json (or <data.path>.failed, where rank 0 writes why it failed).
Both steps are deterministic and resumable, so calling it again (or from two jobs) is harmless.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from regscale.config import DataConfig, is_remote
from regscale.dist import read_layout
from regscale.data.shards import SUMMARY
from regscale.errors import UserError
from regscale.fsutil import atomic_path

WAIT_S = 1800.0


def _rank() -> int:
    return read_layout().rank


def synthetic_image(label: int, i: int, num_classes: int, size: int = 64) -> np.ndarray:
    """A 64x64 RGB image: a colour per class, a random smooth gradient and noise per image."""
    rng = np.random.default_rng([label, i])
    hue = np.array([np.cos(2 * np.pi * (label / num_classes + k / 3)) for k in range(3)])
    base = 128 + 90 * hue
    yy, xx = np.mgrid[0:size, 0:size] / size
    slope = rng.normal(0, 40, (2, 3))
    image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_images(root: Path, num_images: int, num_classes: int) -> None:
    """root/class_XXXX/NNNNNN.png, images dealt round-robin to classes; existing files are kept."""
    for i in range(num_images):
        label = i % num_classes
        path = root / f"class_{label:04d}" / f"{i:06d}.png"
        if path.exists():
            continue
        with atomic_path(path) as tmp:
            Image.fromarray(synthetic_image(label, i, num_classes)).save(tmp, format="PNG")


def ensure_synthetic_dataset(data: DataConfig, num_classes: int) -> None:
    """Generate + prepare data.synthetic images of at most `num_classes` classes (the model's) at
    data.path unless it already holds them."""
    count = data.synthetic
    if count <= 0:
        return
    if data.path is None or is_remote(data.path):
        raise UserError(f"data.synthetic needs a local data.path to write to; got {data.path!r}")
    out = Path(data.path)
    if (out / SUMMARY).is_file():
        return
    failed = out.with_name(out.name + ".failed")  # beside OUT: OUT itself must stay a clean dataset
    if _rank() != 0:
        deadline = time.monotonic() + WAIT_S
        while not (out / SUMMARY).is_file():
            if failed.is_file():
                raise UserError(f"rank 0 failed to prepare the synthetic dataset at {out}: {failed.read_text()}")
            if time.monotonic() > deadline:
                raise UserError(f"timed out after {WAIT_S:.0f} s waiting for rank 0 to prepare {out}")
            time.sleep(0.5)
        return
    from regscale.data.prepare import PrepareOptions, prepare

    images = out.with_name(out.name + ".images")
    num_classes = min(num_classes, count)
    try:
        failed.unlink(missing_ok=True)
        write_synthetic_images(images, count, num_classes)
        prepare(str(images), str(out), PrepareOptions(random_vae=True, chunk_size=max(64, count // 8), progress=False))
    except Exception as err:
        failed.write_text(f"{type(err).__name__}: {err}")
        raise
