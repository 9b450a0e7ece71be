"""Which precision a run trains in: `train.mixed_precision: auto` asks the hardware.

bf16 autocast (weights and optimizer in float32, the matmuls in bfloat16) is a speed lever only where the
hardware runs bfloat16 natively. Measured on the photo chain's caption step (results/bf16-throughput.json,
results/precision-throughput-*.json): 1.40x faster than float32 on an AMD EPYC with AVX512-BF16; where the CPU
emulates it, 2.7x slower on an Intel Xeon with AVX-512 but no AVX512-BF16 and 30x slower on an AMD EPYC with AVX2
only. So `auto` picks bf16 on a CUDA GPU that supports it and on a CPU with AVX512-BF16 / AMX / ARM BF16, and
float32 everywhere else; an explicit `bf16` on a CPU without them trains as asked, with a warning. The weights a
run saves are float32 either way, so loading never depends on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..run.hardware import cpu_info

# what bf16 autocast costs where the CPU emulates it, measured (the module docstring names the records)
EMULATED_BF16_COST = (
    "measured 2.7x slower than float32 on an Intel Xeon with AVX-512 but no AVX512-BF16, 30x slower on an AMD EPYC "
    "with AVX2 only"
)


@dataclass(frozen=True)
class Precision:
    """What was asked, what accelerate is given ("no" | "bf16" | "fp16") and why: the log and model_info.json."""

    requested: str
    mode: str
    reason: str

    @property
    def used(self) -> str:
        return "float32" if self.mode == "no" else self.mode

    def as_record(self) -> dict:
        return {"requested": self.requested, "used": self.used, "reason": self.reason}


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """The precision `train.mixed_precision` means on this device."""
    device = torch.device(device)
    cpu = cpu_info() if device.type == "cpu" else None
    if requested == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(
                    requested, "bf16", f"auto: {torch.cuda.get_device_name(device)} runs bfloat16 natively"
                )
            return Precision(requested, "no", f"auto: {torch.cuda.get_device_name(device)} has no bfloat16; float32")
        if device.type == "cpu":
            if cpu.native_bf16:
                return Precision(
                    requested, "bf16", f"auto: the CPU ({cpu.model}) has {cpu.native_bf16}: bfloat16 is native"
                )
            return Precision(
                requested, "no", f"auto: the CPU ({cpu.model}) has no AVX512-BF16 / AMX / BF16 flag: float32"
            )
        return Precision(
            requested, "no", f"auto: float32 on {device.type} (bfloat16 autocast is chosen only on CUDA and CPUs)"
        )
    if requested == "bf16" and cpu is not None and not cpu.native_bf16:
        warnings.warn(
            f"train.mixed_precision = 'bf16' on a CPU without native bfloat16 ({cpu.model}): it is emulated, "
            f"{EMULATED_BF16_COST}; `auto` would train in float32 here",
            stacklevel=2,
        )
        return Precision(requested, "bf16", "asked for (bf16), emulated on this CPU")
    return Precision(requested, requested, f"asked for ({requested})")
