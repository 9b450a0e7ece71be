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
from ..data.pairs import load_split_features
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


def caption_report(
    run_dir: str | Path, split: str = "test", num_images: int = 8, out_dir: str | Path | None = None
) -> dict:
    """Loads a run, captions `num_images` images of a split (true and swapped image) and scores the
    split's caption NLL with true vs shuffled images. Prints a table; writes captions_<split>.json into
    out_dir (default: the run's folder)."""
    run_dir = Path(run_dir)
    model = load_run(run_dir)
    cfg = model.cfg
    cache = FeatureCache(cache_dir() / "features", model.vision)
    data = load_split_features(cfg, cache, splits=(split,))[split]
    if len(data.samples) < 2:
        raise ValueError(f"the {split} split has {len(data.samples)} readable images; need at least 2")
    rows = caption_split(model, data, num_images, seed=cfg.train.seed)
    order = derangement(len(data.samples), cfg.train.seed)
    true_loss = validation_loss(model, data, cfg.train.batch_size, None)
    shuffled_loss = validation_loss(model, data, cfg.train.batch_size, None, image_order=order)
    changed = sum(r["caption"] != r["caption_with_swapped_image"] for r in rows)
    print(f"\n{split} images: reference | caption | caption when the image is swapped\n")
    print(format_caption_table(rows))
    print(
        f"\n{split} caption NLL per token over {len(data.pairs)} captions of {len(data.samples)} images: "
        f"{true_loss:.3f} with the true image, {shuffled_loss:.3f} with images shuffled"
        f"\ncaptions that change when the image is swapped: {changed} of {len(rows)}"
    )
    report = {
        "split": split,
        "images": len(data.samples),
        "captions": rows,
        "nll_true_images": true_loss,
        "nll_shuffled_images": shuffled_loss,
        "captions_changed_by_swap": changed,
    }
    out = Path(out_dir or run_dir) / f"captions_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2))
    print(f"written to {out}")
    return report
