"""How often to checkpoint, and what failures cost: Young/Daly's interval, the expected effective
training time ratio of a run, and the schedule the training loop saves by.

Failures: a node fails every `slurm.node_mtbf_h` hours on average (default: 6.50 failures per 1000
node-days, the rate of Meta's RSC-1 cluster in arXiv 2410.21680, i.e. 3692 h), independently, so
a job on N nodes fails every node_mtbf_h / N hours (the job's MTBF, M).

Young/Daly: with a save costing the loop C seconds, checkpointing every sqrt(2 C M) seconds of
training minimises the time lost to saves plus the work lost to failures (half an interval per
failure). An asynchronous save stalls the loop only for its copy, so C can be tiny; the interval is
then never shorter than one save takes to publish (a save cannot start before the previous one is
published, and only a published one protects anything).

The expected ratio (Meta's ETTR model, arXiv 2410.21680, in this form): per second of allocation,
a failure (rate 1/M) loses the work since the newest published checkpoint (interval/2 + publish
time) and its detection; every allocation (ended by a failure or the time limit) pays its start-up
to the first step, and one ended by the limit its final blocking save; each interval of training
pays one stall. Left out: failures during start-up or a restart's first interval (they lose less),
which are second order in (start-up, interval) / M.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional

from regscale import metrics as M
from regscale.config import CKPT_AUTO, Config

log = logging.getLogger("regscale.train")

# bench/bench_checkpoint.py --size XL/2 --ranks 4 (one rank's share: 2.92 GB; AMD EPYC, local disk):
# (async stall, blocking stall, async save until published) in seconds, per engine
BENCH_RANK_BYTES = 2.92e9
BENCH_SAVE_S = {"fsdp": (0.01, 6.34, 8.5), "deepspeed": (0.40, 10.23, 8.9)}
STATE_BYTES_PER_PARAM = 16  # fp32 weights, Adam's two moments, the fp32 EMA


@dataclass(frozen=True)
class SaveCost:
    """What one periodic save costs: the loop's wait, and the time until it is published."""

    stall_s: float
    publish_s: float
    measured: bool = False  # False: predicted from bench_checkpoint's figures

    def describe(self) -> str:
        how = "measured" if self.measured else "predicted from bench_checkpoint's XL/2 figures"
        return f"a save stalls {self.stall_s:.3g} s and publishes in {self.publish_s:.3g} s ({how})"


def predicted_save_cost(params: int, nodes: int, world_size: int, engine: str, asynchronous: bool) -> SaveCost:
    """A save's cost from bench_checkpoint's measured XL/2 figures, scaled by the bytes written
    (16 per parameter, sharded over the ranks): an async save's stall by the bytes each GPU
    copies aside, the writing by the bytes each node writes (its ranks share its disk and network;
    the figures come from one machine's local disk: a shared filesystem's aggregate bandwidth is
    not modelled)."""
    async_stall, blocking, publish = BENCH_SAVE_S[engine]
    state = STATE_BYTES_PER_PARAM * params
    per_gpu, per_node = state / world_size / BENCH_RANK_BYTES, state / max(nodes, 1) / BENCH_RANK_BYTES
    if asynchronous:
        return SaveCost(async_stall * per_gpu, publish * per_node)
    return SaveCost(blocking * per_node, blocking * per_node)


def measured_costs(metrics: list[dict], asynchronous: bool) -> list[SaveCost]:
    """The costs of the periodic saves metrics.jsonl recorded (async ones when engine.async_checkpoint,
    else blocking ones), oldest first: where a restarted run's auto interval starts from."""
    return [SaveCost(float(r[M.CKPT_STALL_S]), float(r[M.CKPT_SAVE_S]), True) for r in metrics
            if M.CKPT_STALL_S in r and M.CKPT_SAVE_S in r and bool(r.get(M.CKPT_ASYNC)) == asynchronous]


def job_mtbf_s(node_mtbf_h: float, nodes: int) -> float:
    """Mean time between failures of a job on `nodes` nodes (independent node failures)."""
    return node_mtbf_h * 3600.0 / max(nodes, 1)


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """Young/Daly's checkpoint interval (seconds of training between saves): sqrt(2 C M)."""
    return math.sqrt(2.0 * cost_s * mtbf_s)


def checkpoint_interval_s(cost: SaveCost, mtbf_s: float) -> float:
    """Young/Daly's interval, never shorter than one save takes to publish."""
    return max(young_daly_s(cost.stall_s, mtbf_s), cost.publish_s)


@dataclass(frozen=True)
class RunCosts:
    """What a run pays besides its steps, in seconds of allocation (the expected ratio's inputs)."""

    save: SaveCost  # a periodic save
    limit_end_s: float  # an allocation reaching its time limit: its blocking save (and teardown)
    startup_s: float  # allocation start to the end of the first step
    detect_s: float  # a failure until its allocation is released (detection, teardown)
    allocation_s: float  # the time limit of one allocation
    mtbf_s: float  # of the whole job


