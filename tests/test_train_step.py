"""A training step reads one number from the device (the gradient norm, to skip non-finite steps; in
fp16 one transfer of three: the norm, the loss scaler's inf check and its scale):
counted on the real Trainer (one process, FSDP, CPU, 4 micro-batches per step) by a
TorchFunctionMode that sees every host read of a tensor: .item(), float(), int(), bool(),
.tolist(), .numpy(). On a GPU each of those waits for the device, except where the tensor lives on
the host by design: regscale.dist's collectives of host numbers (reduced on the CPU with gloo),
torch.optim's step counters (on the CPU unless `capturable`) and train.noise's per-sample draws
(keyed by the data loader's index tensor, drawn on the CPU, then copied to the device); reads made
there do not count."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from regscale import dist
from regscale.config import load_config
from regscale.train.loop import Trainer
from regscale.train.preempt import StopFlag
from tests.fixtures.train import SMOKE

HOST_SIDE = ("regscale.dist", "torch.optim.", "regscale.train.noise")  # host numbers by design
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors made in this thread while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in HOST_READS and not sys._getframe(1).f_globals.get("__name__", "").startswith(HOST_SIDE):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_host_read() -> None:
    t = torch.ones(3)
    with HostReads() as reads:
        float(t[0]), t[0].item(), int(t[1]), bool(t[2]), t.tolist(), t.numpy()
        _ = t * 2 + t.sum()  # device work is not a read
    assert reads.count == 6


def _run_to(trainer: Trainer, step: int) -> int:
    """Host reads while training on to `step` (a final blocking checkpoint included)."""
    trainer.cfg.train.max_steps = step
    with HostReads() as reads:
        trainer.run(StopFlag())
    return reads.count


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: the norm, the inf check and the scale at once
def test_a_step_reads_one_number_from_the_device(precision: str, smoke_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(var, value)  # one process; undone after the test
    cfg = load_config(SMOKE, [f"run.dir={tmp_path}", "run.name=syncs", f"data.path={smoke_data}",
                              "train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=10",
                              "train.ckpt_every=1000", "train.log_every=1000", "slurm.gpus_per_node=1",
                              "data.num_workers=0", f"train.precision={precision}"])
    env = dist.setup()
    try:
        trainer = Trainer(cfg, tmp_path / "syncs", env, tracker=None)
        assert trainer.plan.accumulation == 4
        _run_to(trainer, 1)  # the first step builds what is built lazily
        one_step, four_steps = _run_to(trainer, 2), _run_to(trainer, 6)
        trainer.close(None)  # type: ignore[arg-type]
    finally:
        dist.teardown()
    # both runs end with the same final save; the 3 more steps of the second cost 1 read each
    per_step = (four_steps - one_step) / 3
    assert per_step == 1, f"{per_step:.2f} host reads per step (expected 1: the gradient norm)"
