"""Show that a run's captions follow the image (`vlmlab demo` trains the demo run, then calls this; so does
`vlmlab captions` on any run).

For each held-out image it prints the reference, the model's caption, and the caption the model
writes when given *another* image with the same prompt. If the LLM ignored the image, the last two
columns would agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import write_atomic
from ..data.features import FeatureCache
from ..data.pairs import SplitFeatures, load_split_features
from ..model.language_model import cache_dir
from ..model.nll import derangement, validation_loss
from ..run import load_run


def caption_split(model, split, count: int, seed: int = 0) -> list[dict]:
    """Captions for the first `count` images of a split, under the true and under a swapped image."""
    n = min(count, len(split.samples))
    tokens = split.features[:n].float()
    swap = derangement(n, seed)
    own = model.generate_from_tokens(tokens)
    swapped = model.generate_from_tokens(tokens[swap])
    return [
        {
            "image": split.samples[i].image_path,
            "reference": split.samples[i].captions[0],
            "caption": own[i],
            "swapped_image": split.samples[swap[i]].image_path,
            "caption_with_swapped_image": swapped[i],
        }
        for i in range(n)
    ]


def format_caption_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(f"image     {Path(r['image']).name}")
        lines.append(f"  reference        : {r['reference']}")
        lines.append(f"  caption          : {r['caption']}")
        lines.append(f"  swapped image -> : {r['caption_with_swapped_image']}   ({Path(r['swapped_image']).name})")
    return "\n".join(lines)


CHECK_IMAGES = 24  # the first images of a split, scored again on their own: a quick check of a released model


def first_images(split: SplitFeatures, count: int) -> SplitFeatures:
    """The first `count` images of a split, with their captions."""
    pairs = [(row, c) for row, c in split.pairs if row < count]
    return SplitFeatures(split.samples[:count], split.features[:count], pairs)


def split_nll(model, split: SplitFeatures, seed: int) -> dict:
    """Caption NLL per token over a split with the true images and with the images deranged (seeded)."""
    order = derangement(len(split.samples), seed)
    return {
        "images": len(split.samples),
        "nll_true_images": validation_loss(model, split, model.cfg.train.batch_size, None),
        "nll_shuffled_images": validation_loss(model, split, model.cfg.train.batch_size, None, image_order=order),
    }


def load_split(model, split: str) -> SplitFeatures:
    """A run's split of its own datasets, as cached image tokens of its encoder."""
    cache = FeatureCache(cache_dir() / "features", model.vision)
    data = load_split_features(model.cfg, cache, splits=(split,))[split]
    if len(data.samples) < 2:
        raise ValueError(f"the {split} split has {len(data.samples)} readable images; need at least 2")
    return data


def caption_report(
    run_dir: str | Path, split: str = "test", num_images: int = 8, out_dir: str | Path | None = None
) -> dict:
    """Loads a run, captions `num_images` images of a split (true and swapped image) and scores the
    split's caption NLL with true vs shuffled images. Prints a table; writes captions_<split>.json into
    out_dir (default: the run's folder). The record also holds the NLL of the first CHECK_IMAGES images
    alone, which a released model is re-scored against in seconds (tests/test_zoo.py)."""
    run_dir = Path(run_dir)
    model = load_run(run_dir)
    data = load_split(model, split)
    rows = caption_split(model, data, num_images, seed=model.cfg.train.seed)
    nll = split_nll(model, data, model.cfg.train.seed)
    changed = sum(r["caption"] != r["caption_with_swapped_image"] for r in rows)
    print(f"\n{split} images: reference | caption | caption when the image is swapped\n")
    print(format_caption_table(rows))
    print(
        f"\n{split} caption NLL per token over {len(data.pairs)} captions of {len(data.samples)} images: "
        f"{nll['nll_true_images']:.3f} with the true image, {nll['nll_shuffled_images']:.3f} with images shuffled"
        f"\ncaptions that change when the image is swapped: {changed} of {len(rows)}"
    )
    report = {
        "split": split,
        "images": len(data.samples),
        "captions": rows,
        "nll_true_images": nll["nll_true_images"],
        "nll_shuffled_images": nll["nll_shuffled_images"],
        "captions_changed_by_swap": changed,
        "first_images": split_nll(model, first_images(data, CHECK_IMAGES), model.cfg.train.seed),
    }
    out = Path(out_dir or run_dir) / f"captions_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2))
    print(f"written to {out}")
    return report
