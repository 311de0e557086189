"""The MDS sample format shared by `regscale prepare` (writer) and the training stream (reader).

Columns: `image` uint8 3x256x256, `moments` float32 8x32x32 ([:4] posterior mean, [4:] std),
`label` int, `index` int (the sample's position in the sorted source: proves exactly-once).

Image encoding, chosen by measurement (bench/bench_image_encoding.py, 256x256 ADM crops of photos,
one core of this machine): raw 192 KiB at ~1M decodes/s; WebP lossless 103 KiB at 541/s; PNG 125
KiB at 338/s; JPEG q95 39 KiB at 1411/s but lossy (upstream stores lossless PNG). A GPU training
SiT-XL/2 eats ~500 images/s, so any lossless codec costs about one core per GPU just to decode;
raw costs nothing to decode and 1.9x the bytes of WebP (252 GB against 135 GB for ImageNet-1.28M).
Default: raw. `--image-encoding webp` (0.55x the bytes on photos) where storage or bandwidth is the
limit. Reading (bench/bench_data.py, 4096 samples, this 2-core machine under load): the stream
with raw images gives 947 samples per CPU-second against 396 for PNG + .npy files, 2.4x.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SHAPE = (3, 256, 256)
MOMENTS_SHAPE = (8, 32, 32)
IMAGE_ENCODINGS = ("raw", "webp")
MANIFEST = "regscale_dataset.json"  # identity of a prepared dataset (source fingerprint, options)
CLASSES = "classes.json"
SUMMARY = "summary.json"
HASHES = ["sha1", "xxh64"]  # per shard, checked by `regscale prepare --verify` and on download
SHARD_SIZE_LIMIT = 1 << 26


def columns(image_encoding: str) -> dict[str, str]:
    """MDSWriter columns for the given image encoding."""
    image = "ndarray:uint8:3,256,256" if image_encoding == "raw" else "bytes"
    return {"image": image, "moments": "ndarray:float32:8,32,32", "label": "int", "index": "int"}


def encode_image(chw: np.ndarray, image_encoding: str) -> Any:
    """uint8 [3,256,256] -> the value MDSWriter stores for the `image` column."""
    if image_encoding == "raw":
        return np.ascontiguousarray(chw, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(chw.transpose(1, 2, 0)).save(out, format="WEBP", lossless=True)
    return out.getvalue()


def decode_image(value: Any) -> np.ndarray:
    """Stored `image` value (ndarray or WebP bytes) -> uint8 [3,256,256]."""
    if isinstance(value, np.ndarray):
        return value
    with Image.open(io.BytesIO(value)) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)
