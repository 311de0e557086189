"""The training loop: one per process, the same for both engines.

    train(cfg, run_dir, tracker) -> Outcome (completed | preempted | deadline | interrupted)

A step: per micro-batch, draw latents from the VAE posterior, encode images with the frozen
DINOv2 (under the model's autocast), compute the REG loss, backward; then the engine clips and
steps (or skips a non-finite step), the EMA follows (in fp16 after a skipped step too, as the
official loop does; there a loss scale that stays collapsed stops the run after a checkpoint).
Every random draw of a sample comes from a generator seeded by (seed, step, the sample's dataset
index) (train/noise.py), each step's global batch is the same for any number of processes, and
the data stream's position is in every checkpoint, so a resumed run replays exactly what the
uninterrupted one would have done: bit for bit on the same number of processes, up to the order
of reductions on another.
A step reads one number from the device (the gradient norm, to skip non-finite steps); the loss
parts stay on the device until a log step. At each step boundary the ranks agree in one tiny
all-reduce whether to stop (signal, Ctrl-C, deadline), whether to checkpoint (rank 0's
train.ckpt_every=auto decides for all) and whether a background save has finished (the
Checkpointer publishes it then). A log step gathers every rank's step time and data wait
(regscale.train.stragglers names a rank that lags).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from regscale import dist, faults
from regscale import metrics as M
from regscale.config import (Config, ConfigError, batch_plan, changes_numbers, config_hash, flatten,
                             load_saved_config, resume_changes, to_yaml)
from regscale.engine.base import BF16_NUMERICS, LOSS_SCALER, deepspeed_fp16_mode, precision_autocast
from regscale.errors import RunHalted
from regscale.fsutil import read_jsonl, write_atomic
from regscale.outcome import Outcome
from regscale.reliability import CheckpointSchedule, measured_costs, predicted_save_cost
from regscale.rundir import CONFIG, DRAWS, METRICS
from regscale.train.checkpoint import Checkpointer, Published
from regscale.train.health import (LossScaleGuard, MetricsLog, NonFiniteGuard, device_peak_flops, memory_gb,
                                   train_flops_per_image)
from regscale.train.heartbeat import Heartbeat
from regscale.train.noise import DERIVATION, SampleNoise
from regscale.train.preempt import Deadline, StopFlag, job_deadline
from regscale.train.stragglers import StragglerWatch
from regscale.train.threads import pin_threads

if TYPE_CHECKING:
    from regscale.track.mlflow import Tracker

log = logging.getLogger("regscale.train")

GRID_WAIT_S = 600.0  # at the end, the longest wait for a sample grid still being made


@dataclass
class Progress:
    step: int = 0
    images: int = 0
    nonfinite_total: int = 0
    rollbacks: int = 0
    low_scale_steps: int = 0  # fp16: steps in a row with the loss scale below train.min_loss_scale


def train(cfg: Config, run_dir: Path, tracker: Optional["Tracker"] = None, stop: Optional[StopFlag] = None,
          heartbeat: Optional[Heartbeat] = None) -> Outcome:
    """Train (or resume) the run in `run_dir` until train.max_steps, a stop signal or the deadline.

    Returns the Outcome (preempted / deadline / interrupted after saving a checkpoint).
    Reads the distributed environment from torchrun, SLURM or a single process; `stop` is the
    caller's StopFlag when it took over the signals earlier (the node agent's worker does), and
    `heartbeat` its Heartbeat (default: the agent's, from the environment, if any).
    """
    from regscale.data.synthetic import ensure_synthetic_dataset

    _setup_logging()
    stop = (stop or StopFlag()).install()
    pin_threads(cfg.slurm)  # before the smoke data's VAE pass too: its latents depend on the thread count
    ensure_synthetic_dataset(cfg.data, cfg.model.num_classes)  # smoke runs: rank 0 generates, the others wait (bounded)
    owns_group = not torch.distributed.is_initialized()
    env = dist.setup()
    trainer = None
    outcome = Outcome.FAILED
    try:
        trainer = Trainer(cfg, Path(run_dir), env, tracker if env.is_main else None, heartbeat)
        outcome = trainer.run(stop)
        return outcome
    except KeyboardInterrupt:  # a second Ctrl-C: no agreement, no save
        outcome = Outcome.INTERRUPTED
        newest = trainer.checkpointer.last_saved if trainer else -1
        log.warning("interrupted again: nothing more saved (newest checkpoint: %s)",
                    f"step {newest}" if newest >= 0 else "none")
        return outcome
    finally:
        stop.restore()
        if trainer is not None:
            trainer.close(outcome)
        elif tracker is not None and env.is_main:
            tracker.finish(outcome)  # the trainer never started: the run must not stay RUNNING
        if owns_group:
            dist.teardown()


def _setup_logging() -> None:
    root = logging.getLogger("regscale")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = dist.read_layout().rank
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


class Trainer:
    """The state of one training process; `run` is the loop."""

    def __init__(self, cfg: Config, run_dir: Path, env: dist.DistEnv, tracker: Optional["Tracker"],
                 heartbeat: Optional[Heartbeat] = None) -> None:
        from regscale.data.stream import TrainStream
        from regscale.engine import build_engine
        from regscale.models import build_model_from_config
        from regscale.models.encoders import load_dinov2

        self.cfg, self.run_dir, self.env, self.tracker = cfg, run_dir, env, tracker
        self.heartbeat = heartbeat or Heartbeat.from_env(cfg.train.hang_timeout_s, cfg.train.first_step_timeout_s)
        self.device = env.device
        self.plan = batch_plan(cfg.train, env.world_size)
        t = cfg.train
        self._check_config()
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        self.threads = pin_threads(cfg.slurm)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model_from_config(cfg.model)
        params = sum(p.numel() for p in model.parameters())
        self.encoder = load_dinov2(cfg.encoder, embed_dim=cfg.model.cls_token_dim,
                                   seed=t.seed).to(self.device)
        self.engine = build_engine(cfg.engine, t, model, env, self.plan)
        self.checkpointer = Checkpointer(run_dir, self.engine, env, keep_last=t.keep_last,
                                         keep_every=t.keep_every, protect=tuple(cfg.eval.at_steps),
                                         asynchronous=cfg.engine.async_checkpoint)
        self.checkpointer.prepare()
        self.stream = TrainStream(cfg.data, t, env.rank, env.world_size, self.plan.micro)
        self.noise = SampleNoise(t.seed, cfg.model.cls_token_dim, cfg.loss.time_sampling, self.device,
                                 trace=run_dir / DRAWS / f"rank{env.rank:05d}.jsonl")
        self._batches = None
        self.progress = Progress()
        self.metrics = MetricsLog(run_dir / METRICS, tracker, enabled=env.is_main)
        self.flops_per_image = train_flops_per_image(cfg)
        self.peak = device_peak_flops(self.device)
        self.deadline = Deadline(job_deadline())
        self._grid: Optional[threading.Thread] = None
        found = self.checkpointer.newest_valid(at_start=True)
        self.resumed_from = str(found[0]) if found else None
        if found:
            self._restore(*found)
        self.hosts = list(dist.host_layout().hosts)
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or len(set(self.hosts)))
        self.schedule = CheckpointSchedule(
            cfg, is_main=env.is_main, nodes=nodes, start_step=self.progress.step,
            predicted=predicted_save_cost(params, nodes, env.world_size, cfg.engine.kind, cfg.engine.async_checkpoint),
            history=measured_costs(read_jsonl(run_dir / METRICS), cfg.engine.async_checkpoint) if env.is_main else ())
        self.stragglers = (StragglerWatch(run_dir, self.hosts, t.straggler_factor, t.straggler_windows, self.tracker)
                           if env.is_main else None)
        self._save_due = False

    # -- setup ---------------------------------------------------------------------------------

    def _check_config(self) -> None:
        """Every rank: a run directory keeps its experiment. A change of a key that defines it is
        refused (tracked or not); keys that may change on resume are taken and saved (rank 0)."""
        path = self.run_dir / CONFIG
        changed: dict[str, str] = {}
        if path.is_file():
            changed = resume_changes(flatten(load_saved_config(path)), flatten(self.cfg), str(path))
        if self.env.is_main and (changed or not path.is_file()):
            if changed:
                log.info("%s: resuming with %s", path, ", ".join(f"{k}={v}" for k, v in sorted(changed.items())))
            write_atomic(path, to_yaml(self.cfg))

    def _restore(self, path: Path, manifest: dict[str, Any]) -> None:
        same_world = manifest["world_size"] == self.env.world_size
        kind = manifest["engine"]["kind"]
        if kind != self.engine.kind:
            raise ConfigError(f"checkpoint {path} was written by engine '{kind}', this run uses "
                              f"engine.kind={self.engine.kind}; export it and start a new run instead")
        changed = resume_changes(manifest.get("config", {}), flatten(self.cfg), f"checkpoint {path}")
        self.engine.load(path, manifest)
        scaler = self.engine.scaler
        if scaler is not None and manifest.get(LOSS_SCALER):
            scaler.load_state_dict(manifest[LOSS_SCALER])
        data_states = manifest["data_state"]
        self.stream.load_state_dict(data_states[self.env.rank] if same_world else data_states[0])
        self._batches = None
        h = manifest["health"]
        self.progress = Progress(step=manifest["step"], images=manifest["images"],
                                 nonfinite_total=h["nonfinite_total"], rollbacks=h["rollbacks"],
                                 low_scale_steps=h.get("low_scale_steps", 0))
        self.checkpointer.last_saved = manifest["step"]
        if self.env.is_main:
            notes = []
            if not same_world:
                notes.append(f"resharded from {manifest['world_size']} to {self.env.world_size} processes: "
                             "same samples and noise; reduction order differs")
            numeric = sorted(k for k in changed if changes_numbers(k))
            if numeric:
                notes.append(f"{', '.join(numeric)} changed: NOT bit-exact")
            elif "config" not in manifest and manifest["config_hash"] != config_hash(self.cfg):
                notes.append("configuration changed (config hash): NOT bit-exact")
            if self.cfg.train.precision == "bf16" and manifest["engine"].get("bf16_numerics") != BF16_NUMERICS:
                notes.append("written with bf16 weights (regscale's bf16 before it was the official mixed "
                             "precision), continued with fp32 weights under autocast: NOT bit-exact")
            if scaler is not None and not manifest.get(LOSS_SCALER):
                legacy = (" with fp16 weights (DeepSpeed's fp16 mode, regscale's fp16 before it was the official "
                          "mixed precision)" if deepspeed_fp16_mode(manifest) else "")
                notes.append(f"written{legacy} without the fp16 loss scale: continued with fp32 weights under "
                             f"autocast and a fresh loss scale ({scaler.get_scale():g}): NOT bit-exact")
            if manifest.get("torch", torch.__version__) != torch.__version__:
                notes.append(f"written with torch {manifest['torch']}, now {torch.__version__}: NOT bit-exact")
            if self.device.type == "cpu" and manifest.get("threads", self.threads) != self.threads:
                notes.append(f"{manifest['threads']} -> {self.threads} intra-op threads per process "
                             "(slurm.cpus_per_task): NOT bit-exact")
            log.info("resumed from %s (step %d, %d images; %s)", path, manifest["step"],
                     manifest["images"], "; ".join(notes) or "bit-exact")

    # -- one step ------------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.stream)
        try:
            return next(self._batches)
        except StopIteration:  # end of an epoch: the stream starts the next one
            self._batches = iter(self.stream)
            return next(self._batches)

    def _train_step(self, step: int, fault: Optional[float]) -> tuple[Any, torch.Tensor, float]:
        """Forward/backward over the micro-batches and the engine step. Returns (StepResult,
        the loss parts [total, img, proj, cls] summed over micro-batches (on the device), data
        wait in s). Reads nothing from the device but what the engine's step needs. `fault`: what
        a test's NAN or OVERFLOW fault multiplies the loss by."""
        from regscale.objective import reg_loss, sample_latents

        cfg, plan = self.cfg, self.plan
        sums = torch.zeros(4, device=self.device)
        wait = 0.0
        for micro in range(plan.accumulation):
            t0 = time.perf_counter()
            batch = self._next_batch()
            wait += time.perf_counter() - t0
            images = batch["image"].to(self.device, non_blocking=True)
            moments = batch["moments"].to(self.device, non_blocking=True).float()
            labels = batch["label"].to(self.device, non_blocking=True)
            mean, std = moments.chunk(2, dim=1)
            eps, draws = self.noise(step, batch["index"], mean.shape[1:])
            x = sample_latents(mean, std, eps, scale=cfg.vae.scale)
            with torch.no_grad(), precision_autocast(cfg.train.precision, self.device):
                tokens = self.encoder(images)
            with self.engine.autocast():
                parts = reg_loss(self.engine.module, x, labels, tokens, draws=draws,
                                 loss_cfg=cfg.loss, class_dropout_prob=cfg.model.class_dropout_prob)
            total = parts.total if fault is None else parts.total * fault
            self.engine.backward(total, last_micro=micro == plan.accumulation - 1,
                                 accumulation=plan.accumulation)
            sums += torch.stack([total, parts.img, parts.proj, parts.cls]).detach().float()
        self.checkpointer.wait_staged()  # the step changes the weights a save may still be copying
        return self.engine.step(cfg.train.lr), sums, wait

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> Outcome:
        cfg, env = self.cfg, self.env
        t = cfg.train
        deadline = self.deadline
        fp16 = self.engine.scaler is not None
        guard = NonFiniteGuard(None if fp16 else t.max_nonfinite_steps, self.progress.nonfinite_total)
        scale_guard = LossScaleGuard(t.min_loss_scale, t.max_low_scale_steps, self.progress.low_scale_steps)
        window = _Window(self.device)
        outcome = Outcome.COMPLETED
        if self.tracker is not None:
            self.tracker.set_tags({"engine": self.engine.kind, "world_size": str(env.world_size),
                                   "resumed_from": self.resumed_from or ""})
        if env.is_main:
            log.info("training %s from step %d to %d: %d processes x %d micro-batch x %d "
                     "accumulation = %d images/step, engine %s", self.run_dir, self.progress.step,
                     t.max_steps, env.world_size, self.plan.micro, self.plan.accumulation,
                     self.plan.global_batch, self.engine.kind)
        first, cycle = True, None
        slow_s = faults.slow_step_s(env.rank)
        while self.progress.step < t.max_steps:
            p = self.progress
            t0 = time.perf_counter()
            if cycle is not None:  # the previous step, boundary to boundary (not the first: it compiles)
                self.schedule.observe_step(t0 - cycle)
            cycle = None if first else t0
            result, sums, wait = self._train_step(p.step, faults.loss_factor(p.step))
            if slow_s:
                time.sleep(slow_s)
            guard.record(result.applied)
            if result.applied or fp16:  # the official fp16 loop updates it whatever the scaler did
                self.engine.update_ema(t.ema_decay)
            p.step += 1
            p.images += self.plan.global_batch
            p.nonfinite_total = guard.total
            if fp16:
                scale_guard.record(result.loss_scale)
                p.low_scale_steps = scale_guard.low_steps
            step_s = time.perf_counter() - t0
            deadline.observe(step_s=step_s)
            window.add(result, sums, wait, step_s, self.plan.accumulation)
            self.heartbeat.beat(p.step)
            if first:
                first = False
                self.metrics.log({M.FIRST_STEP_S: time.time() - _process_start(),
                                  M.FIRST_STEP_DURATION_S: step_s}, p.step)
            if not result.applied and fp16:
                log.warning("step %d: gradients overflowed at loss scale %g: step skipped, scale halved "
                            "(%d in a row, %d in total)", p.step, result.loss_scale, guard.in_a_row, guard.total)
            elif not result.applied:
                log.warning("step %d: non-finite gradient norm, step skipped (%d in a row, %d "
                            "in total)", p.step, guard.in_a_row, guard.total)
            if guard.rollback_due:
                self._rollback(guard)
                continue
            stop_now = self._agree(stop, deadline)
            if stop_now:
                outcome = stop_now
                self._save(blocking=True)
                self._say_stopped(outcome)
                break
            if self._save_due or p.step == t.max_steps:
                self._save(blocking=p.step == t.max_steps)
            if p.step % t.log_every == 0:
                self._log(window, guard)
                window = _Window(self.device)
            if fp16 and scale_guard.collapsed:
                self._save(blocking=True)
                self._published(self.checkpointer.finish())  # this step's own save may be in flight
                raise RunHalted(self._collapsed(scale_guard))
        self.heartbeat.waiting(t.first_step_timeout_s)
        self._published(self.checkpointer.finish())
        dist.barrier("finish training (the last checkpoint is published)")
        return outcome

    def _agree(self, stop: StopFlag, deadline: Deadline) -> Optional[Outcome]:
        """The per-step all-reduce: stop signals, deadline, whether to checkpoint now, and the
        background save's state."""
        flags = dist.all_max([float(stop.interrupted), float(stop.raised), float(deadline.reached()),
                              float(self.schedule.due(self.progress.step)), *self.checkpointer.flags()])
        self._save_due = bool(flags[3])
        self._published(self.checkpointer.agreed(*flags[4:]))
        if flags[0]:
            return Outcome.INTERRUPTED
        if flags[1]:
            return Outcome.PREEMPTED
        if flags[2]:
            return Outcome.DEADLINE
        return None

    def _collapsed(self, scale_guard: LossScaleGuard) -> str:
        """Why the run stops when fp16's loss scale collapsed (a checkpoint of this step is saved)."""
        p, t, scale = self.progress, self.cfg.train, self.engine.scaler.get_scale()
        return (f"step {p.step}: the fp16 loss scale collapsed: below train.min_loss_scale={t.min_loss_scale:g} "
                f"for {scale_guard.low_steps} steps in a row (train.max_low_scale_steps={t.max_low_scale_steps}; "
                f"now {scale:g}; skipped steps in total: {p.nonfinite_total}); checkpoint step {p.step} is saved and "
                f"the run stops. See loss and grad_norm in {self.run_dir / METRICS}; bf16 (a new run) has no "
                f"such range limit; `regscale resume {self.run_dir} train.min_loss_scale=0` goes on regardless")

    def _say_stopped(self, outcome: Outcome) -> None:
        step = self.progress.step
        if outcome is Outcome.INTERRUPTED:
            log.info("interrupted at step %d: checkpoint step %d saved; start the same command again "
                     "to resume from it", step, step)
        else:
            log.info("%s at step %d: checkpoint saved, exiting for requeue", outcome.value, step)

    # -- checkpoints ---------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        """The training state a checkpoint carries besides the engine's files (gathers the data
        stream positions of every rank)."""
        cfg, p = self.cfg, self.progress
        return {
            "step": p.step, "images": p.images, "config_hash": config_hash(cfg),
            "config": {k: str(v) for k, v in flatten(cfg).items()},
            "world_size": self.env.world_size,
            "engine": {"kind": cfg.engine.kind, "zero_stage": cfg.engine.zero_stage,
                       "precision": cfg.train.precision, "bf16_numerics": BF16_NUMERICS},
            "batch": {"global": self.plan.global_batch, "micro": self.plan.micro,
                      "accumulation": self.plan.accumulation},
            "data_state": dist.gather_objects(self.stream.state_dict(), "gather the data positions"),
            "rng": {"seed": cfg.train.seed, "derivation": DERIVATION},
            "threads": self.threads,
            "health": {"nonfinite_total": p.nonfinite_total, "rollbacks": p.rollbacks,
                       "low_scale_steps": p.low_scale_steps},
            LOSS_SCALER: self.engine.scaler.state_dict() if self.engine.scaler else None,
            "created_unix": time.time(), "torch": torch.__version__,
        }

    def _save(self, *, blocking: bool) -> None:
        """Checkpoint this step; a save still in flight is published (and recorded) first."""
        if self.progress.step == self.checkpointer.last_saved:
            return
        if blocking:
            self.heartbeat.waiting(self.cfg.train.first_step_timeout_s)
        self._published(self.checkpointer.finish())
        self.schedule.saved(self.progress.step)
        self._published(self.checkpointer.save(self.progress.step, self._manifest, blocking=blocking))

    def _published(self, done: Optional[Published]) -> None:
        """A checkpoint became visible: its costs, the deadline's estimate, the sample grid."""
        if done is None:
            return
        self.deadline.observe(save_s=done.save_s)
        self.schedule.observe_save(done.stall_s, done.save_s, done.asynchronous)
        self.metrics.log({M.CKPT_STALL_S: done.stall_s, M.CKPT_SAVE_S: done.save_s,
                          M.CKPT_ASYNC: float(done.asynchronous), M.CKPT_COPY_WAIT_S: done.copy_wait_s,
                          **({M.CKPT_EVERY_STEPS: float(self.schedule.every_steps)}
                             if self.schedule.every_steps else {})}, done.step)
        self._start_grid(done.step)

    def _start_grid(self, step: int) -> None:
        """Rank 0, with a tracker, every train.sample_every steps: EMA samples of a just-published
        checkpoint, made in a background thread (training goes on; a failure only warns)."""
        every = self.cfg.train.sample_every
        if self.tracker is None or not every or step % every:
            return
        if self._grid is not None and self._grid.is_alive():
            log.warning("sample grid of step %d skipped: the previous one is still being made", step)
            return
        self._grid = threading.Thread(target=self._make_grid, args=(step,), name="regscale-sample-grid",
                                      daemon=True)
        self._grid.start()

    def _make_grid(self, step: int) -> None:
        from regscale.train.samples import sample_grid

        try:
            path = sample_grid(self.cfg, self.run_dir, step, self.device)
        except Exception as err:
            log.warning("sample grid of step %d not made: %s: %s", step, type(err).__name__, err)
            return
        self.tracker.log_image(path, step)

    def _rollback(self, guard: NonFiniteGuard) -> None:
        self._published(self.checkpointer.finish())
        found = self.checkpointer.newest_valid(at_start=False)
        if found is None:
            raise RuntimeError(f"{guard.in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                               f"{guard.limit}) and no checkpoint to roll back to")
        skipped, total = guard.in_a_row, guard.total
        self.heartbeat.waiting(self.cfg.train.first_step_timeout_s)
        self._restore(*found)
        self.progress.rollbacks += 1
        self.progress.nonfinite_total = total
        guard.in_a_row = 0
        log.warning("%d non-finite steps in a row: rolled back to %s (rollback %d)",
                    skipped, found[0], self.progress.rollbacks)

    # -- metrics -------------------------------------------------------------------------------

    def _log(self, window: "_Window", guard: NonFiniteGuard) -> None:
        """One log line: the window's device sums are read here, once."""
        local = window.loss_sums.tolist() + [window.micro_count, window.wait_s, window.time_s]
        ranks = dist.all_gather(local)  # the one collective of a log step: every rank's numbers
        sums = [sum(column) for column in zip(*ranks)]
        n = sums[4] if sums[4] > 0 else math.nan  # no applied step in the window: NaN losses
        images_s = window.steps * self.plan.global_batch / max(window.time_s, 1e-9)
        m = {M.LOSS: sums[0] / n, M.LOSS_IMG: sums[1] / n, M.LOSS_PROJ: sums[2] / n,
             M.LOSS_CLS: sums[3] / n, M.GRAD_NORM: window.grad_norm, M.LR: self.cfg.train.lr,
             M.IMAGES_PER_S: images_s, M.STEP_S: window.time_s / max(window.steps, 1),
             M.DATA_WAIT_S: sums[5] / self.env.world_size / max(window.steps, 1),
             M.NONFINITE_TOTAL: float(guard.total), M.IMAGES: float(self.progress.images),
             **memory_gb(self.device)}
        if self.peak:
            m[M.MFU] = images_s * self.flops_per_image / (self.peak * self.env.world_size)
        if self.stragglers is not None:
            m.update(self.stragglers.add(self.progress.step, [r[6] for r in ranks], [r[5] for r in ranks],
                                         max(window.steps, 1)))
        if window.loss_scale is not None:
            m[M.LOSS_SCALE] = window.loss_scale
        self.metrics.log(m, self.progress.step)
        scale = f" loss scale {window.loss_scale:g}" if window.loss_scale is not None else ""
        self.metrics.say(f"step {self.progress.step}: loss {m[M.LOSS]:.4f} grad_norm "
                         f"{m[M.GRAD_NORM]:.3f}{scale} {images_s:.1f} img/s")

    def close(self, outcome: Outcome) -> None:
        if self._grid is not None and self._grid.is_alive():
            log.info("waiting (at most %.0f s) for the sample grid still being made", GRID_WAIT_S)
            self._grid.join(GRID_WAIT_S)
        self.checkpointer.close()
        self.stream.close()
        if self.tracker is not None:
            self.tracker.finish(outcome)


def _process_start() -> float:
    """Unix time this process started (for 'time to first step')."""
    import psutil

    return psutil.Process().create_time()


class _Window:
    """Sums over the steps since the last log line (this rank); the losses stay on the device."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sums = torch.zeros(4, device=device)
        self.micro_count = 0.0
        self.wait_s = 0.0
        self.time_s = 0.0
        self.steps = 0
        self.grad_norm = math.nan
        self.loss_scale: Optional[float] = None

    def add(self, result: Any, sums: torch.Tensor, wait: float, step_s: float, micro: int) -> None:
        self.steps += 1
        self.time_s += step_s
        self.wait_s += wait
        self.loss_scale = result.loss_scale
        if result.applied:
            self.loss_sums += sums
            self.micro_count += micro
            self.grad_norm = result.grad_norm
