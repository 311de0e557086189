"""The distributed bottom layer: where this process sits, the process group, and the collectives.

`read_layout` is the one reader of the launcher's variables: torchrun's (also what submitit and
`setup` export), else SLURM's (a plain srun), else a single process. torchrun and submitit own
MASTER_ADDR / MASTER_PORT; under a plain srun, submitit's TorchDistributedEnvironment derives
them from the job. gloo on CPU; NCCL for CUDA tensors plus gloo for CPU-side collectives (object
gathers, async checkpoints). Every wait is bounded and says what it waits for: the rendezvous by
`RENDEZVOUS_S` (REGSCALE_RENDEZVOUS_S), collectives by the process group's timeout.

Nothing here knows about configs, models or runs; every other layer may import it.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from regscale.errors import UserError, first_line

if TYPE_CHECKING:
    import torch

RENDEZVOUS_S = 60.0  # a process that finds no peers within this long fails, naming the variables
COLLECTIVE_S = 1800.0  # a collective waiting longer than this for a peer fails


@dataclass(frozen=True)
class Layout:
    """This process's place: global rank and world, rank and process count on its host."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class DistEnv(Layout):
    """A joined process group's layout and this process's device."""

    device: "torch.device"


def _int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def launcher_layout() -> Optional[Layout]:
    """The layout a launcher set in the environment (torchrun's variables win over SLURM's:
    torchrun inside an sbatch allocation sets both), or None when no launcher did."""
    env = os.environ
    if ("RANK" in env) != ("WORLD_SIZE" in env):  # launchers set both: a stray one is a mistake
        given = "RANK" if "RANK" in env else "WORLD_SIZE"
        raise UserError(f"{given}={env[given]!r} is set but {'WORLD_SIZE' if given == 'RANK' else 'RANK'} is not: "
                        "start the processes with torchrun or srun, or unset it to run one process")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int("WORLD_SIZE")
        local_world = _int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        local_rank = _int("LOCAL_RANK") if "LOCAL_RANK" in env else 0
        layout = Layout(_int("RANK"), local_rank, world, local_world)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int("SLURM_NTASKS")
        nodes = _int("SLURM_JOB_NUM_NODES") if "SLURM_JOB_NUM_NODES" in env else 1
        local_rank = _int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        layout = Layout(_int("SLURM_PROCID"), local_rank, world, max(1, world // max(nodes, 1)))
    else:
        return None
    if not (0 <= layout.rank < layout.world_size):
        raise UserError(f"rank {layout.rank} is outside the world of {layout.world_size} processes "
                        "(RANK / WORLD_SIZE or SLURM_PROCID / SLURM_NTASKS in the environment)")
    return layout


def read_layout() -> Layout:
    """This process's layout: the launcher's, or a single process."""
    return launcher_layout() or Layout(0, 0, 1, 1)


def export_launcher_env() -> None:
    """Under a plain srun or submitit's runner (SLURM or local), where no torchrun set RANK: export
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT by submitit's rule (the
    master is the job's first host; the port derives from the job id, or MASTER_PORT if set)."""
    in_task = "SLURM_PROCID" in os.environ or "SUBMITIT_LOCAL_JOB_ID" in os.environ  # not a salloc shell
    if "RANK" in os.environ or not in_task:
        return
    import submitit

    try:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    except RuntimeError as err:  # stray SLURM_* variables outside a job step
        found = ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("SLURM_", "SUBMITIT_")))
        raise UserError(f"the environment looks like a SLURM or submitit task ({found[:200]}) but is not one "
                        f"({first_line(err)}): unset those variables to run one process") from None


def _rendezvous_s() -> float:
    value = os.environ.get("REGSCALE_RENDEZVOUS_S")
    if not value:
        return RENDEZVOUS_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UserError(f"REGSCALE_RENDEZVOUS_S={value!r}: expected a positive number of seconds")
    return seconds


