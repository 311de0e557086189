"""What a submission would do, computed from the config alone (`regscale submit --dry-run`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from regscale.config import Config, ConfigError, batch_plan, check_paths_for_training, is_remote

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass
class Plan:
    world_size: int
    per_gpu_batch: int
    micro_batch: int
    grad_accum: int
    dataset_images: int
    dataset_source: str
    images_seen: int
    epochs: float
    steps_per_epoch: float
    checkpoints: int
    max_s_per_step_for_ckpt: float
    jobs: list[str]
    warning: Optional[str]  # what a real submit would refuse (data.path missing, ...)


def dataset_size(cfg: Config) -> tuple[int, str]:
    """Samples in the training set: read from local MDS shards, else ImageNet-1k's train split."""
    path = cfg.data.path
    if cfg.data.synthetic:
        return cfg.data.synthetic, "data.synthetic"
    if path and not is_remote(path) and (Path(path) / "index.json").is_file():
        index = json.loads((Path(path) / "index.json").read_text())
        return sum(shard["samples"] for shard in index["shards"]), f"{path}/index.json"
    return IMAGENET_TRAIN_IMAGES, "ImageNet-1k train (assumed)"


def refusal(cfg: Config) -> Optional[str]:
    """Why `regscale submit` would refuse the run's files (data, weights), or None."""
    try:
        check_paths_for_training(cfg)
    except ConfigError as err:
        return str(err)
    return None


def make_plan(cfg: Config) -> Plan:
    t, s = cfg.train, cfg.slurm
    world = cfg.world_size
    batch = batch_plan(t, world)
    images, source = dataset_size(cfg)
    seen = t.batch_size * t.max_steps
    usable_s = s.time_limit_min * 60 - s.signal_lead_s
    jobs = [f"train: {s.nodes} node(s) x {s.gpus_per_node} task(s), one per GPU, "
            f"time limit {s.time_limit_min} min, requeue on preemption/time limit "
            f"(at most {s.max_requeues})"]
    for step in cfg.eval.at_steps:
        jobs.append(f"eval @ step {step}: sample {cfg.eval.num_samples} + FID, own job, does not stop training")
    jobs.append(f"eval (afterok train, kill on invalid dependency): sample {cfg.eval.num_samples} "
                f"images, {cfg.eval.sampler} {cfg.eval.steps} steps, cfg {cfg.eval.cfg_scale}/"
                f"{cfg.eval.cls_cfg_scale}, guidance [{cfg.eval.guidance_low}, "
                f"{cfg.eval.guidance_high}], then FID/sFID/IS/P/R")
    return Plan(
        world_size=world,
        per_gpu_batch=batch.per_rank,
        micro_batch=batch.micro,
        grad_accum=batch.accumulation,
        dataset_images=images,
        dataset_source=source,
        images_seen=seen,
        epochs=seen / images,
        steps_per_epoch=images / t.batch_size,
        checkpoints=t.max_steps // t.ckpt_every,
        max_s_per_step_for_ckpt=usable_s / t.ckpt_every,
        jobs=jobs,
        warning=refusal(cfg),
    )


def format_plan(cfg: Config, plan: Plan) -> str:
    t, s = cfg.train, cfg.slurm
    lines = [
        f"run            {cfg.run.dir}/{cfg.run.name}",
        f"model          SiT-{cfg.model.size} + REG {cfg.model.resolved()}",
        f"engine         {cfg.engine.kind}"
        + (f" ZeRO-{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else "")
        + f", {t.precision}, compile={cfg.engine.compile}, "
          f"activation_checkpointing={cfg.engine.activation_checkpointing}",
        f"world size     {plan.world_size} = {s.nodes} node(s) x {s.gpus_per_node} GPU(s)",
        f"batch          global {t.batch_size} = {plan.world_size} x {plan.per_gpu_batch} per GPU"
        + (f" ({plan.grad_accum} micro-batches of {plan.micro_batch})" if plan.grad_accum > 1 else ""),
        f"length         {t.max_steps:,} steps = {plan.images_seen:,} images = {plan.epochs:.1f} epochs "
        f"of {plan.dataset_images:,} images ({plan.dataset_source}; {plan.steps_per_epoch:,.0f} steps/epoch)",
        f"checkpoints    every {t.ckpt_every:,} steps ({plan.checkpoints} in all), keep last {t.keep_last}"
        + (f" + every {t.keep_every:,}" if t.keep_every else "")
        + "; also saved on preemption and before the time limit",
        f"time limit     {s.time_limit_min} min, signal {s.signal_lead_s} s before: a scheduled "
        f"checkpoint lands within each allocation if a step takes < {plan.max_s_per_step_for_ckpt:.2f} s",
        "jobs:",
    ]
    lines += [f"  - {job}" for job in plan.jobs]
    if plan.warning:
        lines.append(f"WARNING        {plan.warning} (a submit without --dry-run refuses this)")
    return "\n".join(lines)
