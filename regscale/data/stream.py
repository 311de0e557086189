"""The training stream: MDS shards -> per-rank batches of tensors, resumable mid-epoch.

A `StreamingDataset` partitions each epoch over ranks and DataLoader workers (each sample once per
epoch), shuffles across shards from `train.seed`, and downloads remote shards ahead of use.
`state_dict()` records (epoch, samples consumed in the epoch) for the checkpoint; `load_state_dict`
makes the next iteration start exactly after them, also when the number of ranks changed
(streaming keeps the global order fixed by its canonical nodes and re-splits the rest).

Batches: {"image": uint8 [b,3,256,256], "moments": float32 [b,8,32,32], "label": int64 [b],
"index": int64 [b] (position in the sorted source)}. Full batches only: when the dataset size is
not a multiple of world_size x num_workers x batch_size, the remainder is left out of that epoch
(a different remainder each epoch, the order being reshuffled).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataloader import StreamingDataLoader

from regscale.config import Config, is_remote
from regscale.data import shm
from regscale.data.shards import IMAGE_SHAPE, MOMENTS_SHAPE, decode_image
from regscale.errors import UserError


class ShardError(UserError):
    """A shard that is missing, truncated or unreadable at training time."""


def _verify_hint(path: str) -> str:
    return f"check the dataset with `regscale prepare --verify {path}`"


def preflight_local(path: str) -> None:
    """Every shard index.json lists is present with its recorded size (cheap: stat only)."""
    root = Path(path)
    index_file = root / "index.json"
    if not index_file.is_file():
        raise UserError(f"data.path {path}: no index.json (expected MDS shards written by `regscale prepare`)")
    try:
        shards = json.loads(index_file.read_text())["shards"]
    except (ValueError, KeyError) as err:
        raise ShardError(f"{index_file}: not a valid MDS index ({err}); {_verify_hint(path)}") from None
    for info in shards:
        raw = info["raw_data"]
        shard = root / raw["basename"]
        if not shard.is_file():
            raise ShardError(f"shard {raw['basename']} of the dataset at {path} is missing; {_verify_hint(path)}")
        size = shard.stat().st_size
        if size != raw["bytes"]:
            raise ShardError(f"shard {raw['basename']} of the dataset at {path} is corrupted: {size} bytes, "
                             f"index.json says {raw['bytes']}; {_verify_hint(path)}")


class _Samples(StreamingDataset):
    """StreamingDataset yielding numpy samples; shard failures become `ShardError`s naming the shard."""

    def __init__(self, *, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        self.thread_error: Optional[BaseException] = None

    def _shard_name(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        return self.shards[shard_id].raw_data.basename

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray]:
        try:
            raw = super().get_item(sample_id, retry)
            image = decode_image(raw["image"])
            moments = np.asarray(raw["moments"], dtype=np.float32)
            if image.shape != IMAGE_SHAPE or moments.shape != MOMENTS_SHAPE:
                raise ValueError(f"sample shapes {image.shape}, {moments.shape}")
        except Exception as err:
            raise ShardError(f"shard {self._shard_name(sample_id)} of the dataset at {self.where} is unreadable "
                             f"({type(err).__name__}: {err}); {_verify_hint(self.where)}") from None
        return {"image": image, "moments": moments, "label": np.int64(raw["label"]),
                "index": np.int64(raw["index"])}

    def on_exception(self, future: Any) -> None:
        self.thread_error = self.thread_error or future.exception()
        super().on_exception(future)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from super().__iter__()
        if self.thread_error is not None:  # streaming ends the epoch early on a download failure
            err = self.thread_error
            raise ShardError(f"reading a shard of the dataset at {self.where} failed ({type(err).__name__}: "
                             f"{err}); {_verify_hint(self.where)}")


def _collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process (it saves at a step boundary, then
    shuts them down); by default a terminal's SIGINT would kill them mid-epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_context(num_workers: int) -> Optional[str]:
    """Fork DataLoader workers where possible (cheap: no re-import of torch), also when this
    process was itself spawned, whose default would be to spawn them too."""
    import multiprocessing as mp

    return "fork" if num_workers > 0 and "fork" in mp.get_all_start_methods() else None


def _host_layout(rank: int, world_size: int) -> tuple[int, int]:
    """(local rank, ranks per host) from the hostnames of all ranks. Streaming's "node" is what
    shares /dev/shm, i.e. a host, whatever SLURM calls a node (a test cluster may fake several)."""
    from regscale import dist

    if world_size == 1:
        return 0, 1
    hosts = dist.host_layout()
    if not hosts.contiguous:
        raise UserError(f"ranks must be laid out in equal contiguous blocks per host for streaming; "
                        f"got {list(hosts.hosts)}")
    return hosts.local_rank, hosts.local_world_size


@contextlib.contextmanager
def _world_env(rank: int, world_size: int, local_rank: int, local_world: int) -> Iterator[None]:
    """Streaming reads the world from the environment: make it say what the caller says, meanwhile."""
    wanted = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(local_world),
              "LOCAL_RANK": str(local_rank)}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class TrainStream:
    """Per-rank batches over the prepared shards at cfg.data.path; see the module docstring."""

    def __init__(self, cfg: Config, rank: int, world_size: int, batch_size: int) -> None:
        path = cfg.data.path
        if path is None:
            raise UserError("'data.path' is required: a directory of MDS shards or a remote URI")
        self.path, self.rank, self.world_size, self.batch_size = path, rank, world_size, batch_size
        self.resume_note: Optional[str] = None
        if is_remote(path):
            remote = path
            digest = hashlib.sha256(path.encode()).hexdigest()[:12]
            local = cfg.data.local_cache or str(Path(tempfile.gettempdir()) / f"regscale-cache-{digest}")
        else:
            preflight_local(path)
            remote, local = None, path
        local = os.path.abspath(local)
        options = dict(where=path, remote=remote, local=local, shuffle=cfg.data.shuffle, shuffle_seed=cfg.train.seed,
                       shuffle_block_size=cfg.data.shuffle_block_size, batch_size=batch_size,
                       validate_hash="xxh64" if remote else None, download_retry=2)
        self._lock_fd: Optional[int] = None
        import torch.distributed as dist

        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise UserError("TrainStream with world_size > 1 needs torch.distributed initialised first")
        self._world = (rank, world_size, *_host_layout(rank, world_size))
        with _world_env(*self._world):
            self._open(options, first_on_host=self._world[2] == 0)
        self.loader = StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=cfg.data.num_workers,
                                          collate_fn=_collate, drop_last=True, pin_memory=torch.cuda.is_available(),
                                          persistent_workers=cfg.data.num_workers > 0,
                                          multiprocessing_context=_worker_context(cfg.data.num_workers),
                                          worker_init_fn=_ignore_interrupts)

    def _open(self, options: dict[str, Any], first_on_host: bool) -> None:
        """Create the StreamingDataset. The host's first rank removes dead runs' shared memory
        first, and every rank waits for that before streaming looks for a free prefix."""
        import torch.distributed as dist

        if first_on_host:
            shm.clean_stale([options["local"]])
        if self.world_size > 1:
            dist.barrier()
        try:
            self.dataset = _Samples(**options)
        except (FileNotFoundError, RuntimeError, ValueError) as err:
            raise ShardError(f"cannot open the dataset at {self.path} ({type(err).__name__}: {err}); "
                             f"{_verify_hint(self.path)}") from None
        self._lock_fd = shm.hold_prefix(self.dataset._shm_prefix_int)

    @property
    def num_samples(self) -> int:
        """Samples in the dataset."""
        return self.dataset.num_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch; the first one resumes where `load_state_dict` says."""
        while True:
            yielded = False
            for batch in self._epoch():
                yielded = True
                yield batch
            if not yielded and self.num_samples < self.world_size * self.batch_size:
                raise UserError(f"the dataset at {self.path} has {self.num_samples} samples: fewer than one "
                                f"global batch ({self.world_size} ranks x {self.batch_size})")

    def _epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            yield from self.loader
        except UserError as err:  # raised in a worker: DataLoader wraps it with the worker's traceback
            last = str(err).strip().splitlines()[-1]
            raise ShardError(last.split(": ", 1)[1] if "Error: " in last else last) from None

    def state_dict(self) -> dict[str, Any]:
        """Where this stream is: epoch and samples consumed in it (all ranks), plus the world it ran on."""
        with _world_env(*self._world):
            state = dict(self.loader.state_dict() or {})
        return {"streaming": state, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the samples `state` counts; call before iterating. Says what changed."""
        if state.get("num_samples") != self.num_samples:
            raise UserError(f"the data stream state was saved on a dataset of {state.get('num_samples')} samples, "
                            f"but {self.path} holds {self.num_samples}: not the same dataset")
        s = state["streaming"]
        changes = []
        if state["world_size"] != self.world_size:
            changes.append(f"world size {state['world_size']} -> {self.world_size}")
        if state["batch_size"] != self.batch_size:
            changes.append(f"per-rank batch {state['batch_size']} -> {self.batch_size}")
        self.resume_note = (f"data stream resumes at epoch {s['epoch']}, sample {s['sample_in_epoch']}"
                            + (f"; {', '.join(changes)}: streaming re-partitions the rest of the epoch over "
                               f"the new ranks (same global order, from {s['num_canonical_nodes']} canonical nodes)"
                               if changes else ""))
        if self.rank == 0:
            print(self.resume_note, file=sys.stderr)
        self.loader.load_state_dict(s)

    def close(self) -> None:
        """Release the shared-memory claim (also done by the OS when the process exits)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
