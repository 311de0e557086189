"""`regscale prepare SRC OUT`: images -> ADM crop -> SD-VAE moments -> MDS shards, resumably.

The sorted source is cut into chunks of `chunk_size` samples. Each chunk is an MDS sub-dataset
`OUT/chunk-NNNNNN/` written in `OUT/.tmp/` and renamed into place when complete (its chunk.json,
with the chunk's counts and skipped files, comes last), so a killed run leaves no half chunk and
a rerun does only the missing ones: no duplicate, no hole. Chunks are dealt round-robin to parts
(`--part i/n`, or the SLURM array index) and within a part to `--workers` processes. Whoever
finds every chunk done merges the chunk indexes (streaming's merge_index) into OUT/index.json and
writes classes.json and summary.json.

A remote OUT (s3://, gs://, ...) is the truth: a chunk is written in the local stage's `.tmp/`,
uploaded (shards and index, then chunk.json) and removed; what is done is what the store lists.
So a rerun after a kill mid-upload redoes exactly the chunks without a chunk.json in the store,
and a stage left over from another run (a bucket since emptied, another dataset) changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from regscale.data.images import UnreadableImage, load_image
from regscale.data.shards import (CLASSES, HASHES, IMAGE_ENCODINGS, INDEX, MANIFEST, MOMENTS_SHAPE, SHARD_SIZE_LIMIT,
                                  SUMMARY, columns, encode_image)
from regscale.data.source import Source, scan_source
from regscale.data.store import Store, chunk_name
from regscale.errors import UserError
from regscale.fsutil import write_atomic

FORMAT_VERSION = 1
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


@dataclass
class PrepareOptions:
    vae: Optional[str] = None  # diffusers AutoencoderKL folder or cached Hub id; None: sd-vae-ft-mse
    random_vae: bool = False  # tests and smoke only: a tiny random AutoencoderKL
    image_encoding: str = "raw"
    chunk_size: int = 2048
    batch_size: int = 32  # images per VAE call
    part: tuple[int, int] = (0, 1)
    workers: int = 1
    device: Optional[str] = None  # None: cuda when available
    stage: Optional[str] = None  # local staging directory for a remote OUT
    progress: bool = True


@dataclass
class Summary:
    complete: bool
    samples: int = 0
    chunks_done: int = 0
    chunks: int = 0
    bytes: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def part_from_env() -> tuple[int, int]:
    """(index, count) of this SLURM array task, or (0, 1) outside an array job."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ or "SLURM_ARRAY_TASK_COUNT" not in os.environ:
        return 0, 1
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
    try:
        task, count, first = (int(os.environ.get(name, "0")) for name in names)
    except ValueError:
        shown = ", ".join(f"{n}={os.environ.get(n)!r}" for n in names)
        raise UserError(f"the SLURM array variables are not integers ({shown}); pass --part i/n") from None
    if not 0 <= task - first < count:
        shown = ", ".join(f"{n}={os.environ.get(n)}" for n in names)
        raise UserError(f"the SLURM array variables do not name a task of the array ({shown}); pass --part i/n")
    return task - first, count


def _manifest(source: Source, opts: PrepareOptions) -> dict[str, Any]:
    vae = "random" if opts.random_vae else (opts.vae or DEFAULT_VAE)
    return {"format": FORMAT_VERSION, "source_kind": source.kind, "fingerprint": source.fingerprint(),
            "num_samples": len(source.samples), "num_classes": len(source.classes),
            "chunk_size": opts.chunk_size, "image_encoding": opts.image_encoding,
            "moments": "from vae-sd/*.npy" if source.kind == "reg" else vae}


