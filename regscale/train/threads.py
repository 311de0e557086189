"""The intra-op thread count of a training process, taken from the recipe, not the launcher.

On CPU the number of intra-op threads decides how torch splits its reductions, so it is part of
the numbers a step computes. Launchers disagree: srun leaves OMP_NUM_THREADS unset (torch then
uses every core it sees), torchrun sets it to 1, a plain process uses every core. Measured on the
smoke recipe (2 processes, 24 steps): 2 threads instead of 1 give bit-identical losses up to step
20 and weights 7.5e-7 (relative) apart at step 24. With the count pinned to slurm.cpus_per_task
(the CPUs each process is given), a run started by SLURM, requeued, or started by torchrun
computes the same bits.
"""

from __future__ import annotations

import torch

from regscale.config import SlurmConfig


def pin_threads(slurm: SlurmConfig) -> int:
    """Set torch's intra-op threads to slurm.cpus_per_task; returns the count."""
    threads = slurm.cpus_per_task
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