def _store(layout: Layout, timeout: datetime.timedelta) -> Any:
    """The rendezvous store: every process of the world connected within `timeout`, or a
    UserError naming the variables that promised them."""
    import torch.distributed as dist

    if layout.world_size == 1:
        return dist.HashStore()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UserError(f"RANK={layout.rank} WORLD_SIZE={layout.world_size} are set but "
                        f"{' and '.join(missing)} not: start the processes with torchrun or srun, "
                        "or unset RANK and WORLD_SIZE to train in one process")
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", layout.rank, layout.world_size, timeout=timeout))
    except (RuntimeError, ValueError, OSError) as err:  # DistStoreError and DistNetworkError too
        raise UserError(
            f"no rendezvous of {layout.world_size} processes at MASTER_ADDR:MASTER_PORT={where} "
            f"within {timeout.total_seconds():.0f} s (this is RANK={layout.rank} of WORLD_SIZE="
            f"{layout.world_size} from the environment; {first_line(err)}): start every rank (torchrun, srun), "
            "or unset RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT to run one process") from None
    return store


def local_device(layout: Layout) -> "torch.device":
    """The GPU of this local rank (made current), or the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(layout.local_rank)
        return torch.device("cuda", layout.local_rank)
    return torch.device("cpu")


def setup(collective_s: float = COLLECTIVE_S) -> DistEnv:
    """Join the process group the launcher describes (also for one process, so the engines see one
    code path) and pick this process's device; returns where it sits."""
    import torch.distributed as dist

    export_launcher_env()
    layout = read_layout()
    device = local_device(layout)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    for name, value in (("RANK", layout.rank), ("WORLD_SIZE", layout.world_size),
                        ("LOCAL_RANK", layout.local_rank), ("LOCAL_WORLD_SIZE", layout.local_world_size)):
        os.environ.setdefault(name, str(value))  # what torchrun sets, for libraries (DeepSpeed)
    if not dist.is_initialized():
        store = _store(layout, datetime.timedelta(seconds=_rendezvous_s()))
        timeout = datetime.timedelta(seconds=collective_s)
        dist.init_process_group(backend=backend, store=store, rank=layout.rank,
                                world_size=layout.world_size, timeout=timeout)
        store.set_timeout(timeout)  # later store waits (new groups) are collectives too
    return DistEnv(layout.rank, layout.local_rank, layout.world_size, layout.local_world_size, device)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def waiting(what: str) -> Iterator[None]:
    """A collective that fails (a peer died, or none answered within the process group's
    timeout) raises UserError saying what this rank waited for, instead of gloo's message."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, dist.DistError) and not any(
                k in text for k in ("Timed out", "timed out", "Connection closed", "Connection reset", "gloo")):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise UserError(f"rank {rank} waited for every rank to {what}, in vain ({first_line(err)}): another rank "
                        "stopped or hangs; its log says why") from None


def all_max(values: list[float], what: str = "agree on stopping and saving") -> list[float]:
    """Element-wise maximum over ranks: the one tiny all-reduce per step. Host numbers, reduced
    on the CPU (gloo), so that reading the result never waits for the GPU."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if _joined():
        with waiting(what):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather(values: list[float], what: str = "gather the logged metrics") -> list[list[float]]:
    """Every rank's host numbers, in rank order (on the CPU, like all_max)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if not _joined():
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    with waiting(what):
        dist.all_gather(out, t)
    return [o.tolist() for o in out]


def barrier(what: str) -> None:
    """Wait until every rank is here; `what` names the step, for the error."""
    import torch.distributed as dist

    if _joined():
        with waiting(what):
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0, what: str = "share rank 0's decision") -> Any:
    """Rank `src`'s object on every rank."""
    import torch.distributed as dist

    if not _joined():
        return obj
    box = [obj]
    with waiting(what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, what: str = "exchange their parts") -> list:
    """Every rank's object, in rank order, on every rank."""
    import torch.distributed as dist

    if not _joined():
        return [obj]
    out: list = [None] * dist.get_world_size()
    with waiting(what):
        dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class HostLayout:
    """Ranks grouped by the host they run on (what shares /dev/shm), whatever SLURM calls a node."""

    local_rank: int
    local_world_size: int
    hosts: tuple[str, ...]

    @property
    def contiguous(self) -> bool:
        """Equal blocks of consecutive ranks per host (what streaming's node model needs)."""
        n, per = len(self.hosts), self.local_world_size
        return n % per == 0 and all(self.hosts[i] == self.hosts[i - i % per] for i in range(n))


def host_layout() -> HostLayout:
    """Gather every rank's hostname (a collective: all ranks call it)."""
    import torch.distributed as dist

    hosts = tuple(gather_objects(socket.gethostname(), "exchange their host names"))
    rank = dist.get_rank() if _joined() else 0
    return HostLayout(hosts[:rank].count(hosts[rank]), hosts.count(hosts[rank]), hosts)
