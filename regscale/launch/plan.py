"""What a submission would do, computed from the config alone (`regscale submit --dry-run`),
including the effective training time ratio to expect at the requested scale (regscale.reliability)
for the recipe's checkpoint interval and for train.ckpt_every=auto."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from regscale.config import CKPT_AUTO, Config, batch_plan, is_remote
from regscale.data.shards import INDEX, read_index
from regscale.errors import UserError
from regscale.reliability import (STATE_BYTES_PER_PARAM, RunCosts, SaveCost, checkpoint_interval_s, expected_ratio,
                                  job_mtbf_s, predicted_save_cost)

IMAGENET_TRAIN_IMAGES = 1_281_167
# What a dry run cannot measure, assumed (stated in the plan); `regscale status RUN` measures them
ASSUMED_MFU = 0.4  # of an H100's dense bf16 peak, for the step time
ASSUMED_STARTUP_S = 300.0  # an allocation's start to its first step (model build, data, compile)
ASSUMED_DETECT_S = 300.0  # a failure until its allocation is released (detection, teardown)


@dataclass
class Reliability:
    """The expected ratio of steps that count to allocated time, at the requested scale."""

    params: int
    nodes: int
    mtbf_s: float
    save: SaveCost
    step_s: float  # assumed
    fixed_steps: Optional[int]  # train.ckpt_every, None for auto
    auto_steps: int
    fixed_ratio: Optional[float]
    auto_ratio: float

    @property
    def every_steps(self) -> int:
        """The interval in force: the recipe's, or auto's expected one."""
        return self.fixed_steps or self.auto_steps


def reliability(cfg: Config) -> Reliability:
    """Young/Daly's interval and the expected ratio, from the model's size, bench_checkpoint's
    figures scaled to it, slurm.node_mtbf_h and the assumptions above."""
    import torch

    from regscale.models import build_model_from_config
    from regscale.train.health import PEAK_FLOPS, train_flops_per_image

    t, s = cfg.train, cfg.slurm
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model_from_config(cfg.model).parameters())
    world = cfg.world_size
    save = predicted_save_cost(params, s.nodes, world, cfg.engine.kind, cfg.engine.async_checkpoint)
    mtbf = job_mtbf_s(s.node_mtbf_h, s.nodes)
    limit_end = predicted_save_cost(params, s.nodes, world, cfg.engine.kind, False).stall_s
    costs = RunCosts(save, limit_end, ASSUMED_STARTUP_S, ASSUMED_DETECT_S, s.time_limit_min * 60.0, mtbf)
    step_s = train_flops_per_image(cfg) * t.batch_size / (world * PEAK_FLOPS["H100"] * ASSUMED_MFU)
    auto_steps = max(1, round(checkpoint_interval_s(save, mtbf) / step_s))
    fixed = None if t.ckpt_every == CKPT_AUTO else int(t.ckpt_every)
    return Reliability(params, s.nodes, mtbf, save, step_s, fixed, auto_steps,
                       expected_ratio(fixed * step_s, costs) if fixed else None,
                       expected_ratio(auto_steps * step_s, costs))


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
    reliability: Reliability
    jobs: list[str]
    warning: Optional[str]  # what a real submit would refuse (data.path missing, ...)


def dataset_size(cfg: Config) -> tuple[int, str]:
    """Samples in the training set: read from local MDS shards, else ImageNet-1k's train split."""
    path = cfg.data.path
    if cfg.data.synthetic:
        return cfg.data.synthetic, "data.synthetic"
    if path and not is_remote(path) and (Path(path) / INDEX).is_file():
        try:
            return sum(shard["samples"] for shard in read_index(path)), f"{path}/{INDEX}"
        except UserError:  # an unreadable index: the plan's warning says so
            pass
    return IMAGENET_TRAIN_IMAGES, "ImageNet-1k train (assumed)"


def refusal(cfg: Config) -> Optional[str]:
    """Why `regscale submit` would refuse the run's files (data, weights, reference), or None."""
    from regscale.launch.submit import check_inputs

    try:
        check_inputs(cfg)
    except UserError as err:
        return str(err)
    return None


def make_plan(cfg: Config) -> Plan:
    t, s = cfg.train, cfg.slurm
    world = cfg.world_size
    batch = batch_plan(t, world)
    images, source = dataset_size(cfg)
    seen = t.batch_size * t.max_steps
    expect = reliability(cfg)
    usable_s = s.time_limit_min * 60 - s.signal_lead_s
    jobs = [f"train: {s.node_range} node(s) x {s.gpus_per_node} task(s), one per GPU, "
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
        checkpoints=t.max_steps // expect.every_steps,
        max_s_per_step_for_ckpt=usable_s / expect.every_steps,
        reliability=expect,
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
        f"checkpoints    every {_interval(plan.reliability)} ({plan.checkpoints} in all), keep last {t.keep_last}"
        + (f" + every {t.keep_every:,}" if t.keep_every else "")
        + "; also saved on preemption and before the time limit",
        f"time limit     {s.time_limit_min} min, signal {s.signal_lead_s} s before: a scheduled "
        f"checkpoint lands within each allocation if a step takes < {plan.max_s_per_step_for_ckpt:.2f} s",
        *_expected(cfg, plan.reliability),
        "jobs:",
    ]
    lines += [f"  - {job}" for job in plan.jobs]
    if plan.warning:
        lines.append(f"WARNING        {plan.warning} (a submit without --dry-run refuses this)")
    return "\n".join(lines)


def _interval(r: Reliability) -> str:
    if r.fixed_steps:
        return f"{r.fixed_steps:,} steps"
    return f"~{r.auto_steps:,} steps (train.ckpt_every=auto: Young/Daly, re-chosen as the save cost is measured)"


def _expected(cfg: Config, r: Reliability) -> list[str]:
    """The plan's lines on failures and the expected ratio of steps that count to allocated time."""
    def interval(steps: int) -> str:
        return f"{steps:,} steps ({steps * r.step_s / 60:.3g} min)"

    ratios = [f"auto every {interval(r.auto_steps)} {r.auto_ratio:.2%}"]
    if r.fixed_steps:
        ratios.insert(0, f"every {interval(r.fixed_steps)} {r.fixed_ratio:.2%}")
    hours = r.mtbf_s / 3600
    return [
        f"failures       node MTBF {cfg.slurm.node_mtbf_h:g} h (slurm.node_mtbf_h) / {r.nodes} node(s): one every "
        + (f"{hours:,.0f} h" if hours >= 100 else f"{hours:.3g} h")
        + f"; {r.save.describe()} at {r.params / 1e6:.3g}M parameters, {STATE_BYTES_PER_PARAM * r.params / r.nodes / 1e9:.3g} GB per node",
        f"expected ratio {' | '.join(ratios)} of allocated GPU time in steps that count (assumed: "
        f"{r.step_s:.3g} s/step at {ASSUMED_MFU:.0%} MFU of an H100, {ASSUMED_STARTUP_S / 60:.0f} min to the first "
        f"step, {ASSUMED_DETECT_S / 60:.0f} min to detect a failure)",
    ]
