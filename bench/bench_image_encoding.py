"""Image encodings for the `image` column: bytes per sample against decode time, one core.

    .venv/bin/python bench/bench_image_encoding.py [PHOTO ...]

Encodes 256x256 centre crops of the given photos (natural images compress very differently from
synthetic ones: pass real photographs) and prints, per encoding, the mean size and the decode rate
of one core. `regscale prepare` stores the encoding this picks (see regscale/data/shards.py).
"""

from __future__ import annotations

import io
import sys
import time

import numpy as np
import torch
from PIL import Image

from regscale.data.images import center_crop_arr


def _crops(paths: list[str]) -> list[np.ndarray]:
    crops = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            for scale in (1.0, 0.8, 0.6):  # several crops per photo: different content, same statistics
                w, h = im.size
                crops.append(center_crop_arr(im.resize((max(256, int(w * scale)), max(256, int(h * scale))),
                                                       Image.BICUBIC), 256))
    return crops


def _codecs() -> dict[str, tuple]:
    def pil_encode(fmt: str, **kw):
        def enc(a: np.ndarray) -> bytes:
            out = io.BytesIO()
            Image.fromarray(a).save(out, format=fmt, **kw)
            return out.getvalue()
        return enc

    def pil_decode(b: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    return {
        "raw uint8": (lambda a: a.tobytes(), lambda b: np.frombuffer(b, np.uint8).reshape(256, 256, 3)),
        "png (level 6)": (pil_encode("PNG"), pil_decode),
        "png (level 1)": (pil_encode("PNG", compress_level=1), pil_decode),
        "webp lossless": (pil_encode("WEBP", lossless=True), pil_decode),
        "jpeg q95 (lossy)": (pil_encode("JPEG", quality=95), pil_decode),
    }


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    crops = _crops(paths) if paths else [np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)]
    print(f"{len(crops)} crops of 256x256 from {len(paths)} photos; one core")
    print(f"{'encoding':<18} {'KiB/sample':>10} {'decode/s':>9} {'lossless':>8} {'ImageNet-1.28M GB':>18}")
    for name, (enc, dec) in _codecs().items():
        blobs = [enc(c) for c in crops]
        lossless = all(np.array_equal(dec(b), c) for b, c in zip(blobs, crops))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            for b in blobs:
                dec(b)
            n += len(blobs)
        rate = n / (time.perf_counter() - t0)
        size = float(np.mean([len(b) for b in blobs]))
        print(f"{name:<18} {size / 1024:>10.1f} {rate:>9.0f} {str(lossless):>8} {size * 1.281e6 / 1e9:>18.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
