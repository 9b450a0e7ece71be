"""Retrieval recall against its exact chance, ITM accuracy and SugarCrepe scoring."""

import random

import pytest
import torch

from conftest import SHARED_DATA, require
from vlmlab.eval.caption_matching import read_sugarcrepe
from vlmlab.eval.retrieval import recall_at_k, sugarcrepe_scores


def test_recall_is_one_for_a_perfect_similarity_and_chance_for_a_random_one():
    owner = [i // 2 for i in range(20)]  # 10 images, two captions each
    perfect = torch.tensor([[1.0 if owner[t] == i else 0.0 for t in range(20)] for i in range(10)])
    r = recall_at_k(perfect, owner)
    assert all(r[f"{d}_r@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert r["t2i_r@1_chance"] == pytest.approx(0.1) and r["t2i_r@10_chance"] == 1.0
    # i2t chance: at least one of 2 captions in the top k of 20 = 1 - C(18,k)/C(20,k)
    assert r["i2t_r@1_chance"] == pytest.approx(0.1)
    assert r["i2t_r@5_chance"] == pytest.approx(1 - (15 * 14) / (20 * 19))
    torch.manual_seed(0)
    random_runs = [recall_at_k(torch.randn(10, 20), owner) for _ in range(300)]
    for key in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"):
        mean = sum(x[key] for x in random_runs) / len(random_runs)
        assert mean == pytest.approx(r[f"{key}_chance"], abs=0.03), key


def test_a_scorer_that_prefers_the_true_caption_scores_one():
    items = [{"caption": "a cat on a mat", "negative_caption": "a dog on a mat"}] * 3
    features = torch.zeros(3, 4, 2)
    assert (
        sugarcrepe_scores(lambda f, c: torch.tensor([float("cat" in x) for x in c]), features, items)["accuracy"] == 1.0
    )
    assert sugarcrepe_scores(lambda f, c: torch.zeros(len(c)), features, items)["accuracy"] == 0.5  # ties: half


def test_reads_the_real_sugarcrepe_with_its_coco_images():
    folder = require(SHARED_DATA / "questions" / "sugar-crepe")
    items = read_sugarcrepe(folder, SHARED_DATA / "coco2017-val" / "val2017", limit=5)
    assert set(items) == {"add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"}
    row = random.Random(0).choice(items["swap_att"])
    assert row["caption"] != row["negative_caption"]
