"""Samples/s per CPU core: our MDS TrainStream against a per-file loader (PNG + .npy, as upstream),
and (--remote) the same shards streamed from an S3-compatible server.

    .venv/bin/python bench/bench_data.py [--samples 1024] [--workers 1] [--batch 32] [--remote]

Builds one REG-layout source (256x256 PNGs + 8x32x32 .npy moments + dataset.json) under a temp
dir, prepares it as MDS shards (raw; with --webp also WebP-lossless), then reads one epoch with
each loader in its own child process and reports wall rate and samples per CPU-second (user+sys
of the loader and its DataLoader workers), which holds on a busy machine where wall time does
not. "cores/GPU" is what it takes to feed one H200 training SiT-XL/2 at 50% MFU: 0.5 x its peak
bf16 FLOP/s over the training FLOPs of one image (regscale.train.health), ~634 images/s.

--remote starts the tests' S3 server on 127.0.0.1 (moto's server, tests/fixtures/s3.py), prepares
the same source into a bucket (the same shards) and reads it with an empty node cache: every
shard is downloaded over HTTP, checked against its xxh64 and read ("from S3"); then with
data.cache_limit at a quarter of the dataset ("cache 1/4": with the default shuffle block, a
window larger than the dataset, most samples need their shard downloaded again), and with the
shuffle block the stream's warning advises for that cache. The server's own CPU is not counted
(it stands for the store).

The stream checks every shard's xxh64 once per process on first open (a shard changed in place
stops training before its samples are used). One epoch is read here, so every shard's check is
paid in full: the row "shard check off" is the same stream without it, and "check cost" is the
CPU share it adds (later epochs of a run pay nothing: the check is once per DataLoader worker).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from machine import cpu_name
from regscale.data.synthetic import synthetic_image

REPO = Path(__file__).resolve().parents[1]


def gpu_rate() -> tuple[float, float]:
    """(images/s, training FLOPs per image) of one H200 at 50% MFU on the SiT-XL/2 recipe."""
    from regscale.config import load_config
    from regscale.train.health import PEAK_FLOPS, train_flops_per_image

    flops = train_flops_per_image(load_config(REPO / "recipes" / "sit_xl_4m.yaml"))
    return 0.5 * PEAK_FLOPS["H200"] / flops, flops


def make_source(root: Path, n: int) -> None:
    """REG layout with textured 256x256 images (PNG sizes near ImageNet's, ~100-150 KiB)."""
    (root / "images" / "00000").mkdir(parents=True)
    (root / "vae-sd" / "00000").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        base = np.asarray(Image.fromarray(synthetic_image(i % 10, i, 10)).resize((256, 256), Image.BICUBIC), np.float32)
        image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / "00000" / f"img{i:08d}.png")
        name = f"00000/img-mean-std-{i:08d}.npy"
        np.save(root / "vae-sd" / name, rng.normal(size=(1, 8, 32, 32)).astype(np.float32))
        labels.append([name, i % 10])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))


class PerFile(torch.utils.data.Dataset):
    """The upstream way: one PNG and one .npy per sample."""

    def __init__(self, root: Path) -> None:
        self.images = sorted((root / "images").rglob("*.png"))
        self.moments = sorted((root / "vae-sd").rglob("*.npy"))
        labels = dict(json.loads((root / "vae-sd" / "dataset.json").read_text())["labels"])
        self.labels = [labels[str(p.relative_to(root / "vae-sd"))] for p in self.moments]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = np.asarray(Image.open(self.images[i]).convert("RGB")).transpose(2, 0, 1)
        return torch.from_numpy(image.copy()), torch.from_numpy(np.load(self.moments[i])[0]), self.labels[i]


def _read_per_file(root: str, workers: int, batch: int, n: int) -> None:
    loader = torch.utils.data.DataLoader(PerFile(Path(root)), batch_size=batch, num_workers=workers, shuffle=True,
                                         drop_last=True, multiprocessing_context="fork" if workers else None)
    assert sum(len(b[2]) for b in loader) == n - n % batch


