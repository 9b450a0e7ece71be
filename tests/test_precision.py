"""`train.mixed_precision: auto` picks bf16 only where the hardware runs it natively, says why, and records it."""

import json
import warnings

import pytest

from helpers import EPYC_BF16, XEON_NO_BF16
from vlmlab.config import ConfigError, load_config, validate
from vlmlab.run.hardware import cpu_info
from vlmlab.train import precision as precision_module
from vlmlab.train.loop import train
from vlmlab.train.precision import resolve_precision


@pytest.fixture
def on_cpu(monkeypatch):
    """Pretends to run on the CPU whose /proc/cpuinfo text is given."""

    def use(text):
        monkeypatch.setattr(precision_module, "cpu_info", lambda: cpu_info(text))

    return use


def test_auto_is_bf16_only_on_a_cpu_with_native_bfloat16(on_cpu):
    on_cpu(EPYC_BF16)
    chosen = resolve_precision("auto", "cpu")
    assert chosen.mode == "bf16" and "avx512_bf16" in chosen.reason
    on_cpu(XEON_NO_BF16)
    chosen = resolve_precision("auto", "cpu")
    assert chosen.mode == "no" and "float32" in chosen.reason
    assert chosen.as_record() == {"requested": "auto", "used": "float32", "reason": chosen.reason}


def test_explicit_bf16_on_an_emulating_cpu_trains_as_asked_with_a_warning(on_cpu):
    on_cpu(XEON_NO_BF16)
    with pytest.warns(UserWarning, match="emulated.*slower than float32"):
        assert resolve_precision("bf16", "cpu").mode == "bf16"
    on_cpu(EPYC_BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve_precision("bf16", "cpu").mode == "bf16"
    assert resolve_precision("no", "cpu").mode == "no"


def test_stage1_refuses_a_half_precision_it_would_not_use():
    with pytest.raises(ConfigError, match="qformer.*float32"):
        validate(load_config(None, ["train.stage=qformer", "train.mixed_precision=bf16"]))
    validate(load_config(None, ["train.stage=qformer"]))  # auto: float32 there, no refusal


def test_a_run_records_the_precision_auto_chose_and_a_resume_elsewhere_says_so(
    tmp_path, tiny_config, isolated_cache, on_cpu, capsys
):
    on_cpu(XEON_NO_BF16)
    cfg = tiny_config(tmp_path, "train.mixed_precision=auto", "train.max_steps=4", "train.save_every=4")
    run = train(cfg)
    recorded = json.loads((run / "model_info.json").read_text())["precision"]
    assert recorded["requested"] == "auto" and recorded["used"] == "float32"
    assert "cores; precision: float32 (auto: the CPU" in capsys.readouterr().out

    # the same run resumed on a machine with AVX512-BF16: it goes on in bf16, and the log says it is not exact
    on_cpu(EPYC_BF16)
    train(cfg, resume=True)
    assert "began in float32 and continues in bf16" in capsys.readouterr().out
    assert json.loads((run / "model_info.json").read_text())["precision"]["used"] == "bf16"
