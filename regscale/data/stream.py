"""The training stream: MDS shards -> per-rank batches of tensors, resumable mid-epoch.

A `StreamingDataset` partitions each epoch over ranks and DataLoader workers (each sample once per
epoch), shuffles across shards from `train.seed`, and downloads remote shards ahead of use.
`state_dict()` records (epoch, samples consumed in the epoch) for the checkpoint; `load_state_dict`
makes the next iteration start exactly after them, also when the number of ranks changed
(streaming keeps the global order fixed by its canonical nodes and re-splits the rest).

A remote data.path is cached on each host (data.local_cache; one download of each shard for all
the host's ranks and workers: streaming's shared cache), bounded by data.cache_limit (the least
recently used shards are evicted; the order of samples does not depend on it). The store is the
truth: the host's first rank fetches its index.json at start and, when it differs from the cached
one, removes the cached shards first. Every download is checked against the xxh64 the index
records. A download failing for a reason that may pass (no connection, a timeout, 5xx, 503
SlowDown) is retried with exponential backoff for up to data.download_retry_s; past it, or for a
missing or changed object, the stream stops with one line naming the shard, and every process of
the host that waits on that shard stops with it (never a hang).

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
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from streaming import Stream, StreamingDataset
from streaming.base.dataloader import StreamingDataLoader
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState

from regscale.config import DataConfig, TrainConfig, is_remote
from regscale.data import shm
from regscale.data.store import download, is_not_found, is_transient, patiently, remote_failure
from regscale.data.shards import (CHEAP_HASH, IMAGE_SHAPE, INDEX, MOMENTS_SHAPE, ShardError, check_shard_files,
                                  decode_image, index_shards, shard_problems, verify_hint)
from regscale.errors import UserError, first_line, one_line

log = logging.getLogger("regscale.data")

PY1E_SPREAD = 1.25  # streaming's py1e spreads a shard's samples over up to 1.25 x the shuffle block
FAILED = ".regscale-download-failed"  # in a host's cache: why its downloads stopped (all its processes stop)


def cache_dir(data: DataConfig) -> str:
    """Where this host caches the remote data.path: data.local_cache, else a temp folder named
    after the URI."""
    digest = hashlib.sha256(str(data.path).encode()).hexdigest()[:12]
    return os.path.abspath(data.local_cache or Path(tempfile.gettempdir()) / f"regscale-cache-{digest}")


def _index_files(index: Any) -> set[str]:
    """The shard files (raw and compressed) an MDS index names inside its dataset; none for an
    unreadable index."""
    try:
        names = {part["basename"] for info in index["shards"] for key in ("raw_data", "zip_data")
                 if isinstance(part := info.get(key), dict) and isinstance(part.get("basename"), str)}
    except (KeyError, TypeError, AttributeError):
        return set()
    return {name for name in names if not name.startswith("/") and ".." not in name.split("/")}


def sync_cache(remote: str, local: str, retry_s: float) -> None:
    """Bring a host's cache of the remote dataset in line with the store (its first rank, before
    the others open it): the store's index.json (checked) replaces the cached one; when they differ
    (the dataset at that URI was rebuilt, or the cache was another's), the shard files either names
    are removed first. Clears a download failure left by an earlier run. The index download rides
    out an outage like the shards' (retry_s)."""
    folder = Path(local)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED).unlink(missing_ok=True)
    fresh = folder / f".{INDEX}.{os.getpid()}"
    if not download(f"{remote}/{INDEX}", fresh, retry_s):
        raise UserError(f"{remote}: no {INDEX} there (expected MDS shards written by `regscale prepare`)")
    try:
        new = json.loads(fresh.read_bytes())
    except ValueError as err:
        fresh.unlink()
        raise ShardError(f"{remote}/{INDEX}: not a valid MDS index ({err}); rebuild it with "
                         "`regscale prepare`") from None
    index_shards(new, f"{remote}/{INDEX}")
    cached = folder / INDEX
    old = cached.read_bytes() if cached.is_file() else None
    if old != fresh.read_bytes():
        try:
            stale = _index_files(json.loads(old)) if old is not None else set()
        except ValueError:
            stale = set()
        for name in stale | _index_files(new):
            (folder / name).unlink(missing_ok=True)
    os.replace(fresh, cached)


