"""Distributed, resumable sampling into an ADM-format samples .npz.

Sample i has label labels[i] and seed `sample_seed(eval.seed, i)`; the labels depend only on
(eval.seed, eval.labels, N, num_classes). So which rank or batch draws a sample changes nothing.
The indices still missing are cut into chunks of `eval.batch_size` and dealt round-robin to the
ranks; every chunk lands in `shards/<start>_<stop>.npz` (uint8 NHWC + labels) by atomic rename,
so a preempted job resumes from the shards it has, with any world size or batch size. Once all N
are there, rank 0 streams them into `samples.npz` (`arr_0` images, `arr_1` labels) and removes
the shards. `shards/sampling.json` pins the settings; shards sampled otherwise are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from regscale.config import Config
from regscale.errors import UserError
from regscale.eval.npz import NpzArray, npz_members, write_npz
from regscale.fsutil import write_atomic
from regscale.rundir import EVAL_SAMPLES, EVAL_SHARDS
from regscale.track import progress as track_progress

SETTINGS = "sampling.json"
SETTINGS_BEFORE_KEYS = {"precision": "fp32"}  # what shards pinned before a key existed were drawn with
_SHARD = re.compile(r"^(\d{8})_(\d{8})\.npz$")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` (distinct across eval.seed values for up to 2^32 samples)."""
    return (seed << 32) + index


