"""(image tokens, caption) pairs for training and evaluation, built on the feature cache.

Every human caption of an image is one training pair; the image's tokens are stored once.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .formats import CaptionSample, SkipReport, load_captions

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


SKIP_LOG = "skipped_inputs.log"


def load_samples(cfg, skipped: SkipReport | None = None) -> dict[str, list[CaptionSample]]:
    """All data specs of a config merged per split, with the optional deterministic subsets applied.

    A photo in two datasets (the same id: coco2017-mini's val2017 photos are inside coco2017-val) counts once,
    as the first dataset's copy; the later copies are reported, not read twice."""
    from .synthetic import ensure_world

    merged: dict[str, list[CaptionSample]] = {s: [] for s in SPLITS}
    seen: dict[str, str] = {}  # image id -> the dataset spec that gave it
    repeated: list[str] = []
    for spec in cfg.data.datasets:
        if spec.startswith("synthetic:"):  # the synthetic world is generated on first use
            ensure_world(
                Path(spec.split(":", 1)[1]),
                n_images=cfg.data.synthetic_images,
                seed=cfg.data.split_seed,
                max_objects=cfg.data.synthetic_max_objects,
                occlusion=cfg.data.synthetic_occlusion,
            )
        for split, samples in load_captions(spec, seed=cfg.data.split_seed, skipped=skipped).items():
            for sample in samples:
                if sample.image_id in seen and seen[sample.image_id] != spec:
                    repeated.append(sample.image_id)
                    if skipped is not None:
                        skipped.add("photos already in an earlier dataset", sample.image_path, seen[sample.image_id])
                    continue
                seen[sample.image_id] = spec
                merged[split].append(sample)
    if repeated and skipped is None:
        warnings.warn(
            f"{len(repeated)} photos are in two datasets (e.g. {repeated[0]}): each counts once", stacklevel=2
        )
    limits = {"train": cfg.data.max_train_images, "val": cfg.data.max_eval_images, "test": cfg.data.max_eval_images}
    for split, limit in limits.items():
        if limit is not None and len(merged[split]) > limit:
            merged[split] = random.Random(cfg.data.split_seed).sample(merged[split], limit)
            merged[split].sort(key=lambda s: s.image_id)
    return merged


def preprocessed_pixels(encoder, paths: list[str], report: SkipReport) -> tuple[torch.Tensor, list[int]]:
    """The encoder's input for each readable image, as float16 [M, 3, H, W]; unreadable ones are reported."""
    from .formats import load_image

    tensors, kept = [], []
    for i, path in enumerate(paths):
        try:
            image = load_image(path)
        except FileNotFoundError as e:
            report.add("missing images", str(path), f"{type(e).__name__}: {e.strerror or e}")
            continue
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable image"
            report.add("unreadable images", str(path), f"{type(e).__name__}: {e}")
            continue
        tensors.append(encoder.preprocess([image])[0].half())
        kept.append(i)
    return (torch.stack(tensors) if tensors else torch.empty(0)), kept


def load_split_features(
    cfg,
    cache,
    splits=SPLITS,
    log_dir: str | Path | None = None,
    pixels: bool = False,
    skipped: SkipReport | None = None,
) -> dict[str, SplitFeatures]:
    """Samples -> cached image tokens -> caption pairs, per split. Unreadable images drop out here.

    pixels=True: `features` holds the encoder's preprocessed input [M, 3, H, W] (float16) instead of its
    cached output, for runs that train encoder blocks (the model then runs the encoder every step).

    Whatever was left out (broken or missing images, empty captions, captions of unlisted images) is
    counted in one warning line and listed with reasons in LOG_DIR/skipped_inputs.log; given a `skipped`
    report, it is filled instead and the caller writes it (training: only once the run is known valid).
    """
    report = skipped if skipped is not None else SkipReport()
    samples = load_samples(cfg, skipped=report)
    out = {}
    for split in splits:
        paths = [s.image_path for s in samples[split]]
        if pixels:
            features, kept = preprocessed_pixels(cache.encoder, paths, report)
        else:
            features, kept = cache.features(
                paths, batch_size=cfg.train.feature_batch_size, desc=f"encoding {split} images", skipped=report
            )
        readable = [samples[split][i] for i in kept]
        pairs = [(row, c) for row, s in enumerate(readable) for c in s.captions]
        out[split] = SplitFeatures(readable, features, pairs)
    if len(report):
        where = ""
        if log_dir is not None:
            if skipped is None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                report.write(Path(log_dir) / SKIP_LOG)
            where = f"; each listed in {Path(log_dir) / SKIP_LOG}"
        warnings.warn(f"{' + '.join(cfg.data.datasets)}: {report.summary()}{where}", stacklevel=2)
    return out


def load_conversation_features(cfg, cache, pattern: str, splits=("train", "val")) -> dict[str, SplitFeatures]:
    """A stage's conversations (`data.tasks`/pattern, LLaVA JSON) -> cached image tokens + (row, messages) pairs.

    Records without an image are counted and left out of image training (one warning line): the loss of a
    text-only turn says nothing about the connector.
    """
    from .questions import read_llava_conversations

    out = {}
    for split in splits:
        path = Path(cfg.data.tasks).expanduser() / pattern.format(split=split)
        conversations = read_llava_conversations(path)
        with_image = [c for c in conversations if c.image is not None]
        if len(with_image) < len(conversations):
            warnings.warn(
                f"{path}: {len(conversations) - len(with_image)} records without an image left out", stacklevel=2
            )
        paths = sorted({c.image for c in with_image})
        report = SkipReport()
        features, kept = cache.features(
            paths, batch_size=cfg.train.feature_batch_size, desc=f"encoding {split} images", skipped=report
        )
        if len(report):
            warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
        row_of = {paths[i]: row for row, i in enumerate(kept)}
        samples = [CaptionSample(paths[i], paths[i], [], split) for i in kept]
        pairs = [(row_of[c.image], c.messages) for c in with_image if c.image in row_of]
        out[split] = SplitFeatures(samples, features, pairs)
    return out