def check_cache_limit(data: DataConfig, shards: list[dict[str, Any]], hosts: int, warn: bool) -> Optional[int]:
    """data.cache_limit in bytes, refused when below what streaming needs: 4 x the largest shard.
    `warn`: say when the shuffle's working set on a host does not fit in it (`shuffle_working_set`)."""
    limit = data.cache_limit_bytes
    if limit is None:
        return None
    largest = max(info["raw_data"]["bytes"] + (info.get("zip_data") or {}).get("bytes", 0) for info in shards)
    if limit < 4 * largest:
        raise UserError(f"'data.cache_limit' ({data.cache_limit} = {limit} bytes) is too small for the dataset at "
                        f"{data.path}: the cache must hold 4 x its largest shard ({largest} bytes), "
                        f"at least {4 * largest} bytes")
    per_shard = sum(info["samples"] for info in shards) / len(shards)
    block, working = shuffle_working_set(data.shuffle_block_size, [info["samples"] for info in shards], hosts)
    held = limit // largest
    if warn and working > held:
        log.warning("data.cache_limit %s holds %d shards of the dataset at %s, but its shuffle reads from about %d "
                    "at a time on each host (data.shuffle_block_size %d, ~%.0f samples a shard): most samples will "
                    "need their shard downloaded again; data.shuffle_block_size=%d or less fits (it sets the order "
                    "of samples: choose it when the run starts)", data.cache_limit, held, data.path, working, block,
                    per_shard, per_shard * (held - 2) / PY1E_SPREAD)
    return limit


