"""Configs: YAML + overrides, and errors that name the key before any model loads."""

import re

import pytest

from vlmlab.config import ConfigError, load_config, parse_override, save_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  batch_size: 4\nlm:\n  lora:\n    r: 4\n")
    cfg = load_config(path, ["train.batch_size=8", "data.datasets=[coco:/x, flickr8k:/y]"])
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; we accept it as a float
    assert cfg.train.batch_size == 8
    assert cfg.lm.lora.r == 4 and cfg.lm.lora.enabled
    assert cfg.data.datasets == ["coco:/x", "flickr8k:/y"]


def test_round_trip(tmp_path):
    cfg = load_config(None, ["connector.num_queries=32", "vision.image_size=null"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.foo=1", "unknown config key 'train.foo'"),
        ("train.batch_size=abc", "train.batch_size: expected an integer"),
        ("lm.lora.enabled=3", "lm.lora.enabled: expected true/false"),
        ("connector.num_queries=0", "connector.num_queries = 0 is impossible; allowed: >= 1"),
        ("connector.dropout=1.0", "connector.dropout = 1.0 is impossible; allowed: >= 0.0 and < 1.0"),
        ("train.lr=0", "train.lr = 0.0 is impossible; allowed: > 0.0"),
        ("train.lr=-1e-3", "train.lr = -0.001 is impossible"),
        ("train.max_steps=0", "train.max_steps = 0 is impossible"),
        ("train.save_every=0", "train.save_every = 0 is impossible"),
        ("generate.num_beams=0", "generate.num_beams = 0 is impossible"),
        ("data.max_train_images=0", "data.max_train_images = 0 is impossible"),
        ("connector.type=perceiver", "connector.type 'perceiver' is unknown; allowed: ['qformer'"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite 'ignore' is unknown"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("data.datasets={a: 1}", "data.datasets: expected a list"),
        ("connector.width=30", "connector.width (30) must be divisible by connector.heads (4)"),
        ("lm.lora.r=0", "lm.lora.r must be >= 1"),
        ("train.mixed_precision=fp8", "mixed_precision"),
        ("train=3", "train: expected a mapping"),
        ("nokey", "must look like key.subkey=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_lora_rank_zero_is_fine_when_lora_is_off():
    assert load_config(None, ["lm.lora.enabled=false", "lm.lora.r=0"]).lm.lora.r == 0


def test_yaml_words_stay_words_in_overrides():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["lm.lora.enabled=false"]).lm.lora.enabled is False
    with pytest.raises(ConfigError, match="lm.lora.enabled: expected true/false, got 'no'"):
        load_config(None, ["lm.lora.enabled=no"])


def test_parse_override_nests():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("coco:/no/such/root", "data.datasets[0] = 'coco:/no/such/root': '/no/such/root' does not exist"),
        ("imagenet:/x", "expected FORMAT:PATH with FORMAT one of"),
        ("karpathy:/no/such.json@/no/root", "'/no/such.json' does not exist"),
    ],
)
def test_data_paths_fail_before_any_model_loads(spec, message, monkeypatch, tmp_path):
    import vlmlab.train.loop as train_module

    def no_models(*_):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(train_module, "build_vlm", no_models)
    monkeypatch.setattr(train_module, "Accelerator", no_models)
    cfg = load_config(None, [f"data.datasets=[{spec}]", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_module.train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written either
