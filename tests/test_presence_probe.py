"""The presence probe's parts on hand-made cases: the AUC by hand, and a probe that learns what is learnable."""

import pytest
import torch

from vlmlab.eval.pope import roc_auc
from vlmlab.eval.presence_probe import fit_probe, pooled


def test_roc_auc_by_hand():
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5  # ties count half
    assert roc_auc([2, 0, 1, 3], [True, True, False, False]) == pytest.approx(1 / 4)  # 2>1; 2<3, 0<1, 0<3
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc([1, 2], [True, True])


def test_pooled_keeps_a_feature_one_token_carries():
    tokens = torch.zeros(2, 5, 3)
    tokens[0, 4, 1] = 10.0  # one token of one image: the mean dilutes it, the max keeps it
    out = pooled(tokens)
    assert out.shape == (2, 6) and out[0, 1] == pytest.approx(2.0) and out[0, 4] == 10.0 and out[1].abs().sum() == 0


def test_the_probe_reads_presence_that_is_in_the_features_and_not_labels_that_are_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.5], dim=1).float()  # two categories, linear in x
    train, test = slice(0, 300), slice(300, 400)
    logits = fit_probe(x[train], y[train])(x[test])
    for c in range(2):
        assert roc_auc(logits[:, c].tolist(), y[test, c].bool().tolist()) > 0.95
    noise = y[torch.randperm(400, generator=g)]  # labels that have nothing to do with the features
    logits = fit_probe(x[train], noise[train])(x[test])
    assert 0.3 < roc_auc(logits[:, 0].tolist(), noise[test, 0].bool().tolist()) < 0.7


def test_on_the_real_mini_box_labels_teach_presence_better_than_caption_labels(tmp_path, capsys):
    """The finding behind photos-recipe-boxes, on coco2017-mini alone: the probe trained on the boxed categories
    of the training photos ranks POPE's held-out questions better than the one trained on caption-named ones."""
    from conftest import SHARED_DATA, require
    from vlmlab.cli import main

    root = require(SHARED_DATA / "coco2017-mini")
    data = f"data.datasets=[coco:{root}]"
    assert main(["make-tasks", str(tmp_path / "tasks"), "--data", f"coco:{root}"]) == 0
    assert main(["presence-probe", "--set", data, "--pope", str(tmp_path / "tasks")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    auc = {labels: float(rows[labels][3]) for labels in ("captions", "boxes")}
    assert auc["boxes"] > 0.7 and auc["boxes"] > auc["captions"] + 0.05, auc