def shuffle_working_set(block_size: Optional[int], shard_samples: list[int], hosts: int) -> tuple[int, int]:
    """(shuffle block, shards read from at a time on a host) of streaming's default shuffle (py1e,
    one canonical node per host at the start): each shard's samples are spread over a window of up
    to 1.25 x the block, so a host reads from up to 1.25 x block / samples-per-shard + 1 shards at
    once (all of its share when the block is larger)."""
    block = block_size or max(4_000_000 // hosts, 1 << 18)
    per_shard = sum(shard_samples) / len(shard_samples)
    per_host = sum(shard_samples) / hosts
    return block, min(math.ceil(len(shard_samples) / hosts),
                      math.ceil(PY1E_SPREAD * min(block, per_host) / per_shard) + 1)


class _RemoteStream(Stream):
    """streaming's Stream of a remote dataset whose downloads ride out an outage (see the module
    docstring); failures become ShardErrors naming the shard."""

    def __init__(self, *, where: str, retry_s: float, **kwargs: Any) -> None:
        super().__init__(download_retry=1, validate_hash=CHEAP_HASH, **kwargs)
        self.where, self.retry_s = where, retry_s

    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        attempt = functools.partial(super()._download_file, from_basename, to_basename)
        return patiently(f"download of {self.where}/{from_basename}", self.retry_s, attempt,
                         give_up=Path(self.local, FAILED).exists)

    def prepare_shard(self, shard: Any) -> int:
        name = shard.file_pairs[0][0].basename
        try:
            return super().prepare_shard(shard)
        except Exception as err:
            if isinstance(err, ValueError) and "Checksum failure" in str(err):
                Path(self.local, name).unlink(missing_ok=True)  # a requeued run downloads it again
                raise ShardError(f"shard {name} of the dataset at {self.where} does not match its {INDEX} "
                                 f"(xxh64 of the download differs): changed in the store since it was written, "
                                 f"or a wrong index; no sample of it was used; {verify_hint(self.where)}") from None
            if is_not_found(err):
                raise ShardError(f"shard {name} of the dataset at {self.where} is missing from the store "
                                 f"({first_line(err)}); {verify_hint(self.where)}") from None
            detail = f"{type(err).__name__}: {first_line(err)}"
            if is_transient(err):
                raise ShardError(f"cannot download shard {name} of the dataset at {self.where}: still failing "
                                 f"after {self.retry_s:.0f} s of retries (data.download_retry_s) ({detail})") from None
            raise remote_failure(f"{self.where}/{name}", err) from None


class _Samples(StreamingDataset):
    """StreamingDataset yielding numpy samples; shard failures become `ShardError`s naming the shard,
    raised by the process that uses the shard, never printed by a thread."""

    def __init__(self, *, where: str, remote: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        self.failed = Path(self.streams[0].local, FAILED) if remote else None
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
        if self.failed is not None and not path.is_file():
            return  # evicted from the cache meanwhile: downloaded again (and checked) when used
        problems = shard_problems(path, info, algos)
        if problems:
            raise ShardError(f"shard {shard.raw_data.basename} of the dataset at {self.where} does not match "
                             f"its index.json ({'; '.join(problems)}): changed since it was written, or a wrong "
                             f"index; no sample of it was used; {verify_hint(self.where)}")
        self.checked_shards.add(shard_id)

    def _shard_name(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        return self.shards[shard_id].raw_data.basename

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download of a shard (by any thread of any process of the host); once one of
        them gave up, every other stops too: the failure is written in the host's cache and the
        shard is marked present, which wakes the processes waiting for it (they then find the
        failure instead of the file)."""
        if self.failed is None:
            return super().prepare_shard(shard_id, blocking)
        if self.failed.exists():
            raise ShardError(self.failed.read_text().strip() or "another process of this host stopped downloading")
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            error = err if isinstance(err, UserError) else ShardError(
                f"shard {self.shards[shard_id].raw_data.basename} of the dataset at {self.where}: "
                f"{type(err).__name__}: {first_line(err)}")
            tmp = self.failed.with_name(f"{FAILED}.{os.getpid()}")
            tmp.write_text(one_line(str(error)) + "\n")
            os.replace(tmp, self.failed)
            self._shard_states[shard_id] = _ShardState.LOCAL
            raise error from None

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, np.ndarray]:
        shard_id, _ = self.spanner[sample_id]
        try:
            raw = super().get_item(sample_id, retry)  # downloads a remote shard first
        except UserError:
            raise
        except Exception as err:
            if self.thread_error is not None:  # streaming: "Background thread failed"
                raise self._thread_failure() from None
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

    def _ready_thread(self, it: Any) -> None:
        """Release samples to the yield loop `predownload` ahead of it. streaming's own ready
        thread waits for each sample's shard to be present, and waits forever when a bounded cache
        evicts that shard before it looks (seen: a worker stuck mid-epoch with data.cache_limit).
        get_item downloads a shard that is not there itself; the prepare thread still downloads
        ahead (until the ready index reaches the end)."""
        window = max(1, self.predownload or 1)
        while not (it.should_exit() or it.ready_index == it.total or self._event.is_set()):
            it.ready_index = max(it.ready_index, min(it.total, it.yield_index + window))
            time.sleep(TICK)
        it.on_exit()

    def on_exception(self, future: Any) -> None:
        """A download thread failed: keep its error for this process to raise, and stop the
        epoch's threads (streaming's own callback would re-raise it inside the thread pool, which
        prints a traceback)."""
        err = future.exception()
        if err is not None:
            self.thread_error = self.thread_error or err
            self._event.set()

    def _thread_failure(self) -> UserError:
        err = self.thread_error
        if isinstance(err, UserError):
            return type(err)(str(err))
        return ShardError(f"reading a shard of the dataset at {self.where} failed ({type(err).__name__}: "
                          f"{first_line(err)}); {verify_hint(self.where)}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from super().__iter__()
        if self.thread_error is not None:  # streaming ends the epoch early on a download failure
            raise self._thread_failure()


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
    and a worker starts with it blocked, so that none dies of one before `_leave_stop_signals`.
    multiprocessing's resource tracker is started first: starting it unblocks SIGINT and SIGTERM
    in the calling thread (the tracker's own start blocks and then unblocks them)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Loader(StreamingDataLoader):
    """streaming's loader (it counts the samples yielded, for its state_dict), whose workers start
    when it is iterated, under `_stop_signals_blocked`, not at the first batch: streaming's
    `__iter__` is a generator, which starts torch's iterator (and the workers) only when asked for
    a batch."""

    def __iter__(self) -> Iterator[Any]:
        self.num_samples_yielded = 0
        with _stop_signals_blocked() if self.num_workers else contextlib.nullcontext():
            batches = DataLoader.__iter__(self)  # starts the workers, or wakes the persistent ones
        return self._counted(batches)

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self.num_samples_yielded += self._get_batch_size(batch)
            yield batch


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
        if not is_remote(path):
            check_shard_files(path)
            if data.cache_limit is not None and rank == 0:
                print(f"data.cache_limit is ignored: the dataset at {path} is local, read in place", file=sys.stderr)
        self._lock_fd: Optional[int] = None
        import torch.distributed as dist

        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise UserError("TrainStream with world_size > 1 needs torch.distributed initialised first")
        self._world = (rank, world_size, *_host_layout(rank, world_size))
        with _world_env(*self._world):
            self._open(data, train.seed, batch_size, first_on_host=self._world[2] == 0)
        handled = tuple(sig for sig in STOP_SIGNALS if signal.getsignal(sig) not in (signal.SIG_DFL, None))
        self.loader = _Loader(self.dataset, batch_size=batch_size, num_workers=data.num_workers,
                              collate_fn=_collate, drop_last=True, pin_memory=torch.cuda.is_available(),
                              persistent_workers=data.num_workers > 0,
                              multiprocessing_context=_worker_context(data.num_workers),
                              worker_init_fn=functools.partial(_leave_stop_signals, handled))

    def _open(self, data: DataConfig, seed: int, batch_size: int, first_on_host: bool) -> None:
        """Create the StreamingDataset. The host's first rank removes dead runs' shared memory
        first (and brings a remote dataset's cache in line with the store), and every rank waits
        for that before streaming looks for a free prefix."""
        import torch.distributed as dist

        path = str(data.path)
        remote = is_remote(path)
        local = cache_dir(data) if remote else os.path.abspath(path)
        if first_on_host:
            shm.clean_stale([local])
            if remote:
                sync_cache(path, local, data.download_retry_s)
        if self.world_size > 1:
            dist.barrier()
        options: dict[str, Any] = dict(shuffle=data.shuffle, shuffle_seed=seed, batch_size=batch_size,
                                       shuffle_block_size=data.shuffle_block_size)
        if remote:
            shards = index_shards(json.loads(Path(local, INDEX).read_bytes()), path)
            limit = check_cache_limit(data, shards, self.world_size // self._world[3], warn=self.rank == 0)
            options.update(streams=[_RemoteStream(where=path, retry_s=data.download_retry_s, remote=path,
                                                  local=local)], cache_limit=limit)
        else:
            options.update(local=local)
        with shm.registering():  # no other job's cleaner on this host takes the prefix for a dead one's
            try:
                self.dataset = _Samples(where=path, remote=remote, **options)
            except UserError:
                raise
            except (FileNotFoundError, RuntimeError, ValueError) as err:
                raise ShardError(f"cannot open the dataset at {path} ({type(err).__name__}: {first_line(err)}); "
                                 f"{verify_hint(path)}") from None
            except Exception as err:  # a remote store's client: no credentials, no network, no permission
                if not remote:
                    raise
                raise remote_failure(path, err) from None
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
            yield from iter(self.loader)
        except UserError as err:
            message = str(err).strip()
            if "Original Traceback" not in message:  # raised in this process (data.num_workers=0)
                raise
            # raised in a worker: DataLoader wraps it in the worker's traceback, ending "module.ShardError: message"
            raise ShardError(message.splitlines()[-1].split(": ", 1)[1]) from None

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
