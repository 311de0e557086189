"""The distributed environment of one training process: who am I, how many are we, which device.

Read from SLURM (srun / submitit), torchrun, or nothing at all (a single process). gloo on CPU,
NCCL for CUDA tensors plus gloo for CPU-side collectives (async checkpoints, object gathers).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from regscale.config import Config, ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    source: str  # slurm | torchrun | single
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class BatchPlan:
    """Global batch = world_size x micro_batch x accumulation, whatever the world size."""

    global_batch: int
    per_rank: int
    micro: int
    accumulation: int


def read_env() -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, source) from torchrun, SLURM, or a single process.

    torchrun's variables win over SLURM's: torchrun inside an sbatch allocation sets both.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return (int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                "slurm")
    return 0, 0, 1, "single"


def _slurm_master_addr() -> str:
    """The first host of the SLURM node list (scontrol expands ranges like n[1-4])."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0].split("[")[0]


def setup(timeout_s: int = 1800) -> DistEnv:
    """Initialise torch.distributed (also for one process, so the engines see one code path)."""
    rank, local_rank, world, source = read_env()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", _slurm_master_addr() if source == "slurm" else "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        job = os.environ.get("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000) if job else "29500"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, source=source, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """Per-rank batch and gradient accumulation that keep `train.batch_size` global."""
    total = cfg.train.batch_size
    if total % world_size:
        raise ConfigError(f"'train.batch_size' ({total}) must be divisible by the number of "
                          f"processes ({world_size})")
    per_rank = total // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"'train.micro_batch_size' ({micro}) must divide the per-process batch "
                          f"({per_rank} = {total} / {world_size} processes)")
    return BatchPlan(global_batch=total, per_rank=per_rank, micro=micro, accumulation=per_rank // micro)


def all_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks: the one tiny all-reduce per step."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
