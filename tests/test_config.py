"""Configs: YAML + overrides, and errors that name the key before any model loads."""

import os
import re
import resource
import signal
import subprocess
import sys

import pytest

from vlmlab.config import ConfigError, append_whole, load_config, parse_override, save_config, write_atomic


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


# ---------------------------------------------------------------------------------------------- writing files


def test_write_atomic_writes_text_bytes_or_through_a_writer_and_keeps_the_permissions(tmp_path):
    path = tmp_path / "eval.json"
    write_atomic(path, "text ü")
    assert path.read_text(encoding="utf-8") == "text ü"
    path.chmod(0o600)
    write_atomic(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes" and path.stat().st_mode & 0o777 == 0o600
    seen = []
    write_atomic(tmp_path / "sheet.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"png")))
    assert seen == [".png"]  # a writer that picks the format by the suffix (savefig) sees the file's own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "sheet.png"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("the old, whole file\n")

    def fails_half_way(tmp):
        tmp.write_text("half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, fails_half_way)
    assert path.read_text() == "the old, whole file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


UNDER_A_LIMIT = """
import errno, sys
from pathlib import Path
from vlmlab.config import append_whole, load_config, save_config, write_atomic
folder = Path(sys.argv[1])
for name, write in [
    ("eval.json", lambda p: write_atomic(p, "x" * 4096)),
    ("plot.png", lambda p: write_atomic(p, lambda tmp: tmp.write_bytes(b"y" * 4096))),
    ("config.yaml", lambda p: save_config(load_config(None), p)),
    ("metrics.jsonl", lambda p: append_whole(p, '{"step": 2}\\n' * 200)),
]:
    try:
        write(folder / name)
    except OSError as e:
        assert e.errno == errno.EFBIG, e
        print(name, "refused")
"""


def test_writes_past_a_file_size_limit_fail_and_leave_every_file_as_it_was(tmp_path):
    """`ulimit -f 1` (1 KiB), as on a full disk: each write fails with EFBIG, and the files stay as they were."""
    old = {"eval.json": "{}", "plot.png": "old picture", "config.yaml": "train: {}\n", "metrics.jsonl": '{"step": 1}\n'}
    for name, text in old.items():
        (tmp_path / name).write_text(text)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    done = subprocess.run(
        [sys.executable, "-c", UNDER_A_LIMIT, str(tmp_path)],
        preexec_fn=limited,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [w for name in old for w in (name, "refused")]
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old  # no temporary file either


def test_a_log_line_appended_whole(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_whole(log, '{"step": 1}\n')
    append_whole(log, '{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
