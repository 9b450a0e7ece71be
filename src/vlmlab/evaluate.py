"""`vlmlab eval`: caption metrics next to probes of whether the image reaches the text.

Probes, all on the same split:
- caption NLL per token under the true image, another image (a fixed derangement), the mean image
  of the split (a "blank" that carries no per-image information), and with no visual tokens at all;
  true-vs-shuffled is the *visual information gain* in nats/token;
- CIDEr-D of the generated captions against their own image's references and against a deranged
  pairing (a captioner that ignores the image scores the same on both);
- the share of distinct captions, and of images whose caption changes when the image is swapped.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.pairs import SplitFeatures, load_split_features
from .features import FeatureCache
from .language_model import cache_dir
from .metrics import caption_metrics
from .train import derangement, load_run, validation_loss

TABLE_COLUMNS = [
    ("BLEU-4", "BLEU-4"),
    ("METEOR", "METEOR"),
    ("ROUGE-L", "ROUGE-L"),
    ("CIDEr-D", "CIDEr-D"),
    ("CIDEr-D, deranged refs", "cider_deranged"),
    ("NLL true", "nll_true"),
    ("NLL shuffled", "nll_shuffled"),
    ("NLL mean image", "nll_mean_image"),
    ("NLL no image", "nll_no_image"),
    ("visual gain (nats/tok)", "visual_information_gain"),
    ("distinct captions", "distinct_share"),
    ("changed by swap", "swap_changed_share"),
]


@torch.no_grad()
def generate_all(model, features: torch.Tensor, batch_size: int, desc: str, **generate_kwargs) -> list[str]:
    captions = []
    for start in tqdm(range(0, len(features), batch_size), desc=desc, unit="batch"):
        captions += model.generate_from_tokens(features[start : start + batch_size].float(), **generate_kwargs)
    return captions


def evaluate_split(model, split: SplitFeatures, batch_size: int = 16, seed: int = 0, **generate_kwargs) -> dict:
    """All metrics and probes for one split; generation settings default to the run's config."""
    n = len(split.samples)
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 readable images, got {n}")
    order = derangement(n, seed)
    g = model.cfg.generate
    settings = {
        "max_new_tokens": generate_kwargs.get("max_new_tokens") or g.max_new_tokens,
        "num_beams": generate_kwargs.get("num_beams") or g.num_beams,
        "repetition_penalty": generate_kwargs.get("repetition_penalty") or g.repetition_penalty,
    }
    captions = generate_all(model, split.features, batch_size, "captioning", **settings)
    swapped = generate_all(model, split.features[order], batch_size, "captioning swapped images", **settings)
    refs = {str(i): s.captions for i, s in enumerate(split.samples)}
    cands = {str(i): c for i, c in enumerate(captions)}
    metrics = caption_metrics(refs, cands)
    deranged_refs = {str(i): split.samples[order[i]].captions for i in range(n)}
    result = dict(metrics)
    result["cider_deranged"] = caption_metrics(deranged_refs, cands, meteor=False)["CIDEr-D"]

    mean_image = replace(split, features=split.features.float().mean(0, keepdim=True).expand_as(split.features))
    nll = {
        "nll_true": validation_loss(model, split, batch_size, None),
        "nll_shuffled": validation_loss(model, split, batch_size, None, image_order=order),
        "nll_mean_image": validation_loss(model, mean_image, batch_size, None),
        "nll_no_image": validation_loss(model, split, batch_size, None, no_image=True),
    }
    result.update(nll)
    result["visual_information_gain"] = nll["nll_shuffled"] - nll["nll_true"]
    result["distinct_share"] = len(set(captions)) / n
    result["swap_changed_share"] = sum(a != b for a, b in zip(captions, swapped)) / n
    result["images"] = n
    result["generation"] = settings
    result["examples"] = [
        {"image": s.image_path, "references": s.captions, "caption": c, "caption_with_swapped_image": w}
        for s, c, w in zip(split.samples, captions, swapped)
    ]
    return result


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per evaluated run, the columns of TABLE_COLUMNS."""
    header = "| run | " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(TABLE_COLUMNS) + 1)]
    for run, r in rows.items():
        cells = []
        for _, key in TABLE_COLUMNS:
            value = r.get(key)
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_run(run_dir: str | Path, data: list[str] | None = None, split: str = "test", **generate_kwargs) -> dict:
    """Evaluates a run on a split of its own data (or of `data` specs); writes eval.json and eval.md."""
    run_dir = Path(run_dir)
    model = load_run(run_dir)
    cfg = model.cfg
    if data:
        cfg.data.datasets = list(data)
    cache = FeatureCache(cache_dir() / "features", model.vision)
    split_data = load_split_features(cfg, cache, splits=(split,))[split]
    result = evaluate_split(model, split_data, cfg.train.batch_size, cfg.train.seed, **generate_kwargs)
    result.update({"run": str(run_dir), "split": split, "data": cfg.data.datasets})
    table = format_table({run_dir.name: result})
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    notes = f"\n\ntokenizer: {result['tokenizer']}; generation: {result['generation']}; {result['images']} images\n"
    (run_dir / "eval.md").write_text(table + notes)
    print(table + notes)
    return result
