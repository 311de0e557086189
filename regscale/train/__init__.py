"""The per-process training entry: loop, checkpoints, preemption, health."""
