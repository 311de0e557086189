"""The machine a benchmark ran on, for its output (figures from different CPUs do not compare)."""

from __future__ import annotations

import platform
from pathlib import Path

CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")  # what decides fp32/bf16 matmul speed on a CPU


def cpu_info() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    path = Path("/proc/cpuinfo")
    info: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if not line.strip():
            break
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo, else the architecture."""
    return cpu_info().get("model name") or platform.machine()


def cpu_features() -> str:
    """Which of CPU_FLAGS the processor has, e.g. 'avx512f yes, avx512_bf16 yes, amx_bf16 no'."""
    flags = set(cpu_info().get("flags", "").split())
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS) if flags else "flags unknown"
