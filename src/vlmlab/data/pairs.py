"""(image tokens, caption) pairs for training and evaluation, built on the feature cache.

Every human caption of an image is one training pair; the image's tokens are stored once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .formats import CaptionSample, load_captions

SPLITS = ("train", "val", "test")


@dataclass
class SplitFeatures:
    """One split: the readable samples, their image tokens [M, N, D] (float16) and the caption pairs."""

    samples: list[CaptionSample]
    features: torch.Tensor
    pairs: list[tuple[int, str]]  # (row in features / samples, caption)


class CaptionPairs(Dataset):
    def __init__(self, split: SplitFeatures):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, i: int):
        row, caption = self.split.pairs[i]
        return self.split.features[row], caption, i


def collate_pairs(batch):
    """-> (image tokens [B, N, D] float32, captions, pair indices); the indices trace which rank saw what."""
    tokens, captions, indices = zip(*batch)
    return torch.stack(tokens).float(), list(captions), torch.tensor(indices)


def load_samples(cfg) -> dict[str, list[CaptionSample]]:
    """All data specs of a config merged per split, with the optional deterministic subsets applied."""
    from .synthetic import ensure_world

    merged: dict[str, list[CaptionSample]] = {s: [] for s in SPLITS}
    for spec in cfg.data.datasets:
        if spec.startswith("synthetic:"):  # the synthetic world is generated on first use
            ensure_world(
                Path(spec.split(":", 1)[1]),
                n_images=cfg.data.synthetic_images,
                seed=cfg.data.split_seed,
                max_objects=cfg.data.synthetic_max_objects,
            )
        for split, samples in load_captions(spec, seed=cfg.data.split_seed).items():
            merged[split].extend(samples)
    limits = {"train": cfg.data.max_train_images, "val": cfg.data.max_eval_images, "test": cfg.data.max_eval_images}
    for split, limit in limits.items():
        if limit is not None and len(merged[split]) > limit:
            merged[split] = random.Random(cfg.data.split_seed).sample(merged[split], limit)
            merged[split].sort(key=lambda s: s.image_id)
    return merged


def load_split_features(cfg, cache, splits=SPLITS) -> dict[str, SplitFeatures]:
    """Samples -> cached image tokens -> caption pairs, per split. Unreadable images drop out here."""
    samples = load_samples(cfg)
    out = {}
    for split in splits:
        paths = [s.image_path for s in samples[split]]
        features, kept = cache.features(paths, batch_size=cfg.train.feature_batch_size, desc=f"encoding {split} images")
        readable = [samples[split][i] for i in kept]
        pairs = [(row, c) for row, s in enumerate(readable) for c in s.captions]
        out[split] = SplitFeatures(readable, features, pairs)
    return out
