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
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from regscale.errors import UserError

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


INDEX = "index.json"
CHEAP_HASH = "xxh64"  # what training checks every shard with on first open (~10 GB/s)


class ShardError(UserError):
    """A shard that is missing, truncated, changed or unreadable."""


def verify_hint(root: str | os.PathLike) -> str:
    return f"check the dataset with `regscale prepare --verify {root}`"


def index_shards(index: Any, where: str) -> list[dict[str, Any]]:
    """The shard entries of an MDS index.json (already parsed), each checked to name its file, its
    byte size and its sample count; a UserError naming `where` otherwise."""
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise UserError(f"{where}: not an MDS index (expected {{\"shards\": [...]}})")
    for number, info in enumerate(shards):
        raw = info.get("raw_data") if isinstance(info, dict) else None
        if not (isinstance(raw, dict) and isinstance(raw.get("basename"), str) and isinstance(raw.get("bytes"), int)
                and isinstance(info.get("samples"), int)):
            raise UserError(f"{where}: shard entry {number} lacks raw_data.basename, raw_data.bytes or samples")
        if raw["basename"].startswith("/") or ".." in raw["basename"].split("/"):
            raise UserError(f"{where}: shard entry {number} names a file outside the dataset: {raw['basename']!r}")
        if raw["bytes"] < 0 or info["samples"] < 0:
            raise UserError(f"{where}: shard entry {number} has a negative size or sample count")
    if not sum(info["samples"] for info in shards):
        raise UserError(f"{where}: lists no samples (an empty dataset); prepare the data with `regscale prepare`")
    return shards


def read_index(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The checked shard entries of a local dataset's index.json."""
    path = Path(root) / INDEX
    if not path.is_file():
        raise UserError(f"{root}: no {INDEX} (expected MDS shards written by `regscale prepare`)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ShardError(f"{path}: not a valid MDS index ({err}); rebuild it with `regscale prepare`") from None
    return index_shards(index, str(path))


def check_dataset(path: Optional[str], synthetic: int = 0) -> None:
    """data.path before any run directory is made (unless data.synthetic generates it): a local
    one has a sound index.json and every shard at its recorded size; a remote one answers with
    its index.json (network, credentials, the path itself)."""
    from regscale.config import is_remote

    if not path or synthetic:
        return
    if is_remote(path):
        from regscale.data.store import check_remote_index

        check_remote_index(path)
    else:
        check_shard_files(path)


def check_shard_files(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every shard the local index lists is present with its recorded size (cheap: stat only);
    returns the entries."""
    shards = read_index(root)
    hint = verify_hint(root)
    for info in shards:
        name, expected = info["raw_data"]["basename"], info["raw_data"]["bytes"]
        shard = Path(root) / name
        if not shard.is_file():
            raise ShardError(f"shard {name} of the dataset at {root} is missing; {hint}")
        size = shard.stat().st_size
        if size != expected:
            raise ShardError(f"shard {name} of the dataset at {root} is corrupted: {size} bytes, "
                            f"{INDEX} says {expected}; {hint}")
    return shards


def shard_problems(path: Path, info: dict[str, Any], algos: Optional[tuple[str, ...]] = None) -> list[str]:
    """Problems of one MDS shard file against its index entry ([] when it is sound): its size, its
    recorded hashes (those in `algos`; None: all), its sample count. Reads the whole file."""
    from streaming.base.hashing import get_hash

    raw = info["raw_data"]
    name = raw["basename"]
    if not path.is_file():
        return [f"{name}: missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != raw["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, index says {raw['bytes']}")
    for algo, expected in (raw.get("hashes") or {}).items():
        if (algos is None or algo in algos) and get_hash(algo, data) != expected:
            problems.append(f"{name}: {algo} hash mismatch")
    if len(data) >= 4 and int(np.frombuffer(data[:4], np.uint32)[0]) != info["samples"]:
        problems.append(f"{name}: header holds {int(np.frombuffer(data[:4], np.uint32)[0])} samples, "
                        f"index says {info['samples']}")
    return problems
