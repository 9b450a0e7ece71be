"""Image-dependence probes on a tiny model: they separate a model that sees the image from one that cannot."""

import pytest
import torch

from vlmlab.config import load_config
from vlmlab.data.formats import CaptionSample
from vlmlab.data.pairs import SplitFeatures
from vlmlab.evaluate import evaluate_split, format_table
from vlmlab.vlm import build_vlm


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir, tiny_gpt2_dir):
    cfg = load_config(None, [f"vision.name=hf:{tiny_clip_dir}", f"lm.name={tiny_gpt2_dir}", "connector.width=32",
                             "connector.heads=2", "connector.num_queries=4", "lm.lora.dropout=0.0",
                             "generate.max_new_tokens=5"])  # fmt: skip
    return build_vlm(cfg).eval()


def _split(n=4):
    torch.manual_seed(1)
    samples = [CaptionSample(f"x:{i}", f"/img/{i}.png", [f"a {c} thing.", f"the {c} one."], "test")
               for i, c in enumerate(["red", "blue", "green", "yellow"][:n])]  # fmt: skip
    features = torch.randn(n, 16, 32).half() * 3
    pairs = [(i, c) for i, s in enumerate(samples) for c in s.captions]
    return SplitFeatures(samples, features, pairs)


def test_probes_of_a_model_that_sees_the_image(tiny):
    r = evaluate_split(tiny, _split(), batch_size=3)
    assert r["visual_information_gain"] == pytest.approx(r["nll_shuffled"] - r["nll_true"])
    assert r["nll_true"] != pytest.approx(r["nll_shuffled"], abs=1e-6)  # random images move a random model
    assert 0 <= r["distinct_share"] <= 1 and 0 <= r["swap_changed_share"] <= 1
    assert r["images"] == 4 and len(r["examples"]) == 4
    assert r["generation"]["max_new_tokens"] == 5
    table = format_table({"tiny": r})
    assert table.count("\n") == 2 and "visual gain" in table


def test_probes_of_a_blind_connector_show_no_image_dependence(tiny):
    """Zero the projection: every image gives the same visual tokens, so all image probes must agree."""
    state = {k: v.clone() for k, v in tiny.connector.state_dict().items()}
    try:
        with torch.no_grad():
            tiny.connector.projection.weight.zero_()
        r = evaluate_split(tiny, _split(), batch_size=3)
    finally:
        tiny.connector.load_state_dict(state)
    assert r["nll_true"] == pytest.approx(r["nll_shuffled"], abs=1e-5)
    assert r["nll_true"] == pytest.approx(r["nll_mean_image"], abs=1e-5)
    assert r["visual_information_gain"] == pytest.approx(0, abs=1e-5)
    assert r["swap_changed_share"] == 0
    assert r["distinct_share"] == 0.25  # one caption for all four images
