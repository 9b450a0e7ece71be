"""The CPU a figure was measured on, read from /proc/cpuinfo text as x86 and aarch64 Linux write it."""

from helpers import EPYC_BF16, GRAVITON, XEON_NO_BF16
from vlmlab.run.hardware import cpu_info, device_description


def test_x86_flags_name_native_bf16_or_its_absence():
    epyc, xeon = cpu_info(EPYC_BF16), cpu_info(XEON_NO_BF16)
    assert epyc.model == "AMD EPYC 9R14" and "avx512_bf16" in epyc.flags
    assert epyc.native_bf16 == "avx512_bf16" and epyc.describe().startswith("AMD EPYC 9R14 (AVX512-BF16), ")
    assert xeon.native_bf16 is None and "(no native bf16)" in xeon.describe()
    assert "avx512f" in xeon.flags  # AVX-512 alone is not bfloat16


def test_aarch64_features_line_is_read_as_flags():
    arm = cpu_info(GRAVITON)
    assert arm.native_bf16 == "bf16" and "sve" in arm.flags
    assert arm.model  # no 'model name' line: platform's name stands in, never empty


def test_this_machine_is_described_with_its_cores():
    here = cpu_info()
    assert here.cores >= 1 and here.describe().endswith(f"{here.cores} cores")
    assert device_description("cpu") == here.describe()


def test_runs_train_on_cuda_where_there_is_one_unless_accelerate_is_told_cpu(monkeypatch):
    import torch

    from vlmlab.run.hardware import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert training_device().type == "cuda"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert training_device().type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert training_device().type == "cpu"
