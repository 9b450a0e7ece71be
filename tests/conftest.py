"""Shared fixtures: real tokenizers, a tiny randomly initialised GPT-2 of the real vocabulary, data paths, the
tiny training config and model most tests use. Plain helper functions are in helpers.py."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
GPT2_TOKENIZER_DIR = SHARED / "models" / "gpt2-tokenizer"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent on this machine")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import GPT2Tokenizer

    d = require(GPT2_TOKENIZER_DIR)
    return GPT2Tokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer):
    """A 2-layer random GPT-2 with the real 50,257-token vocabulary, saved like a hub checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=128, vocab_size=len(gpt2_tokenizer))
    GPT2LMHeadModel(config).save_pretrained(out)
    gpt2_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer as the default LM path gives it (converted from the GGUF once, then cached)."""
    from transformers import AutoTokenizer

    from vlmlab.model.language_model import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A 2-layer random CLIP vision tower (32 px, 8 px patches -> 16 tokens of width 32), saved like a hub checkpoint."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_clip_dir, tiny_gpt2_dir):
    """tiny_config(root, *overrides): the tiny CLIP + GPT-2 on a 48-image synthetic world under root, training
    40 steps into root/run; `overrides` ('key=value', later ones win) on top. Session-scoped, so module-scoped
    fixtures (a run trained once per module) use it too."""
    from vlmlab.config import load_config

    def make(root: Path, *overrides: str):
        return load_config(
            None,
            [
                f"vision.name=hf:{tiny_clip_dir}",
                f"lm.name={tiny_gpt2_dir}",
                f"data.datasets=[synthetic:{root / 'world'}]",
                "data.synthetic_images=48",
                "data.synthetic_max_objects=1",
                "connector.num_queries=4",
                "connector.width=32",
                "connector.depth=1",
                "connector.heads=2",
                "train.batch_size=8",
                "train.max_steps=40",
                "train.warmup_steps=2",
                "train.lr=1e-2",
                "train.lora_lr=1e-2",
                "lm.lora.target_modules=[c_attn, c_proj, c_fc]",
                "lm.lora.r=16",
                "train.eval_every=20",
                "train.save_every=20",
                "train.log_every=5",
                f"train.output_dir={root / 'run'}",
                "train.mixed_precision=no",  # the same arithmetic on every CI machine, bf16 or not
                *overrides,
            ],
        )

    return make


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """The feature cache and converted models of this test alone (VLMLAB_CACHE under its tmp_path)."""
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_vlm(tiny_clip_dir, tiny_gpt2_dir):
    """An untrained tiny VLM (CLIP 16 image tokens of width 32 -> 4 Q-Former queries -> tiny GPT-2), in eval mode."""
    from vlmlab.config import load_config
    from vlmlab.model.vlm import build_vlm

    cfg = load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            "connector.width=32",
            "connector.heads=2",
            "connector.num_queries=4",
            "lm.lora.dropout=0.0",
            "generate.max_new_tokens=5",
        ],
    )
    return build_vlm(cfg).eval()


@pytest.fixture
def tiny_split():
    """Four images of random cached features (16 tokens of width 32, as tiny_vlm's encoder gives), two captions each."""
    import torch

    from vlmlab.data.formats import CaptionSample
    from vlmlab.data.pairs import SplitFeatures

    torch.manual_seed(1)
    samples = [
        CaptionSample(f"x:{i}", f"/img/{i}.png", [f"a {c} thing.", f"the {c} one."], "test")
        for i, c in enumerate(["red", "blue", "green", "yellow"])
    ]
    features = torch.randn(4, 16, 32).half() * 3
    pairs = [(i, c) for i, s in enumerate(samples) for c in s.captions]
    return SplitFeatures(samples, features, pairs)


# CI sets VLMLAB_NO_SKIPS=1: a skipped test there is a missing install step, not a pass.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get("VLMLAB_NO_SKIPS") == "1" and _skipped and exitstatus == 0:
        print(f"\nVLMLAB_NO_SKIPS=1 and {len(_skipped)} test(s) skipped (each needs something CI must install):")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory, tiny_config):
    """Two variants x two seeds of a tiny model, trained and evaluated once for the session's tests (ablate, arm
    records, report): (suite file, its output folder)."""
    import yaml

    from vlmlab.analysis.ablate import load_suite, run_suite
    from vlmlab.config import save_config

    tmp_path = tmp_path_factory.mktemp("suite")
    base = tiny_config(tmp_path, "train.max_steps=4", "train.eval_every=2", "generate.max_new_tokens=6")
    save_config(base, tmp_path / "base.yaml")
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "base": "base.yaml",
                "seeds": [0, 1],
                "split": "val",
                "contact_images": 2,
                "variants": {"qformer": {}, "meanpool": {"connector.type": "meanpool", "connector.num_queries": 2}},
            }
        )
    )
    old = os.environ.get("VLMLAB_CACHE")
    os.environ["VLMLAB_CACHE"] = str(tmp_path / "cache")
    try:
        out = run_suite(load_suite(str(suite_file)), tmp_path / "out")
    finally:
        if old is None:
            del os.environ["VLMLAB_CACHE"]
        else:
            os.environ["VLMLAB_CACHE"] = old
    return suite_file, out
