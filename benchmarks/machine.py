"""What a benchmark ran on: CPU model, the instruction-set flags that choose kernels, threads.

Every benchmark prints ``describe()`` above its table, because the same code is fast on one
CPU and slow on another (bf16 matmuls are ~7× fp32 with AMX and slower than fp32 without).

    .venv/bin/python benchmarks/machine.py
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

# The flags that decide which matmul / selection kernels are fast on x86.
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The KERNEL_FLAGS this CPU reports, in that order."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return [flag for flag in KERNEL_FLAGS if flag in present]


def describe() -> dict[str, str]:
    """Machine facts for a benchmark's header (all strings)."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu_model(),
        "flags": " ".join(cpu_flags()) or "(none of: " + " ".join(KERNEL_FLAGS) + ")",
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "cuda": cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def header() -> str:
    """``describe()`` as the lines a benchmark prints (and writes) above its table."""
    return "\n".join(f"- {name}: {value}" for name, value in describe().items())


if __name__ == "__main__":
    print(header())
