"""What machine a run ran on: the CPU model, the instruction sets that decide its speed, and the device.

Speed figures mean nothing without it (bf16 autocast is 1.40x faster than float32 on an AMD EPYC with
AVX512-BF16 and several times slower on CPUs that emulate it: results/), so `train.mixed_precision: auto`, the
benchmarks and every results record read it from here.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) that run bfloat16 matmuls natively: x86 AVX512-BF16 and AMX, aarch64 BF16
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# the flags a speed figure is read beside
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "bf16")


@dataclass(frozen=True)
class CPU:
    model: str
    flags: frozenset[str]
    cores: int  # the cores this process may run on (its affinity), not the machine's count

    @property
    def native_bf16(self) -> str | None:
        """The flag that makes bfloat16 matmuls native here, or None (then they are emulated)."""
        return next((f for f in NATIVE_BF16_FLAGS if f in self.flags), None)

    def describe(self) -> str:
        """e.g. 'AMD EPYC (AVX512-BF16), 2 cores' or 'Intel Xeon (no native bf16), 2 cores'."""
        bf16 = self.native_bf16.upper().replace("_", "-") if self.native_bf16 else "no native bf16"
        return f"{self.model} ({bf16}), {self.cores} cores"


def cpu_info(cpuinfo: str | None = None) -> CPU:
    """The CPU from /proc/cpuinfo (or the text given); on systems without it, what `platform` knows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 | aarch64
            flags = set(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CPU(model or platform.processor() or platform.machine() or "unknown CPU", frozenset(flags), cores)


def training_device():
    """The device a run trains on: CUDA where there is one, unless accelerate's own switch ACCELERATE_USE_CPU
    is set. Asked before any Accelerator exists (the caption loop needs it to pick the precision), and by the
    stage-1 loop, which has no Accelerator."""
    import torch
    from accelerate.utils import parse_flag_from_env

    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return torch.device("cpu" if use_cpu else "cuda")


def device_description(device) -> str:
    """The accelerator by name (CUDA) or the CPU, for records and logs."""
    import torch  # here only: `vlmlab results` and the run folder's commands start without loading torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), {cpu_info().describe()}"
    return cpu_info().describe()
