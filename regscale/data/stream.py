"""The training stream: MDS shards -> per-rank batches of tensors, resumable mid-epoch.

A `StreamingDataset` partitions each epoch over ranks and DataLoader workers (each sample once per
epoch), shuffles across shards from `train.seed`, and downloads remote shards ahead of use.
`state_dict()` records (epoch, samples consumed in the epoch) for the checkpoint; `load_state_dict`
makes the next iteration start exactly after them, also when the number of ranks changed
(streaming keeps the global order fixed by its canonical nodes and re-splits the rest).

Batches: {"image": uint8 [b,3,256,256], "moments": float32 [b,8,32,32], "label": int64 [b],
"index": int64 [b] (position in the sorted source)}. Whole global batches only: every epoch has
num_samples // train.batch_size steps whatever the world size, the remainder being left out of
that epoch (a different remainder each epoch, the order being reshuffled). Step k of an epoch is
then the same global batch on any number of ranks: positions [k G, (k + 1) G) of the epoch's
global order, which the canonical nodes fix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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

from regscale.config import DataConfig, TrainConfig, is_remote
from regscale.data import shm
from regscale.data.store import remote_failure
from regscale.data.shards import (CHEAP_HASH, IMAGE_SHAPE, MOMENTS_SHAPE, ShardError, check_shard_files, decode_image,
                                  shard_problems, verify_hint)
from regscale.errors import UserError


class _Samples(StreamingDataset):
    """StreamingDataset yielding numpy samples; shard failures become `ShardError`s naming the shard."""

    def __init__(self, *, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        self.thread_error: Optional[BaseException] = None
        self.checked_shards: set[int] = set()  # per process: DataLoader workers keep their own

    def check_shard(self, shard_id: int) -> None:
        """Once per process, before any of its samples is used: the shard's bytes match the xxh64
        hash (and size and count) that index.json recorded when it was written. A shard changed in
        place, or an index whose hashes are wrong, stops training here, naming the shard."""
        shard = self.shards[shard_id]
        info = {"raw_data": {"basename": shard.raw_data.basename, "bytes": shard.raw_data.bytes,
                             "hashes": shard.raw_data.hashes}, "samples": shard.samples}
        recorded = shard.raw_data.hashes or {}
        algos = (CHEAP_HASH,) if CHEAP_HASH in recorded else tuple(recorded)[:1]
        path = Path(shard.dirname, shard.split or "", shard.raw_data.basename)
        problems = shard_problems(path, info, algos)
        if problems:
            raise ShardError(f"shard {shard.raw_data.basename} of the dataset at {self.where} does not match "
                             f"its index.json ({'; '.join(problems)}): changed since it was written, or a wrong "
                             f"index; no sample of it was used; {verify_hint(self.where)}")
        self.checked_shards.add(shard_id)

    def _shard_name(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        return self.shards[shard_id].raw_data.basename

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray]:
        shard_id, _ = self.spanner[sample_id]
        try:
            raw = super().get_item(sample_id, retry)  # downloads a remote shard first
        except Exception as err:
            raise ShardError(f"shard {self._shard_name(sample_id)} of the dataset at {self.where} is unreadable "
                             f"({type(err).__name__}: {err}); {verify_hint(self.where)}") from None
        if shard_id not in self.checked_shards:
            self.check_shard(shard_id)
        try:
            image = decode_image(raw["image"])
            moments = np.asarray(raw["moments"], dtype=np.float32)
            if image.shape != IMAGE_SHAPE or moments.shape != MOMENTS_SHAPE:
                raise ValueError(f"sample shapes {image.shape}, {moments.shape}")
        except Exception as err:
            raise ShardError(f"shard {self._shard_name(sample_id)} of the dataset at {self.where} is unreadable "
                             f"({type(err).__name__}: {err}); {verify_hint(self.where)}") from None
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
                             f"{err}); {verify_hint(self.where)}")


def _collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR2, signal.SIGTERM)


def _leave_stop_signals(handled: tuple[int, ...], worker_id: int) -> None:
    """A DataLoader worker leaves the stop signals its training process handles (`handled`) to it:
    a terminal's Ctrl-C and SLURM's preemption signals reach every process of the job, and by
    default would kill a worker mid-epoch; the training process saves at a step boundary, then
    shuts its workers down (TrainStream.close). The others keep their default (multiprocessing
    ends a leftover worker with SIGTERM at exit). A spawned worker starts with them blocked
    (`_stop_signals_blocked`): ignored first, then unblocked."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN if sig in handled else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """While DataLoader workers start: a stop signal stays pending in this thread (delivered after)
    and a worker starts with it blocked, so that none dies of one before `_leave_stop_signals`."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def fork_is_safe(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this interpreter forks a threaded process safely. Before 3.11.8 a child forked while
    another thread held the interpreter's HEAD_LOCK deadlocks at birth (CPython gh-112275; a rank
    has gloo's and the tracker's threads), which hung a rank at its first batch. 3.12 has the fix;
    3.10 and older count as unsafe (their fix came only in late security releases)."""
    return version >= (3, 12) or (3, 11, 8) <= version < (3, 12)


def _worker_context(num_workers: int) -> Optional[str]:
    """How DataLoader workers start: forked where the interpreter forks a threaded process safely
    (cheap: no re-import of torch; also when this process was itself spawned, whose default would
    be to spawn them too), spawned where it does not (`fork_is_safe`)."""
    import multiprocessing as mp

    if num_workers == 0:
        return None
    return "fork" if fork_is_safe() and "fork" in mp.get_all_start_methods() else "spawn"


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
    """Per-rank batches over the prepared shards at data.path; see the module docstring."""

    def __init__(self, data: DataConfig, train: TrainConfig, rank: int, world_size: int, batch_size: int) -> None:
        """Rank `rank`'s `batch_size` samples at a time of every global batch of train.batch_size,
        in the order train.seed shuffles."""
        path = data.path
        if path is None:
            raise UserError("'data.path' is required: a directory of MDS shards or a remote URI")
        self.path, self.rank, self.world_size, self.batch_size = path, rank, world_size, batch_size
        self.global_batch = train.batch_size
        self.resume_note: Optional[str] = None
        self._resumed_samples = 0  # of the epoch load_state_dict resumes
        if is_remote(path):
            remote = path
            digest = hashlib.sha256(path.encode()).hexdigest()[:12]
            local = data.local_cache or str(Path(tempfile.gettempdir()) / f"regscale-cache-{digest}")
        else:
            check_shard_files(path)
            remote, local = None, path
        local = os.path.abspath(local)
        options = dict(where=path, remote=remote, local=local, shuffle=data.shuffle, shuffle_seed=train.seed,
                       shuffle_block_size=data.shuffle_block_size, batch_size=batch_size,
                       validate_hash="xxh64" if remote else None, download_retry=2)
        self._lock_fd: Optional[int] = None
        import torch.distributed as dist

        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise UserError("TrainStream with world_size > 1 needs torch.distributed initialised first")
        self._world = (rank, world_size, *_host_layout(rank, world_size))
        with _world_env(*self._world):
            self._open(options, first_on_host=self._world[2] == 0)
        handled = tuple(sig for sig in STOP_SIGNALS if signal.getsignal(sig) not in (signal.SIG_DFL, None))
        self.loader = StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=data.num_workers,
                                          collate_fn=_collate, drop_last=True, pin_memory=torch.cuda.is_available(),
                                          persistent_workers=data.num_workers > 0,
                                          multiprocessing_context=_worker_context(data.num_workers),
                                          worker_init_fn=functools.partial(_leave_stop_signals, handled))

    def _open(self, options: dict[str, Any], first_on_host: bool) -> None:
        """Create the StreamingDataset. The host's first rank removes dead runs' shared memory
        first, and every rank waits for that before streaming looks for a free prefix."""
        import torch.distributed as dist

        if first_on_host:
            shm.clean_stale([options["local"]])
        if self.world_size > 1:
            dist.barrier()
        with shm.registering():  # no other job's cleaner on this host takes the prefix for a dead one's
            try:
                self.dataset = _Samples(**options)
            except (FileNotFoundError, RuntimeError, ValueError) as err:
                raise ShardError(f"cannot open the dataset at {self.path} ({type(err).__name__}: {err}); "
                                 f"{verify_hint(self.path)}") from None
            except Exception as err:  # a remote store's client: no credentials, no network, no permission
                if options["remote"] is None:
                    raise
                raise remote_failure(self.path, err) from None
            self._lock_fd = shm.hold_prefix(self.dataset._shm_prefix_int)

    @property
    def num_samples(self) -> int:
        """Samples in the dataset."""
        return self.dataset.num_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch; the first one resumes where `load_state_dict` says."""
        while True:
            left = self._batches_left(self._resumed_samples)
            self._resumed_samples = 0
            yielded = 0
            for batch in self._epoch():
                if yielded == left:  # streaming pads the epoch's tail for some world sizes
                    break
                yielded += 1
                yield batch
            if not yielded and self.num_samples < self.global_batch:
                raise UserError(f"the dataset at {self.path} has {self.num_samples} samples: fewer than one "
                                f"global batch (train.batch_size {self.global_batch})")

    def _batches_left(self, consumed: int) -> int:
        """This rank's batches in what is left of the epoch: whole global batches only, the same
        number of steps per epoch for any world size."""
        per_step = self.global_batch // (self.world_size * self.batch_size)
        return (self.num_samples // self.global_batch - consumed // self.global_batch) * per_step

    def _epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            with _stop_signals_blocked():  # the first epoch starts the (persistent) workers
                batches = iter(self.loader)
            yield from batches
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
        self._resumed_samples = s["sample_in_epoch"]

    def close(self) -> None:
        """Stop the DataLoader workers (they ignore the stop signals their training process handles,
        so multiprocessing's SIGTERM at exit would not end them) and release the shared-memory claim
        (also done by the OS when the process exits)."""
        iterator = getattr(self.loader, "_iterator", None)  # DataLoader's persistent-workers iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