def _check_out(store: Store, manifest: dict[str, Any]) -> bool:
    """True when OUT is empty (to be claimed); raises unless OUT holds this very dataset."""
    found = store.read_json(MANIFEST)
    if found is None and store.is_empty():
        return True
    found = found or store.read_json(MANIFEST)  # another part may have claimed OUT meanwhile
    if not isinstance(found, dict):
        raise UserError(f"{store.out} is not empty and was not written by `regscale prepare` "
                        f"(no {MANIFEST}); choose an empty or new OUT")
    differs = [k for k in manifest if found.get(k) != manifest[k]]
    if differs:
        detail = ", ".join(f"{k}: {found.get(k)!r} there, {manifest[k]!r} now" for k in differs)
        raise UserError(f"{store.out} already holds a different dataset ({detail}); choose another OUT, "
                        "or delete it to start over")
    return False


def _claim_out(store: Store, manifest: dict[str, Any]) -> None:
    """Write the manifest into an empty OUT, or check that OUT holds this very dataset."""
    if _check_out(store, manifest):
        store.write_json(MANIFEST, manifest)  # parts starting together all write the same file


def _load_vae(opts: PrepareOptions, worker: int) -> tuple[Any, Any]:
    import torch

    from regscale.models.encoders import load_vae

    if opts.device:
        device = torch.device(opts.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", worker % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    vae = load_vae(opts.vae or DEFAULT_VAE, random_init=opts.random_vae).to(device)
    return vae, device


def _moments_from_npy(path: Path) -> np.ndarray:
    arr = np.load(path)
    if arr.size != int(np.prod(MOMENTS_SHAPE)):
        raise ValueError(f"expected {int(np.prod(MOMENTS_SHAPE))} values (8x32x32 moments), got shape {arr.shape}")
    return arr.reshape(MOMENTS_SHAPE).astype(np.float32)


def _write_chunk(source: Source, chunk: int, store: Store, opts: PrepareOptions, vae: Any, report: Any) -> None:
    """Encode one chunk into OUT/.tmp/<unique>/, then publish it whole: renamed to OUT/chunk-NNNNNN,
    or uploaded there (chunk.json last) for a remote OUT."""
    import torch
    from streaming import MDSWriter

    from regscale.models.encoders import encode_moments

    first = chunk * opts.chunk_size
    indices = range(first, min(first + opts.chunk_size, len(source.samples)))
    if store.remote is None:
        tmp = store.local / ".tmp" / f"{chunk_name(chunk)}.{socket.gethostname()}.{os.getpid()}"
    else:
        tmp = store.upload_dir() / chunk_name(chunk)
    shutil.rmtree(tmp, ignore_errors=True)
    skipped: list[dict[str, str]] = []
    per_class: dict[str, int] = {}
    with MDSWriter(out=str(tmp), columns=columns(opts.image_encoding), hashes=HASHES,
                   size_limit=SHARD_SIZE_LIMIT, exist_ok=True) as writer:
        for start in range(indices.start, indices.stop, opts.batch_size):
            batch: list[tuple[int, np.ndarray, Optional[np.ndarray]]] = []
            for i in range(start, min(start + opts.batch_size, indices.stop)):
                sample = source.samples[i]
                try:
                    image = load_image(source.root / sample.path)
                    moments = _moments_from_npy(source.root / sample.moments) if sample.moments else None
                except (UnreadableImage, OSError, ValueError) as err:
                    skipped.append({"path": sample.path, "error": str(err).replace(str(source.root) + "/", "")})
                    continue
                batch.append((i, image, moments))
            if batch and vae is not None:
                images = torch.from_numpy(np.stack([b[1] for b in batch]))
                mean, std = encode_moments(vae, images)
                moments_all = torch.cat([mean, std], dim=1).cpu().numpy()
                batch = [(i, img, moments_all[k]) for k, (i, img, _) in enumerate(batch)]
            for i, image, moments in batch:
                label = source.samples[i].label
                writer.write({"image": encode_image(image, opts.image_encoding), "moments": moments,
                              "label": label, "index": i})
                per_class[str(label)] = per_class.get(str(label), 0) + 1
            report(min(start + opts.batch_size, indices.stop) - start)
    nbytes = sum(p.stat().st_size for p in tmp.glob("*.mds"))
    written = sum(per_class.values())
    write_atomic(tmp / "chunk.json", json.dumps(
        {"chunk": chunk, "first": indices.start, "stop": indices.stop, "samples": written,
         "bytes": nbytes, "per_class": per_class, "skipped": skipped}, indent=1) + "\n")
    if store.remote is not None:  # shards and index first, chunk.json (the completion mark) last
        names = sorted(n for n in os.listdir(tmp) if n != "chunk.json")
        store.publish([f"{tmp.name}/{name}" for name in [*names, "chunk.json"]])
        shutil.rmtree(tmp, ignore_errors=True)
        store.tidy()
        return
    try:
        os.rename(tmp, store.local / chunk_name(chunk))
    except OSError:  # another process finished the same chunk first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _clean_own_tmp(store: Store) -> None:
    """Remove this host's temporary chunks and folders whose writer process is gone (a killed run)."""
    host = socket.gethostname()
    for tmp in (store.local / ".tmp").glob(f"*.{host}.*"):
        pid = int(tmp.name.rsplit(".", 1)[1])
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_worker(src: str, out: str, opts: PrepareOptions, chunks: list[int], worker: int, queue: Any) -> None:
    """Process entry of one local worker: its own VAE, its share of the chunks, progress to queue."""
    import torch

    try:
        threads = max(1, (os.cpu_count() or 1) // max(1, opts.workers))
        torch.set_num_threads(threads)
        source, store = scan_source(src), Store(out, opts.stage)
        vae = _load_vae(opts, worker)[0] if source.kind == "imagefolder" else None
        for chunk in chunks:
            _write_chunk(source, chunk, store, opts, vae, lambda n: queue.put(("n", n)))
        queue.put(("done", worker))
    except UserError as err:
        queue.put(("error", str(err)))
    except Exception as err:  # report, never hang the parent
        queue.put(("error", f"worker {worker}: {type(err).__name__}: {err}"))


class Progress:
    """A rich bar (count, rate, ETA) on a terminal; a line every 30 s otherwise (SLURM logs)."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.total, self.done, self.label, self.enabled = total, 0, label, enabled
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(label, total=total, rate="-")
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        rate = self.done / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")
        elif self.enabled and (now - self.last > 30 or self.done == self.total):
            self.last = now
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.label}: {self.done}/{self.total} images, {rate:.1f} img/s, ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _run_chunks(src: str, out: str, source: Source, store: Store, opts: PrepareOptions, todo: list[int],
                vae: Any) -> None:
    """Write the chunks in `todo`: here with `vae` (one worker), or in --workers processes."""
    total = sum(min(opts.chunk_size, len(source.samples) - c * opts.chunk_size) for c in todo)
    progress = Progress(total, opts.progress, f"prepare part {opts.part[0]}/{opts.part[1]}")
    try:
        if opts.workers <= 1:
            for chunk in todo:
                _write_chunk(source, chunk, store, opts, vae, progress.advance)
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_run_worker, args=(src, out, opts, todo[w::opts.workers], w, queue), daemon=True)
                 for w in range(opts.workers)]
        for p in procs:
            p.start()
        running = len(procs)
        while running:
            try:
                kind, value = queue.get(timeout=5)
            except Exception:
                if not any(p.is_alive() for p in procs):
                    raise UserError("prepare: a worker process died without reporting; rerun to resume") from None
                continue
            if kind == "n":
                progress.advance(value)
            elif kind == "done":
                running -= 1
            else:
                for p in procs:
                    p.terminate()
                raise UserError(value)
        for p in procs:
            p.join()
    finally:
        progress.close()


def _merge(store: Store, num_chunks: int) -> None:
    """OUT/index.json listing every chunk's shards (streaming's merge_index; for a remote OUT over
    the chunk indexes downloaded from the store, and uploaded there)."""
    from streaming.base.util import merge_index

    if store.remote is None:
        merge_index([str(store.local / chunk_name(c) / INDEX) for c in range(num_chunks)], str(store.local),
                    keep_local=True)
        return
    with store.scratch() as folder:
        for c in range(num_chunks):
            data = store.read_bytes(f"{chunk_name(c)}/{INDEX}")
            if data is None:
                raise UserError(f"{store.uri(chunk_name(c))}/{INDEX}: missing; rerun prepare to rebuild that chunk")
            write_atomic(folder / chunk_name(c) / INDEX, data)
        merge_index([str(folder / chunk_name(c) / INDEX) for c in range(num_chunks)], str(folder), keep_local=True)
        store.write(INDEX, (folder / INDEX).read_bytes())


def _finalize(store: Store, source: Source, num_chunks: int, opts: PrepareOptions) -> Summary:
    """Merge the chunk indexes into OUT/index.json and write classes.json and summary.json."""
    summary = Summary(complete=True, chunks_done=num_chunks, chunks=num_chunks)
    per_class = [0] * len(source.classes)
    for chunk in range(num_chunks):
        info = store.read_json(f"{chunk_name(chunk)}/chunk.json")
        if info is None:
            raise UserError(f"{store.out}: {chunk_name(chunk)}/chunk.json vanished while finishing; rerun prepare")
        summary.samples += info["samples"]
        summary.bytes += info["bytes"]
        summary.skipped += info["skipped"]
        for label, n in info["per_class"].items():
            per_class[int(label)] += n
    if not summary.samples:
        raise UserError(f"{source.root}: none of its {len(source.samples)} images could be read (each is listed "
                        f"with its error in {store.out}/chunk-*/chunk.json); nothing to train on")
    summary.per_class = {name: n for name, n in zip(source.classes, per_class)}
    logging.disable(logging.WARNING)  # merge_index chats about temp folders and non-empty dirs
    try:
        _merge(store, num_chunks)
    finally:
        logging.disable(logging.NOTSET)
    store.write_json(CLASSES, {"classes": source.classes, "count": per_class})
    store.write_json(SUMMARY, {**asdict(summary), "image_encoding": opts.image_encoding,
                               "source": str(source.root), "fingerprint": source.fingerprint()})
    if store.remote is None:
        shutil.rmtree(store.local / ".tmp", ignore_errors=True)
    return summary


def prepare(src: str, out: str, opts: PrepareOptions) -> Summary:
    """Prepare (or resume preparing) this part of SRC into OUT; finalize when every chunk is done."""
    if opts.image_encoding not in IMAGE_ENCODINGS:
        raise UserError(f"--image-encoding must be one of {', '.join(IMAGE_ENCODINGS)}; got {opts.image_encoding!r}")
    if opts.chunk_size < 1 or opts.batch_size < 1 or opts.workers < 1:
        raise UserError("--chunk-size, --batch-size and --workers must be >= 1")
    index, count = opts.part
    if not 0 <= index < count:
        raise UserError(f"--part {index}/{count}: expected i/n with 0 <= i < n")
    source = scan_source(src)
    store = Store(out, opts.stage)
    manifest = _manifest(source, opts)
    _check_out(store, manifest)
    num_chunks = -(-len(source.samples) // opts.chunk_size)
    done = store.done_chunks()
    todo = [c for c in range(index, num_chunks, count) if c not in done]
    # the VAE loads (or fails) before OUT is claimed for it; worker processes load their own
    vae = _load_vae(opts, 0)[0] if source.kind == "imagefolder" and todo else None
    if opts.workers > 1:
        vae = None
    _claim_out(store, manifest)
    _clean_own_tmp(store)
    if todo:
        _run_chunks(src, out, source, store, opts, todo, vae)
    done = store.done_chunks()
    if len(done) < num_chunks:
        return Summary(complete=False, chunks_done=len(done), chunks=num_chunks)
    saved = None if todo else store.read_json(SUMMARY)
    if saved is not None:
        return Summary(**{k: saved[k] for k in Summary.__dataclass_fields__})
    return _finalize(store, source, num_chunks, opts)