def expected_ratio(interval_s: float, c: RunCosts) -> float:
    """Expected steps-that-count time over allocated time, checkpointing every `interval_s`
    seconds of training (see the module docstring)."""
    mean_allocation = c.mtbf_s * -math.expm1(-c.allocation_s / c.mtbf_s)  # E[min(limit, failure)]
    starts = 1.0 / mean_allocation  # allocations per allocated second
    limit_ends = starts * math.exp(-c.allocation_s / c.mtbf_s)
    lost = interval_s / 2.0 + c.save.publish_s + c.detect_s
    overhead = c.startup_s * starts + lost / c.mtbf_s + c.limit_end_s * limit_ends
    return max(0.0, (1.0 - overhead) / (1.0 + c.save.stall_s / interval_s))


class CheckpointSchedule:
    """When the loop saves: every train.ckpt_every steps, or (auto) every Young/Daly interval
    from the measured save cost and step time, re-chosen as they are measured and logged on rank
    0; also at every eval.at_steps step and train.keep_every-th step (retention keeps those).
    `due` is each rank's proposal; the loop's per-step agreement makes it one decision, so only
    rank 0 proposes the auto interval."""

    EMA = 0.1  # weight of a new step time
    REPORT_CHANGE = 0.2  # log the auto interval again when it moves by this fraction

    def __init__(self, cfg: Config, *, is_main: bool, nodes: int, start_step: int, predicted: SaveCost,
                 history: Iterable[SaveCost] = ()) -> None:
        t = cfg.train
        self.fixed: Optional[int] = None if t.ckpt_every == CKPT_AUTO else int(t.ckpt_every)
        self.protected = frozenset(cfg.eval.at_steps)
        self.keep_every = t.keep_every
        self.is_main = is_main
        self.asynchronous = cfg.engine.async_checkpoint
        self.node_mtbf_h, self.nodes = cfg.slurm.node_mtbf_h, nodes
        self.mtbf_s = job_mtbf_s(cfg.slurm.node_mtbf_h, nodes)
        self.last_save = start_step
        self.step_s: Optional[float] = None
        self.costs: deque[SaveCost] = deque(history, maxlen=5)
        self.predicted = predicted
        self.every_steps: Optional[int] = self.fixed
        self._reported: Optional[int] = None

    @property
    def cost(self) -> SaveCost:
        """The mean of the newest measured periodic saves, else the prediction."""
        if not self.costs:
            return self.predicted
        n = len(self.costs)
        return SaveCost(sum(c.stall_s for c in self.costs) / n, sum(c.publish_s for c in self.costs) / n, True)

    def observe_step(self, step_s: float) -> None:
        """One step's wall time, step boundary to step boundary (waits for other ranks included)."""
        self.step_s = step_s if self.step_s is None else (1 - self.EMA) * self.step_s + self.EMA * step_s
        self._choose()

    def observe_save(self, stall_s: float, publish_s: float, asynchronous: bool) -> None:
        """A published save; periodic ones (as engine.async_checkpoint says) update the cost."""
        if asynchronous == self.asynchronous:
            self.costs.append(SaveCost(stall_s, publish_s, True))
            self._choose()

    def saved(self, step: int) -> None:
        self.last_save = step

    def due(self, step: int) -> bool:
        if step in self.protected or (self.keep_every and step % self.keep_every == 0):
            return True
        if self.fixed is not None:
            return step % self.fixed == 0
        return self.is_main and self.every_steps is not None and step - self.last_save >= self.every_steps

    def _choose(self) -> None:
        if self.fixed is not None or not self.is_main or self.step_s is None:
            return
        cost = self.cost
        interval = checkpoint_interval_s(cost, self.mtbf_s)
        self.every_steps = max(1, round(interval / self.step_s))
        if self._reported is None or abs(self.every_steps - self._reported) > self.REPORT_CHANGE * self._reported:
            self._reported = self.every_steps
            log.info("%s", self.describe(cost, interval))

    def describe(self, cost: SaveCost, interval_s: float) -> str:
        young = young_daly_s(cost.stall_s, self.mtbf_s)
        why = (f"Young/Daly sqrt(2 x {cost.stall_s:.3g} s x {self.mtbf_s / 3600:.4g} h MTBF) = {young:.4g} s"
               if young >= cost.publish_s else
               f"the {cost.publish_s:.3g} s a save takes to publish (Young/Daly alone: {young:.3g} s)")
        return (f"train.ckpt_every=auto: a checkpoint every {self.every_steps} steps ({interval_s:.4g} s at "
                f"{self.step_s:.3g} s/step): {why}; MTBF = slurm.node_mtbf_h {self.node_mtbf_h:g} / "
                f"{self.nodes} node(s); {cost.describe()}")
