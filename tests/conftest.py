"""Shared fixtures: real tokenizers, a tiny randomly initialised GPT-2 of the real vocabulary, data paths."""

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
