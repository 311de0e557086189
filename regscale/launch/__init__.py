"""Getting a run onto machines: the plan, SLURM / local executors, requeue and status."""
