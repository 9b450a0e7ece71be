"""Caption NLL over a split under true, swapped or no images: the validation loss training logs and the
probes of `vlmlab eval` that ask whether the image reaches the text."""

from __future__ import annotations

import random

import torch

from ..data.pairs import SplitFeatures


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed permutation with no fixed point: every image is paired with another one (n >= 2)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


@torch.no_grad()
def validation_loss(
    model,
    split: SplitFeatures,
    batch_size: int,
    max_batches: int | None,
    image_order=None,
    no_image: bool = False,
):
    """Mean caption NLL per token over the first batches of a split (fixed order).

    image_order: optional permutation of the split's images: caption i is scored under image
    image_order[row(i)], e.g. a derangement to measure how much the true image helps.
    no_image: score the captions with no visual tokens at all.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pairs = split.pairs[: (max_batches * batch_size) if max_batches else None]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [r if image_order is None else image_order[r] for r, _ in chunk]
        tokens = None if no_image else split.features[rows].float()
        sums, counts = model(tokens, model.text_batch([c for _, c in chunk]), reduction="sum_per_sample")
        total += sums.sum().item()
        count += counts.sum().item()
    model.train(was_training)
    return total / max(count, 1)
