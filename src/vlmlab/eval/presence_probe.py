"""Is object presence in the frozen features, and do the labels teach it? A linear probe, before any LLM.

A multi-label logistic regression on the frozen encoder's tokens (mean- and max-pooled, standardised) learns
which COCO categories a training photo holds, from one of two label sources:
- captions: every training photo, labelled with the categories its captions name (data/caption_objects.py);
- boxes: the training photos with COCO instances, labelled with every boxed category.
It is then asked POPE's questions about held-out photos: the AUC of its logit for the asked category says how
well presence can be read from these features with these labels; F1 and yes-ratio are at its own threshold
(logit 0). A VLM whose POPE AUC sits at the probe's has learned what its labels teach, and the lever is the
labels, not more steps.
"""

from __future__ import annotations

import re

import torch

from ..data.caption_objects import objects_from_captions
from ..data.formats import SkipReport
from ..data.grounded_questions import image_facts
from ..data.pairs import load_samples
from .pope import pope_scores, roc_auc

LABELS = ("captions", "boxes")
_ASKED = re.compile(r"Is there an? (.+) in the image\?")


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """Image tokens [N, T, D] -> [N, 2D]: mean and max over the tokens (a small object may live in one token)."""
    tokens = tokens.float()
    return torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 500, lr: float = 1e-2, weight_decay: float = 1e-2):
    """Full-batch AdamW on binary cross-entropy; returns a function features -> logits [N, C]."""
    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-4
    linear = torch.nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    xs = (x - mean) / std
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(linear(xs), y).backward()
        optimizer.step()
    return lambda features: linear((features - mean) / std).detach()


def training_labels(cfg, source: str, min_captions: int = 1) -> list[tuple[str, set[str]]]:
    """(image path, categories present) for the config's training photos, from captions or from boxes."""
    if source not in LABELS:
        raise ValueError(f"labels {source!r}: one of {list(LABELS)}")
    train = load_samples(cfg, SkipReport())["train"]
    if source == "captions":
        return [(s.image_path, set(objects_from_captions(s.captions, min_captions))) for s in train]
    return [(f.sample.image_path, set(f.counts)) for f in image_facts(train) if not f.synthetic]


def presence_probe(cfg, questions: list, source: str, cache, min_captions: int = 1) -> dict:
    """Fits the probe on one label source and scores it on POPE questions (data/questions.Question)."""
    labelled = training_labels(cfg, source, min_captions)
    asked = [_ASKED.match(q.question) for q in questions]
    if not all(asked):
        raise ValueError("every question must read 'Is there a/an {object} in the image?'")
    categories = sorted({c for _, cs in labelled for c in cs} | {m.group(1) for m in asked})
    index = {c: i for i, c in enumerate(categories)}
    features, kept = cache.features([path for path, _ in labelled], desc="encoding training photos")
    y = torch.zeros(len(kept), len(categories))
    for row, k in enumerate(kept):
        for c in labelled[k][1]:
            y[row, index[c]] = 1
    probe = fit_probe(pooled(features), y)
    images = sorted({q.image for q in questions})
    test, found = cache.features(images, desc="encoding test photos")
    if len(found) != len(images):
        raise ValueError(f"{len(images) - len(found)} question images could not be read")
    logits = probe(pooled(test))
    row_of = {image: i for i, image in enumerate(images)}
    scores = [logits[row_of[q.image], index[m.group(1)]].item() for q, m in zip(questions, asked)]
    labels = [q.answers[0] for q in questions]
    answers = ["yes" if s > 0 else "no" for s in scores]
    return {
        "labels": source,
        "training photos": len(kept),
        "positives per photo": y.sum(1).mean().item(),
        "auc": roc_auc(scores, [label == "yes" for label in labels]),
    } | {k: v for k, v in pope_scores(answers, labels).items() if k in ("accuracy", "f1", "yes_ratio")}
