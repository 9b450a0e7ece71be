"""Baselines: nearest-neighbour retrieval on hand-made features, and the trained baselines' configs."""

import warnings

import pytest
import torch

from vlmlab.analysis.baselines import applicable_baselines, baseline_config, finished_step, stale_keys
from vlmlab.config import load_config, save_config
from vlmlab.data.formats import CaptionSample
from vlmlab.data.pairs import SplitFeatures
from vlmlab.eval.baselines import NearestNeighbourCaptioner, consensus_caption, pooled
from vlmlab.eval.captioning import choose_retrieval_k, evaluate_retrieval


def split_of(directions: list[list[float]], captions: list[list[str]], tokens: int = 3) -> SplitFeatures:
    """Images whose pooled feature points in a chosen direction (every token the same vector)."""
    samples = [CaptionSample(f"x:{i}", f"/img/{i}.png", caps, "train") for i, caps in enumerate(captions)]
    features = torch.tensor(directions, dtype=torch.float32)[:, None, :].repeat(1, tokens, 1).half()
    pairs = [(i, c) for i, s in enumerate(samples) for c in s.captions]
    return SplitFeatures(samples, features, pairs)


TRAIN = split_of(
    [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]],
    [
        ["a dog runs on grass", "a brown dog runs"],
        ["a dog plays on grass", "dog on the lawn"],
        ["a cat sleeps on a sofa", "a grey cat sleeps"],
        ["two men ride bikes", "men riding bicycles"],
    ],
)


def test_pooled_is_a_unit_mean():
    x = torch.tensor([[[3.0, 0.0], [1.0, 0.0]], [[0.0, -2.0], [0.0, -4.0]]])
    assert torch.allclose(pooled(x), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_nearest_neighbours_by_cosine_not_by_length():
    knn = NearestNeighbourCaptioner(TRAIN, k=2)
    query = torch.tensor([[[10.0, 1.1, 0.0]], [[0.0, 0.1, 1.0]]])  # lengths differ: only the angle counts
    assert knn.neighbours(query).tolist() == [[1, 0], [3, 2]]


def test_consensus_picks_the_caption_the_others_agree_with():
    candidates = ["a dog runs on the grass", "a dog runs on grass", "the dog is running on the grass", "a red car"]
    assert consensus_caption(candidates) in candidates[:2]
    assert consensus_caption(["only one"]) == "only one"


def test_retrieval_captions_come_from_the_right_neighbourhood():
    knn = NearestNeighbourCaptioner(TRAIN, k=2)
    captions = knn.caption(torch.tensor([[[1.0, 0.05, 0.0]], [[0.0, 1.0, 0.1]]]))
    dog_captions = TRAIN.samples[0].captions + TRAIN.samples[1].captions
    assert captions[0] in dog_captions
    assert captions[1] in TRAIN.samples[2].captions + TRAIN.samples[3].captions


def test_k_is_capped_and_checked():
    assert NearestNeighbourCaptioner(TRAIN, k=50).k == 4
    with pytest.raises(ValueError, match="k must be >= 1"):
        NearestNeighbourCaptioner(TRAIN, k=0)


def test_retrieval_scores_high_on_its_own_training_images():
    """Retrieving for the training images themselves with k=1 returns one of their own captions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate_retrieval(NearestNeighbourCaptioner(TRAIN, k=1), TRAIN, use_java=False)
        k, scores = choose_retrieval_k(TRAIN, TRAIN, ks=(1, 4))
    assert r["BLEU-1"] == pytest.approx(1.0)  # each caption is one of the image's references
    assert r["CIDEr-D"] > r["cider_deranged"]
    assert r["swap_changed_share"] == 1.0 and r["distinct_share"] == 1.0
    assert "nll_true" not in r  # retrieval has no likelihood
    assert r["generation"] == {"retrieval_k": 1}
    assert k == 1 and scores[1] > scores[4]


def test_baseline_configs_flip_one_switch(tmp_path):
    cfg = load_config(None, ["train.max_steps=7"])
    blind = baseline_config(cfg, "blind", tmp_path)
    frozen = baseline_config(cfg, "frozen_connector", tmp_path)
    assert blind.connector.type == "none" and not blind.connector.freeze
    assert frozen.connector.freeze and frozen.connector.type == "qformer"
    assert blind.train.output_dir == str(tmp_path / "baselines" / "blind")
    assert cfg.connector.type == "qformer" and not cfg.connector.freeze  # the run's own config is untouched
    assert applicable_baselines(cfg) == ["blind", "frozen_connector"]
    assert applicable_baselines(blind) == [] and applicable_baselines(frozen) == ["blind"]
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_config(cfg, "deaf", tmp_path)


def test_stale_keys_name_what_changed(tmp_path):
    cfg = load_config(None, ["train.max_steps=7"])
    assert stale_keys(cfg, tmp_path) is None  # nothing saved
    saved = load_config(None, ["train.max_steps=9", "train.output_dir=elsewhere", "generate.num_beams=3"])
    save_config(saved, tmp_path / "config.yaml")
    assert stale_keys(cfg, tmp_path) == ["train.max_steps"]  # neither output_dir nor generation settings count
    assert finished_step(tmp_path) is None