def _read_stream(path: str, workers: int, batch: int, n: int, check_shards: bool = True, *overrides: str) -> None:
    from regscale.config import load_config
    from regscale.data import stream as module
    from regscale.data.stream import TrainStream

    if not check_shards:  # this child only: mark shards checked without reading them
        module._Samples.check_shard = lambda self, shard_id: self.checked_shards.add(shard_id)

    cfg = load_config(None, [f"data.path={path}", f"data.num_workers={workers}", "slurm.gpus_per_node=1", "run.name=b",
                             *overrides])
    stream = TrainStream(cfg.data, cfg.train, 0, 1, batch)
    it = iter(stream)
    for _ in range(n // (batch * max(1, workers)) * max(1, workers)):
        next(it)
    stream.loader._iterator._shutdown_workers()  # let the workers exit so their CPU time is counted


def _measure(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child and its workers) for fn(*args) in a fresh child."""
    def child() -> None:
        torch.set_num_threads(1)
        fn(*args)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.exitcode != 0:
        raise SystemExit(f"{fn.__name__} failed")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    from regscale.data.prepare import PrepareOptions, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--webp", action="store_true", help="also the WebP-lossless shards (slow to write)")
    parser.add_argument("--remote", action="store_true", help="also stream the raw shards from an S3 server")
    args = parser.parse_args()
    n = args.samples - args.samples % (args.batch * max(1, args.workers))
    rate, flops = gpu_rate()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        make_source(root / "src", n)
        png_kib = np.mean([p.stat().st_size for p in (root / "src" / "images").rglob("*.png")]) / 1024
        encodings = ("raw", "webp") if args.webp else ("raw",)
        # --remote: 16 shards, so that a quarter of the dataset holds the 4 that streaming needs at least
        chunk = max(1, n // 16) if args.remote else 4096
        for enc in encodings:
            prepare(str(root / "src"), str(root / enc), PrepareOptions(image_encoding=enc, chunk_size=chunk, progress=False))
        rows = [("per-file PNG + .npy", _measure(_read_per_file, str(root / "src"), args.workers, args.batch, n)),
                *[(f"TrainStream, {enc}", _measure(_read_stream, str(root / enc), args.workers, args.batch, n))
                  for enc in encodings],
                ("TrainStream, raw, shard check off",
                 _measure(_read_stream, str(root / "raw"), args.workers, args.batch, n, False))]
        sizes = {enc: sum(p.stat().st_size for p in (root / enc).rglob("*.mds")) / n / 1024 for enc in encodings}
        if args.remote:
            rows += _remote_rows(root, n, chunk, args.workers, args.batch)
    print(f"CPU: {cpu_name()}")
    print(f"{n} samples, batch {args.batch}, {args.workers} DataLoader worker(s), {os.cpu_count()} cores on this "
          f"machine, torch threads 1; PNG {png_kib:.0f} KiB/image; shards: "
          + ", ".join(f"{enc} {kib:.0f}" for enc, kib in sizes.items()) + " KiB/sample")
    print(f"one H200 at 50% MFU on SiT-XL/2 ({flops / 1e12:.3f} TFLOP per training image): {rate:.0f} images/s "
          "(the cores/GPU column)")
    print(f"{'loader':<38} {'wall s':>7} {'samples/s':>10} {'CPU s':>7} {'samples/CPU-s':>14} {'vs per-file':>12} "
          f"{'cores/GPU':>10}")
    base = n / rows[0][1][1]
    for name, (wall, cpu) in rows:
        per_core = n / cpu
        print(f"{name:<38} {wall:>7.2f} {n / wall:>10.0f} {cpu:>7.2f} {per_core:>14.0f} {per_core / base:>11.1f}x "
              f"{rate / per_core:>10.2f}")
    checked = rows[1][1][1]
    unchecked = next(cpu for name, (_, cpu) in rows if name.endswith("check off"))
    print(f"shard check cost (first epoch, every shard hashed once per worker): {checked - unchecked:+.2f} CPU s, "
          f"{checked / unchecked:.3f}x the stream's CPU time without it")


def _remote_rows(root: Path, n: int, chunk: int, workers: int, batch: int) -> list[tuple[str, tuple[float, float]]]:
    """The raw shards prepared into a bucket of the tests' S3 server and streamed with an empty
    cache, unbounded and bounded to a quarter of the dataset."""
    import sys

    from regscale.data.prepare import PrepareOptions, prepare
    from regscale.data.stream import PY1E_SPREAD

    sys.path.insert(0, str(REPO))
    from tests.fixtures.s3 import S3Server

    (root / "s3").mkdir()
    server = S3Server(root / "s3")
    server.start()
    try:
        os.environ.update(server.env)
        uri = f"s3://{server.new_bucket('bench')}/raw"
        prepare(str(root / "src"), uri, PrepareOptions(chunk_size=chunk, progress=False, stage=str(root / "stage")))
        quarter = sum(p.stat().st_size for p in (root / "raw").rglob("*.mds")) // 4
        block = int(chunk * (4 - 2) / PY1E_SPREAD)  # what the stream's warning advises for 4 shards in the cache
        return [(name, _measure(_read_stream, uri, workers, batch, n, True, f"data.local_cache={root / cache}", *extra))
                for name, cache, extra in (
                    ("TrainStream, raw, from S3", "c1", ()),
                    ("TrainStream, raw, from S3, cache 1/4", "c2", (f"data.cache_limit={quarter}",)),
                    (f"  same, data.shuffle_block_size={block}", "c3",
                     (f"data.cache_limit={quarter}", f"data.shuffle_block_size={block}")))]
    finally:
        server.stop()


if __name__ == "__main__":
    main()