def make_labels(n: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """int64 [n]: `uniform` draws each label independently; `balanced` gives every class
    n / num_classes samples (+-1), in a seeded random order."""
    rng = np.random.default_rng([seed, 0x1ABE1])
    if mode == "uniform":
        return rng.integers(0, num_classes, size=n, dtype=np.int64)
    if mode == "balanced":
        return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
    raise UserError(f"'eval.labels' must be uniform or balanced; got {mode!r}")


def sampling_settings(cfg: Config, weights_id: str) -> dict[str, Any]:
    """What determines the samples: shards written under other settings cannot be mixed in."""
    ev = cfg.eval
    return {"weights": weights_id, "num_samples": ev.num_samples, "seed": ev.seed, "labels": ev.labels,
            "num_classes": cfg.model.num_classes, "sampler": ev.sampler, "steps": ev.steps,
            "cfg_scale": ev.cfg_scale, "cls_cfg_scale": ev.cls_cfg_scale, "guidance_low": ev.guidance_low,
            "guidance_high": ev.guidance_high, "precision": ev.precision, "vae_decoder": cfg.vae.decoder,
            "vae_random_init": cfg.vae.random_init, "tf32": cfg.train.tf32}


def _shard_path(shard_dir: Path, start: int, stop: int) -> Path:
    return shard_dir / f"{start:08d}_{stop:08d}.npz"


def _valid_shard(path: Path, rows: int) -> bool:
    try:
        arr = NpzArray(path, "images")
        return len(arr) == rows and arr.dtype == np.uint8 and len(arr.shape) == 4 and arr.shape[3] == 3
    except Exception:  # a torn or foreign file: it is re-sampled
        return False


def existing_shards(shard_dir: Path) -> list[tuple[int, int]]:
    """Complete shards as sorted (start, stop); broken ones are deleted (they will be redone)."""
    found = []
    for path in sorted(shard_dir.glob("*.npz")):
        m = _SHARD.match(path.name)
        if not m:
            continue
        start, stop = int(m[1]), int(m[2])
        if stop > start and _valid_shard(path, stop - start):
            found.append((start, stop))
        else:
            print(f"sampling: shard {path} is incomplete or unreadable; sampling it again", flush=True)
            path.unlink(missing_ok=True)
    return found


def pending_chunks(done: list[tuple[int, int]], n: int, batch_size: int) -> list[tuple[int, int]]:
    """The indices in [0, n) no shard covers, cut into chunks of at most batch_size."""
    covered = np.zeros(n, dtype=bool)
    for start, stop in done:
        covered[start:min(stop, n)] = True
    chunks, i = [], 0
    while i < n:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < n and not covered[j] and j - i < batch_size:
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


def _check_settings(shard_dir: Path, settings: dict[str, Any]) -> None:
    path = shard_dir / SETTINGS
    if path.is_file():
        old = {**SETTINGS_BEFORE_KEYS, **json.loads(path.read_text())}
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"{shard_dir}: holds samples drawn with other settings ({what}); "
                            "use another output directory or delete it")
    else:
        write_atomic(path, json.dumps(settings, indent=2, sort_keys=True))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_main(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 and hand its result (or its UserError) to every rank."""
    rank, world = _rank_world()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as err:
            box[0] = ("error", str(err))
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def samples_complete(npz: Path, n: int) -> bool:
    """True when `npz` holds at least n samples (a finished earlier run)."""
    if not npz.is_file():
        return False
    try:
        return "arr_0" in npz_members(npz) and len(NpzArray(npz, "arr_0")) >= n
    except UserError:
        return False


def generate(model: torch.nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], cfg: Config,
             out_dir: Path, weights_id: str, device: torch.device | str = "cpu",
             log: Optional[Callable[[str], None]] = print) -> Path:
    """Sample eval.num_samples images on all ranks into out_dir/samples.npz and return its path.

    decode: scaled latents [B,4,32,32] -> uint8 [B,3,H,W] (the SD-VAE decoder)."""
    ev = cfg.eval
    n = ev.num_samples
    out_dir = Path(out_dir)
    npz, shard_dir = out_dir / EVAL_SAMPLES, out_dir / EVAL_SHARDS
    rank, world = _rank_world()
    settings = sampling_settings(cfg, weights_id)

    def plan() -> list[tuple[int, int]]:
        _check_settings(shard_dir, settings)
        if samples_complete(npz, n):
            return []
        return pending_chunks(existing_shards(shard_dir), n, ev.batch_size)

    chunks = _on_main(plan)
    labels = make_labels(n, cfg.model.num_classes, ev.labels, ev.seed)
    if rank == 0 and log and chunks:
        todo = sum(b - a for a, b in chunks)
        log(f"sampling: {todo} of {n} samples to draw ({n - todo} found in {shard_dir}), "
            f"{len(chunks)} batches over {world} rank(s)")
    model.eval()
    # TF32 matmuls while sampling, as the upstream sampling script does by default (train.tf32)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    try:
        _draw(model, decode, cfg, labels, chunks[rank::world], shard_dir, device, progress=rank == 0 and log is not None)
    except KeyboardInterrupt:
        if rank == 0 and log:
            kept = sum(b - a for a, b in existing_shards(shard_dir))
            log(f"sampling: interrupted; {kept} of {n} samples are kept in {shard_dir}: "
                f"the same command goes on from them")
        raise
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    if world > 1:
        dist.barrier()
    _on_main(lambda: _assemble(shard_dir, npz, n, labels))
    return npz


def _draw(model: torch.nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], cfg: Config,
          labels: np.ndarray, chunks: list[tuple[int, int]], shard_dir: Path, device: torch.device | str,
          progress: bool = False) -> None:
    """Sample, decode and write this rank's chunks, one shard each."""
    from tqdm.auto import tqdm

    from regscale.sampling import sample

    ev = cfg.eval
    for i, (start, stop) in enumerate(tqdm(chunks, desc="sampling (rank 0's batches)", disable=not progress,
                                           mininterval=30)):
        y = torch.from_numpy(labels[start:stop]).to(device)
        seeds = [sample_seed(ev.seed, i) for i in range(start, stop)]
        latents, _ = sample(model, y, seeds, sampler=ev.sampler, steps=ev.steps, cfg_scale=ev.cfg_scale,
                            cls_cfg_scale=ev.cls_cfg_scale, guidance_low=ev.guidance_low,
                            guidance_high=ev.guidance_high, precision=ev.precision)
        images = decode(latents).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        path = _shard_path(shard_dir, start, stop)
        write_npz(path, {"images": (images.shape, np.uint8, [images]),
                         "labels": ((stop - start,), np.int64, [labels[start:stop]])})
        track_progress.report("sampling", i + 1, len(chunks), "batches (rank 0)")


def _assemble(shard_dir: Path, npz: Path, n: int, labels: np.ndarray) -> None:
    """Stream the shards into samples.npz in index order, then drop them."""
    if samples_complete(npz, n):
        return
    shards = existing_shards(shard_dir)
    covered = pending_chunks(shards, n, n)
    if covered:
        raise UserError(f"{shard_dir}: samples {covered[0][0]}..{covered[0][1] - 1} are missing after "
                        "sampling (a rank failed?); run again to draw them")
    first = NpzArray(_shard_path(shard_dir, *shards[0]), "images")

    def rows():
        pos = 0
        for start, stop in shards:
            if stop <= pos or pos >= n:
                continue
            part = NpzArray(_shard_path(shard_dir, start, stop), "images").read(pos - start, min(stop, n) - start)
            pos += len(part)
            yield part

    write_npz(npz, {"arr_0": ((n,) + first.shape[1:], np.uint8, rows()),
                    "arr_1": ((n,), np.int64, [labels])})
    for start, stop in shards:
        _shard_path(shard_dir, start, stop).unlink(missing_ok=True)
