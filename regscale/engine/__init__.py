"""Parallelism engines behind one small interface: FSDP2 and DeepSpeed ZeRO."""
