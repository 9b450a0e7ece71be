"""End to end on the CPU: train, save, reload, caption; the loss falls and captions are never EOS-only."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.cli import main as cli_main
from vlmlab.config import load_config
from vlmlab.train import load_run, train


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(config).save_pretrained(out)
    return out


def tiny_config(tmp_path, tiny_clip_dir, tiny_gpt2_dir, *extra):
    return load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            f"data.datasets=[synthetic:{tmp_path / 'world'}]",
            "data.synthetic_images=48",
            "data.synthetic_max_objects=1",
            "connector.num_queries=4",
            "connector.width=32",
            "connector.depth=1",
            "connector.heads=2",
            "train.batch_size=8",
            "train.max_steps=40",
            "train.warmup_steps=2",
            "train.lr=3e-3",
            "train.lora_lr=3e-3",
            "train.eval_every=20",
            "train.save_every=20",
            "train.log_every=5",
            f"train.output_dir={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))


def test_train_save_reload_caption(tmp_path, tiny_clip_dir, tiny_gpt2_dir, isolated_cache):
    cfg = tiny_config(tmp_path, tiny_clip_dir, tiny_gpt2_dir)
    run_dir = train(cfg)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "checkpoint/trainable.safetensors"):
        assert (run_dir / name).exists(), name

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < 0.7 * val[0], f"validation loss did not fall: {val}"

    # the checkpoint holds only trainable weights: the connector and the LoRA adapters
    state = load_file(run_dir / "checkpoint" / "trainable.safetensors")
    assert all(k.startswith("connector.") or "lora_" in k for k in state)
    assert any("lora_" in k for k in state)
    assert sum(v.numel() for v in state.values()) < 1_000_000

    model = load_run(run_dir)
    assert torch.equal(model.trainable_state_dict()["connector.queries"], state["connector.queries"])
    images = sorted((tmp_path / "world" / "images").glob("*.png"))[:4]
    captions = model.caption([str(p) for p in images])
    assert len(captions) == 4
    for caption in captions:
        assert caption.strip(), f"empty (EOS-only) caption among {captions}"
    # reloading twice gives the same captions: nothing random is left in generation or loading
    assert load_run(run_dir).caption([str(p) for p in images]) == captions


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_clip_dir, tiny_gpt2_dir, isolated_cache, capsys):
    train(tiny_config(tmp_path, tiny_clip_dir, tiny_gpt2_dir, "train.max_steps=20"))
    train(tiny_config(tmp_path, tiny_clip_dir, tiny_gpt2_dir, "train.max_steps=30"), resume=True)
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 30 and 0 in steps  # one log, continued


def test_cli_caption_and_errors(tmp_path, tiny_clip_dir, tiny_gpt2_dir, isolated_cache, capsys):
    cfg_args = ["--set", f"vision.name=hf:{tiny_clip_dir}", "--set", f"lm.name={tiny_gpt2_dir}"]
    world = f"data.datasets=[synthetic:{tmp_path / 'world'}]"
    small = ["--set", world, "--set", "data.synthetic_images=24", "--set", "train.max_steps=3",
             "--set", "train.batch_size=4", "--set", "connector.width=32", "--set", "connector.heads=2"]  # fmt: skip
    (tmp_path / "c.yaml").write_text("train:\n  eval_every: 100\n")
    assert cli_main(["train", str(tmp_path / "c.yaml"), *cfg_args, *small, "--output-dir", str(tmp_path / "r")]) == 0
    image = str(sorted((tmp_path / "world" / "images").glob("*.png"))[0])
    capsys.readouterr()
    assert cli_main(["caption", str(tmp_path / "r"), image, "--json", "--beams", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["image"] == image and isinstance(line["caption"], str)
    # a bad key fails before any model is built, naming the key
    assert cli_main(["train", str(tmp_path / "c.yaml"), "--set", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err
