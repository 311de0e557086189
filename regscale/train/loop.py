"""The training loop: one per process, the same for both engines.

    train(cfg, run_dir, tracker) -> "completed" | "preempted" | "deadline"

A step: per micro-batch, draw latents from the VAE posterior, encode images with the frozen
DINOv2, compute the REG loss, backward; then the engine clips and steps (or skips a non-finite
step), the EMA follows. Every random draw comes from a generator seeded by (seed, step, rank,
micro-batch), and the data stream's position is in every checkpoint, so a resumed run replays
exactly what the uninterrupted one would have done. At each step boundary the ranks agree in one
tiny all-reduce whether to stop (signal, deadline) and whether a background save has finished.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from regscale.config import Config, batch_plan, config_hash, from_yaml_text, to_yaml
from regscale import dist
from regscale.fsutil import write_atomic
from regscale.train.checkpoint import CheckpointStore, PendingSave, find_valid
from regscale.train.health import (MetricsLog, NonFiniteGuard, Watchdog, device_peak_flops,
                                   faulty_steps, kill_in_save, memory_gb, train_flops_per_image)
from regscale.train.preempt import Deadline, StopFlag, job_deadline

log = logging.getLogger("regscale.train")

FIRST_STEP_WATCHDOG_S = 3600.0  # the first step compiles and JIT-builds; give it time


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, rank, micro)."""
    key = hashlib.sha256(f"regscale:{seed}:{step}:{rank}:{micro}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return g


@dataclass
class Progress:
    step: int = 0
    images: int = 0
    nonfinite_total: int = 0
    rollbacks: int = 0


def train(cfg: Config, run_dir: Path, tracker: Any = None) -> str:
    """Train (or resume) the run in `run_dir` until train.max_steps, a stop signal or the deadline.

    Returns "completed", or "preempted" / "deadline" after saving a checkpoint (requeue me).
    Reads the distributed environment from SLURM, torchrun or a single process.
    """
    _setup_logging()
    owns_group = not torch.distributed.is_initialized()
    env = dist.setup()
    trainer = None
    status = "failed"
    try:
        trainer = Trainer(cfg, Path(run_dir), env, tracker if env.is_main else None)
        status = trainer.run()
        return status
    finally:
        if trainer is not None:
            trainer.close(status)
        elif tracker is not None and env.is_main:
            tracker.finish(status)  # the trainer never started: the run must not stay RUNNING
        if owns_group:
            dist.teardown()


def _setup_logging() -> None:
    rank = dist.read_layout().rank
    root = logging.getLogger("regscale")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


class Trainer:
    """The state of one training process; `run` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path, env: dist.DistEnv, tracker: Any) -> None:
        from regscale.data.stream import TrainStream
        from regscale.data.synthetic import ensure_synthetic_dataset
        from regscale.engine import build_engine
        from regscale.models import build_model_from_config
        from regscale.models.encoders import load_dinov2

        self.cfg, self.run_dir, self.env, self.tracker = cfg, run_dir, env, tracker
        self.device = env.device
        self.plan = batch_plan(cfg.train, env.world_size)
        t = cfg.train
        self.store = CheckpointStore(run_dir / "checkpoints", keep_last=t.keep_last,
                                     keep_every=t.keep_every, protect=tuple(cfg.eval.at_steps))
        if env.is_main:
            self._write_config()
            self.store.root.mkdir(parents=True, exist_ok=True)
            self.store.clean_stale()
        dist.barrier()
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        ensure_synthetic_dataset(cfg)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model_from_config(cfg.model)
        self.encoder = load_dinov2(cfg.encoder, embed_dim=cfg.model.cls_token_dim,
                                   seed=t.seed).to(self.device)
        self.engine = build_engine(cfg, model, env, self.plan)
        self.stream = TrainStream(cfg, env.rank, env.world_size, self.plan.micro)
        self._batches = None
        self.progress = Progress()
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", tracker, enabled=env.is_main)
        self.pending: Optional[PendingSave] = None
        self.last_saved = -1
        self.flops_per_image = train_flops_per_image(cfg)
        self.peak = device_peak_flops(self.device)
        self.deadline = Deadline(job_deadline())
        self.resumed_from = self._resume()

    # -- setup ---------------------------------------------------------------------------------

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.yaml"
        if path.is_file():
            saved = from_yaml_text(path.read_text())
            if config_hash(saved) != config_hash(self.cfg):
                log.warning("%s differs from this run's configuration (hash %s vs %s); training "
                            "with this run's", path, config_hash(saved), config_hash(self.cfg))
            return
        write_atomic(path, to_yaml(self.cfg))

    def _resume(self) -> Optional[str]:
        found = find_valid(self.store.root, quarantine=True) if self.env.is_main else None
        found = dist.broadcast_object((str(found[0]), found[1]) if found else None)
        if found is None:
            return None
        self._restore(Path(found[0]), found[1])
        return found[0]

    def _restore(self, path: Path, manifest: dict[str, Any]) -> None:
        same_world = manifest["world_size"] == self.env.world_size
        self.engine.load(path, manifest)
        data_states = manifest["data_state"]
        self.stream.load_state_dict(data_states[self.env.rank] if same_world else data_states[0])
        self._batches = None
        h = manifest["health"]
        self.progress = Progress(step=manifest["step"], images=manifest["images"],
                                 nonfinite_total=h["nonfinite_total"], rollbacks=h["rollbacks"])
        self.last_saved = manifest["step"]
        if manifest["config_hash"] != config_hash(self.cfg):
            log.warning("checkpoint %s was written with config hash %s, this run has %s",
                        path.name, manifest["config_hash"], config_hash(self.cfg))
        kind = manifest["engine"]["kind"]
        if kind != self.engine.kind:
            from regscale.errors import UserError

            raise UserError(f"checkpoint {path} was written by engine '{kind}', this run uses "
                            f"engine.kind={self.engine.kind}; export it and start a new run instead")
        if self.env.is_main:
            exact = "bit-exact" if same_world else (
                f"resharded from {manifest['world_size']} to {self.env.world_size} processes: "
                "NOT bit-exact")
            log.info("resumed from %s (step %d, %d images; %s)", path, manifest["step"],
                     manifest["images"], exact)

    # -- one step ------------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.stream)
        try:
            return next(self._batches)
        except StopIteration:  # end of an epoch: the stream starts the next one
            self._batches = iter(self.stream)
            return next(self._batches)

    def _train_step(self, step: int, nan: bool) -> tuple[Any, list[float], float]:
        """Forward/backward over the micro-batches and the engine step.
        Returns (StepResult, [total, img, proj, cls] summed over micro-batches, data wait s)."""
        from regscale.objective import reg_loss, sample_latents

        cfg, plan = self.cfg, self.plan
        sums = [0.0, 0.0, 0.0, 0.0]
        wait = 0.0
        for micro in range(plan.accumulation):
            t0 = time.perf_counter()
            batch = self._next_batch()
            wait += time.perf_counter() - t0
            images = batch["image"].to(self.device, non_blocking=True)
            moments = batch["moments"].to(self.device, non_blocking=True).float()
            labels = batch["label"].to(self.device, non_blocking=True)
            g = step_generator(cfg.train.seed, step, self.env.rank, micro, self.device)
            x = sample_latents(moments[:, :4], moments[:, 4:], g, scale=cfg.vae.scale)
            with torch.no_grad():
                tokens = self.encoder(images)
            with self.engine.autocast():
                parts = reg_loss(self.engine.module, x, labels, tokens, generator=g,
                                 loss_cfg=cfg.loss, class_dropout_prob=cfg.model.class_dropout_prob)
            total = parts.total * math.nan if nan else parts.total
            self.engine.backward(total, last_micro=micro == plan.accumulation - 1,
                                 accumulation=plan.accumulation)
            for i, value in enumerate((total, parts.img, parts.proj, parts.cls)):
                sums[i] += float(value.detach())
        lr = cfg.train.lr
        return self.engine.step(lr), sums, wait

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> str:
        cfg, env = self.cfg, self.env
        t = cfg.train
        stop = StopFlag().install()
        deadline = self.deadline
        watchdog = Watchdog(self.run_dir / "stacks" / f"rank{env.rank:05d}.txt", t.watchdog_s)
        faults = faulty_steps()
        guard = NonFiniteGuard(t.max_nonfinite_steps, self.progress.nonfinite_total)
        window = _Window()
        status = "completed"
        if self.tracker is not None:
            self.tracker.set_tags({"engine": self.engine.kind, "world_size": str(env.world_size),
                                   "resumed_from": self.resumed_from or ""})
        if env.is_main:
            log.info("training %s from step %d to %d: %d processes x %d micro-batch x %d "
                     "accumulation = %d images/step, engine %s", self.run_dir, self.progress.step,
                     t.max_steps, env.world_size, self.plan.micro, self.plan.accumulation,
                     self.plan.global_batch, self.engine.kind)
        watchdog.arm(max(t.watchdog_s, FIRST_STEP_WATCHDOG_S))
        first = True
        try:
            while self.progress.step < t.max_steps:
                p = self.progress
                t0 = time.perf_counter()
                nan = p.step in faults
                faults.discard(p.step)
                result, sums, wait = self._train_step(p.step, nan)
                guard.record(result.applied)
                if result.applied:
                    self.engine.update_ema(t.ema_decay)
                p.step += 1
                p.images += self.plan.global_batch
                p.nonfinite_total = guard.total
                step_s = time.perf_counter() - t0
                deadline.observe(step_s=step_s)
                window.add(result, sums, wait, step_s, self.plan.accumulation)
                watchdog.arm()
                if first:
                    first = False
                    self.metrics.log({"time/first_step_s": time.time() - _process_start()}, p.step)
                if not result.applied:
                    log.warning("step %d: non-finite gradient norm, step skipped (%d in a row, %d "
                                "in total)", p.step, guard.in_a_row, guard.total)
                if guard.rollback_due:
                    self._rollback(guard)
                    continue
                stop_now = self._agree(stop, deadline)
                if stop_now:
                    status = stop_now
                    self._save(blocking=True)
                    log.info("%s at step %d: checkpoint saved, exiting for requeue", status, p.step)
                    break
                if p.step % t.ckpt_every == 0 or p.step == t.max_steps:
                    self._save(blocking=not cfg.engine.async_checkpoint or p.step == t.max_steps)
                if p.step % t.log_every == 0:
                    self._log(window, guard)
                    window = _Window()
            self._finish_pending()
            dist.barrier()  # every rank returns only once the last checkpoint is published
        finally:
            watchdog.disarm()
            stop.restore()
        return status

    def _agree(self, stop: StopFlag, deadline: Deadline) -> Optional[str]:
        """The per-step all-reduce: stop signal, deadline, background save state."""
        writing = failed = 0
        if self.pending is not None:
            state = self.pending.state()
            writing, failed = int(state == 1), int(state == 2)
        flags = dist.all_max([float(stop.raised), float(deadline.reached()), writing, failed],
                             self.device)
        if self.pending is not None and flags[2] == 0:
            self._publish_pending(failed=bool(flags[3]))
        if flags[0]:
            return "preempted"
        if flags[1]:
            return "deadline"
        return None

    # -- checkpoints ---------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        return {
            "step": p.step, "images": p.images, "config_hash": config_hash(cfg),
            "world_size": self.env.world_size,
            "engine": {"kind": cfg.engine.kind, "zero_stage": cfg.engine.zero_stage,
                       "precision": cfg.train.precision},
            "batch": {"global": self.plan.global_batch, "micro": self.plan.micro,
                      "accumulation": self.plan.accumulation},
            "data_state": dist.gather_objects(self.stream.state_dict()),
            "rng": {"seed": cfg.train.seed,
                    "derivation": "torch.Generator per micro-batch seeded by "
                                  "sha256('regscale:seed:step:rank:micro')[:8]"},
            "health": {"nonfinite_total": p.nonfinite_total, "rollbacks": p.rollbacks},
            "created_unix": time.time(), "torch": torch.__version__,
        }

    def _save(self, *, blocking: bool) -> None:
        step = self.progress.step
        if step == self.last_saved:
            return
        self._finish_pending()
        tmp = self.store.tmp_dir(step)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        manifest = self._manifest()
        t0 = time.perf_counter()
        future = self.engine.save(tmp, blocking=blocking)
        stall = time.perf_counter() - t0
        if self.env.is_main:
            kill_in_save(step)
        self.pending = PendingSave(tmp, manifest, future, t0)
        self.last_saved = step
        if future is None:
            dist.barrier()
            self._publish_pending(failed=False)
        self.metrics.log({"ckpt/stall_s": stall, "ckpt/async": float(future is not None)}, step)

    def _publish_pending(self, failed: bool) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        self.deadline.observe(save_s=time.perf_counter() - pending.started)
        if failed:
            log.warning("checkpoint write of step %d failed on some rank; it is not published",
                        pending.manifest["step"])
            return
        if self.env.is_main:
            if pending.future is not None:
                pending.future.result()
            final = self.store.publish(pending.tmp, pending.manifest)
            log.info("checkpoint %s published (%.2f s after the save began)", final,
                     time.perf_counter() - pending.started)
            self._sample_grid(int(pending.manifest["step"]))

    def _sample_grid(self, step: int) -> None:
        """Rank 0, with a tracker: EMA samples of a just-published checkpoint, every
        train.sample_every steps. A failure here warns and never stops training."""
        every = self.cfg.train.sample_every
        if self.tracker is None or not every or step % every:
            return
        from regscale.train.samples import sample_grid

        try:
            path = sample_grid(self.cfg, self.run_dir, step, self.device)
        except Exception as err:
            log.warning("sample grid of step %d not made: %s: %s", step, type(err).__name__, err)
            return
        self.tracker.log_image(path, step)

    def _finish_pending(self) -> None:
        """Wait for a background save on every rank, then publish it."""
        if self.pending is None:
            return
        failed = 0
        if self.pending.future is not None:
            try:
                self.pending.future.result()
            except Exception as err:  # reported to all ranks below; the run goes on
                log.warning("background checkpoint write failed: %s", err)
                failed = 1
        flags = dist.all_max([float(failed)], self.device)
        self._publish_pending(failed=bool(flags[0]))

    def _rollback(self, guard: NonFiniteGuard) -> None:
        self._finish_pending()
        found = find_valid(self.store.root) if self.env.is_main else None
        found = dist.broadcast_object((str(found[0]), found[1]) if found else None)
        if found is None:
            raise RuntimeError(f"{guard.in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                               f"{guard.limit}) and no checkpoint to roll back to")
        skipped, total = guard.in_a_row, guard.total
        self._restore(Path(found[0]), found[1])
        self.progress.rollbacks += 1
        self.progress.nonfinite_total = total
        guard.in_a_row = 0
        log.warning("%d non-finite steps in a row: rolled back to %s (rollback %d)",
                    skipped, found[0], self.progress.rollbacks)

    # -- metrics -------------------------------------------------------------------------------

    def _log(self, window: "_Window", guard: NonFiniteGuard) -> None:
        sums = dist.all_sum(window.loss_sums + [window.micro_count, window.wait_s], self.device)
        n = sums[4] if sums[4] > 0 else math.nan  # no applied step in the window: NaN losses
        images_s = window.steps * self.plan.global_batch / max(window.time_s, 1e-9)
        m = {"loss": sums[0] / n, "loss/img": sums[1] / n, "loss/proj": sums[2] / n,
             "loss/cls": sums[3] / n, "grad_norm": window.grad_norm, "lr": self.cfg.train.lr,
             "images_per_s": images_s, "step_s": window.time_s / max(window.steps, 1),
             "data_wait_s": sums[5] / self.env.world_size / max(window.steps, 1),
             "nonfinite_total": float(guard.total), "images": float(self.progress.images),
             **memory_gb(self.device)}
        if self.peak:
            m["mfu"] = images_s * self.flops_per_image / (self.peak * self.env.world_size)
        self.metrics.log(m, self.progress.step)
        self.metrics.say(f"step {self.progress.step}: loss {m['loss']:.4f} grad_norm "
                         f"{m['grad_norm']:.3f} {images_s:.1f} img/s")

    def close(self, status: str) -> None:
        self.engine.close()
        self.stream.close()
        if self.tracker is not None:
            self.tracker.finish(status)


def _process_start() -> float:
    """Unix time this process started (for 'time to first step')."""
    import psutil

    return psutil.Process().create_time()


class _Window:
    """Sums over the steps since the last log line (this rank)."""

    def __init__(self) -> None:
        self.loss_sums = [0.0, 0.0, 0.0, 0.0]
        self.micro_count = 0.0
        self.wait_s = 0.0
        self.time_s = 0.0
        self.steps = 0
        self.grad_norm = math.nan

    def add(self, result: Any, sums: list[float], wait: float, step_s: float, micro: int) -> None:
        self.steps += 1
        self.time_s += step_s
        self.wait_s += wait
        if result.applied:
            self.loss_sums = [a + b for a, b in zip(self.loss_sums, sums)]
            self.micro_count += micro
            self.grad_norm = result.grad_norm
