"""The training process's checkpoints: where a start resumes from, the save in flight, its
publication and retention, and the time the loop waited for them.

A save is a small state machine driven by the loop's per-step agreement:

    save(step)     every rank: the engine copies its state aside and writes, fsyncs and hashes
                   its own files (in the background for async saves)
    wait_staged()  before the next optimizer step: the copy must be done
    flags()        [writing, failed] of this rank, all-reduced with the stop flags every step
    agreed(...)    once no rank is writing: the file tables are gathered, rank 0 publishes
                   (manifest, rename, `latest`, retention), and every rank learns the result

Nothing is hashed inside the agreement: each rank hashed its files as it wrote them. A start
verifies the newest checkpoint with every rank reading its share of the files in parallel
threads; broken checkpoints are set aside, and a run whose every checkpoint is broken stops
instead of silently starting over. A full disk stops the run with one line naming the directory;
the previous checkpoint stays.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from regscale import dist, faults
from regscale.checkpoints import (CheckpointStore, files_problem, manifest_problem, published, put_aside,
                                  set_aside, shares)
from regscale.dist import DistEnv
from regscale.engine import Engine, SaveHandle
from regscale.errors import UserError
from regscale.fsutil import no_space
from regscale.rundir import CHECKPOINTS

log = logging.getLogger("regscale.train")

WAIT_S = dist.COLLECTIVE_S  # the longest a rank waits for its own checkpoint copy or writes


@dataclass
class _Pending:
    """A save in flight."""

    step: int
    tmp: Path
    manifest: dict[str, Any]
    handle: SaveHandle
    asynchronous: bool
    started: float
    stall_s: float  # the loop's waits for this save so far
    copy_wait_s: float = 0.0  # of which inside a step (wait_staged)


@dataclass(frozen=True)
class Published:
    """What one save cost, once it is published."""

    step: int
    path: Path
    save_s: float  # from the save's start to its publication
    stall_s: float  # of which the loop waited
    asynchronous: bool
    copy_wait_s: float = 0.0  # of the stall, the wait inside a step for the copy (wait_staged)


class Checkpointer:
    """The checkpoints/ side of one training process (see the module docstring)."""

    def __init__(self, run_dir: Path, engine: Engine, env: DistEnv, *, keep_last: int, keep_every: int,
                 protect: tuple[int, ...] = (), asynchronous: bool = True) -> None:
        self.store = CheckpointStore(run_dir / CHECKPOINTS, keep_last=keep_last, keep_every=keep_every,
                                     protect=protect)
        self.engine, self.env = engine, env
        self.asynchronous = asynchronous
        self.pending: Optional[_Pending] = None
        self.last_saved = -1

    @property
    def root(self) -> Path:
        return self.store.root

    # -- where to start --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Rank 0 creates the directory and removes unfinished writes of earlier attempts."""
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.store.clean_stale()
        dist.barrier("create the checkpoint directory")

    def newest_valid(self, *, at_start: bool) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest checkpoint whose files all check out, verified by every rank reading its
        share in parallel threads; broken ones are set aside on the way. At the start of a run
        whose checkpoints are all broken, raises UserError naming them instead of returning None
        (which would restart training from step 0)."""
        names = dist.broadcast_object([p.name for p in published(self.root)] if self.env.is_main else None)
        for name in names:
            path = self.root / name
            manifest, problem = dist.broadcast_object(manifest_problem(path) if self.env.is_main else None)
            if manifest is not None:
                mine = shares(manifest["files"], self.env.world_size)[self.env.rank]
                problems = dist.gather_objects(files_problem(path, manifest, mine))
                problem = next((p for p in problems if p), None)
            if problem is None:
                return path, manifest
            if self.env.is_main:
                put_aside(path, problem)
            dist.barrier("set a broken checkpoint aside")
        aside = set_aside(self.root)
        if at_start and aside:
            raise UserError(f"{self.root}: no checkpoint is readable ({', '.join(p.name for p in aside)} "
                            "failed verification and are set aside); training would restart from step 0. "
                            "Restore them, or move them out of the directory to start over")
        return None

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state: Callable[[], dict[str, Any]], *, blocking: bool) -> Optional[Published]:
        """Checkpoint `step` on every rank: `state()` gives the manifest's training state (it may
        gather over ranks). The save before it must be published first (`finish`): its costs are
        the caller's to record. Blocking saves (and engine.async_checkpoint=false) return their
        publication."""
        if step == self.last_saved:
            return None
        if self.pending is not None:
            raise RuntimeError(f"the save of step {self.pending.step} is still in flight: finish() it first")
        started = time.perf_counter()
        tmp = self.store.tmp_dir(step)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier("create the checkpoint's temporary directory")
        manifest = state()
        asynchronous = self.asynchronous and not blocking
        handle = self.engine.save(tmp, blocking=not asynchronous)
        if faults.due("NO_SPACE", step):
            handle = SaveHandle(handle.staged, _failing(handle.written, OSError(
                errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))))
        if self.env.is_main and faults.due("KILL_IN_SAVE", step):
            os.kill(os.getpid(), signal.SIGKILL)
        self.pending = _Pending(step, tmp, manifest, handle, asynchronous, started,
                                time.perf_counter() - started)
        self.last_saved = step
        return None if asynchronous else self.finish()

    def wait_staged(self) -> None:
        """Before the optimizer changes the weights: the save in flight must have copied them."""
        p = self.pending
        if p is None or p.handle.staged.done():
            return
        t0 = time.perf_counter()
        _wait(p.handle.staged, f"copy the state of step {p.step} aside for its checkpoint")
        waited = time.perf_counter() - t0
        p.stall_s += waited
        p.copy_wait_s += waited

    def flags(self) -> list[float]:
        """[writing, failed] of this rank's save in flight, for the per-step agreement."""
        written = self.pending.handle.written if self.pending else None
        if written is None or not written.done():
            return [float(written is not None), 0.0]
        return [0.0, float(written.exception() is not None)]

    def agreed(self, writing: float, failed: float) -> Optional[Published]:
        """After the agreement: publish the save in flight once no rank is writing any more."""
        if self.pending is None or writing:
            return None
        return self._settle(bool(failed))

    def finish(self) -> Optional[Published]:
        """Wait for the save in flight on every rank, then publish it."""
        p = self.pending
        if p is None:
            return None
        t0 = time.perf_counter()
        try:
            _wait(p.handle.written, f"write the checkpoint of step {p.step}")
            failed = 0.0
        except UserError:
            raise
        except Exception:  # reported below, with every rank's reason
            failed = 1.0
        flag = dist.all_max([failed], "learn whether every rank wrote its checkpoint files")[0]
        p.stall_s += time.perf_counter() - t0
        return self._settle(bool(flag))

    def _settle(self, failed: bool) -> Optional[Published]:
        """Every rank: publish the save in flight (rank 0 writes), or drop it if a write failed."""
        p, self.pending = self.pending, None
        t0 = time.perf_counter()
        if failed:
            self._drop(p)
            return None
        tables = dist.gather_objects(p.handle.written.result())
        outcome: Optional[tuple[str, str]] = None
        if self.env.is_main:
            files = {rel: entry for table in tables for rel, entry in table.items()}
            try:
                outcome = ("ok", str(self.store.publish(p.tmp, p.manifest, files)))
            except OSError as err:
                shutil.rmtree(p.tmp, ignore_errors=True)
                outcome = ("no_space" if no_space(err) else "error", f"{type(err).__name__}: {err}")
        kind, detail = dist.broadcast_object(outcome)
        if kind == "no_space":
            raise UserError(self._no_space(p.step))
        if kind == "error":
            raise RuntimeError(f"publishing the checkpoint of step {p.step} failed: {detail}")
        p.stall_s += time.perf_counter() - t0
        save_s = time.perf_counter() - p.started
        log.info("checkpoint %s published (%.2f s after the save began, the loop waited %.2f s)",
                 detail, save_s, p.stall_s)
        return Published(p.step, Path(detail), save_s, p.stall_s, p.asynchronous, p.copy_wait_s)

    def _drop(self, p: _Pending) -> None:
        """A write failed on some rank: remove the partial checkpoint. A full disk stops the run
        (saving again would fail again); other errors warn and training goes on."""
        err = p.handle.written.exception() if p.handle.written.done() else None
        mine = None if err is None else ("no_space" if no_space(err) else f"{type(err).__name__}: {err}")
        reasons = dist.gather_objects(mine)
        if self.env.is_main:
            shutil.rmtree(p.tmp, ignore_errors=True)
        dist.barrier("remove a failed checkpoint write")
        if "no_space" in reasons:
            raise UserError(self._no_space(p.step))
        detail = next((r for r in reasons if r), "unknown")
        log.warning("checkpoint write of step %d failed (%s); it is not published, training goes on",
                    p.step, detail)

    def _no_space(self, step: int) -> str:
        kept = published(self.root)
        return (f"no space left on {self.root} while writing the checkpoint of step {step}: it is not "
                f"saved; the newest saved one ({kept[0].name if kept else 'none'}) is kept. Free space "
                "there and start again")

    def close(self) -> None:
        """Release the engine's background writers (after `finish`)."""
        self.engine.close()


def _wait(future: Future, what: str) -> Any:
    """future.result(), bounded by WAIT_S; a timeout says what this rank waited for."""
    try:
        return future.result(timeout=WAIT_S)
    except FutureTimeout:
        raise UserError(f"rank {dist.read_layout().rank} waited {WAIT_S:.0f} s to {what}; the storage "
                        "does not answer") from None


def _failing(written: Future, err: OSError) -> Future:
    """A future that fails with `err` once `written` is done (fault injection: a full disk)."""
    out: Future = Future()
    written.add_done_callback(lambda _: out.set_exception(err))
    return out
