"""What BLIP-2 stage 1 learned, measured: retrieval, matching, and SugarCrepe's hard negatives.

image->text and text->image recall@1/5/10 from the ITC similarities on a split, each against chance
(the recall of a random ranking, exact for the split's sizes);
ITM accuracy on the split's true pairs and as many mismatched ones (a caption of another image);
SugarCrepe (Hsieh et al. 2023, $VLMLAB_DATA/questions/sugar-crepe): per category, how often the ITM
head prefers an image's true caption over its minimally changed negative (chance 0.5; a caption run's own
likelihood on it, beside its controls: caption_matching.py).
"""

from __future__ import annotations

import json
import random
from math import comb
from pathlib import Path

import torch

from ..config import write_atomic
from .caption_matching import default_sugarcrepe_images, read_sugarcrepe

KS = (1, 5, 10)


def recall_at_k(similarity: torch.Tensor, image_of_text: list[int], ks=KS) -> dict[str, float]:
    """similarity [I, T] (image rows, text columns); image_of_text[t] = the image row of text t.
    -> i2t_r@k (an image's top k texts hold one of its captions), t2i_r@k, and the chance of each."""
    num_images, num_texts = similarity.shape
    owner = torch.tensor(image_of_text)
    positive = owner[None, :] == torch.arange(num_images)[:, None]  # [I, T]
    out: dict[str, float] = {}
    text_rank = similarity.argsort(dim=1, descending=True)  # [I, T]
    hits_i2t = positive.gather(1, text_rank)  # [I, T]: is the text at each rank a caption of the image
    image_rank = similarity.t().argsort(dim=1, descending=True)  # [T, I]
    hits_t2i = image_rank == owner[:, None]
    captions_per_image = positive.sum(1).tolist()
    for k in ks:
        out[f"i2t_r@{k}"] = hits_i2t[:, :k].any(1).float().mean().item()
        out[f"t2i_r@{k}"] = hits_t2i[:, :k].any(1).float().mean().item()
        # chance: at least one of the image's c captions among k of T drawn at random; one of I images in k
        out[f"i2t_r@{k}_chance"] = sum(
            1 - comb(num_texts - c, min(k, num_texts)) / comb(num_texts, min(k, num_texts)) for c in captions_per_image
        ) / max(num_images, 1)
        out[f"t2i_r@{k}_chance"] = min(k, num_images) / num_images
    return out


@torch.no_grad()
def split_similarity(model, split, batch_size: int = 64) -> tuple[torch.Tensor, list[int]]:
    """ITC similarity of every image of a split with every caption: [I, T], and the image of each caption."""
    model.eval()
    image_feats, text_feats = [], []
    features = split.features
    captions = [c for _, c in split.pairs]
    for start in range(0, len(features), batch_size):  # queries alone (itc mask: the text is irrelevant)
        tokens = features[start : start + batch_size].float().to(model.device)
        ids, pad = model.tokenize(["."] * len(tokens))
        _, feats, _ = model.similarity(tokens, ids, pad)
        image_feats.append(feats)
    dummy = features[:1].float().to(model.device)
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        ids, pad = model.tokenize(chunk)
        _, _, feats = model.similarity(dummy.expand(len(chunk), -1, -1), ids, pad)
        text_feats.append(feats)
    image_feats, text_feats = torch.cat(image_feats), torch.cat(text_feats)
    sim = torch.einsum("iqw,tw->itq", image_feats, text_feats).max(-1).values
    return sim.cpu(), [row for row, _ in split.pairs]


@torch.no_grad()
def match_probability(model, image_tokens: torch.Tensor, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """P(match) from the ITM head for paired rows of image tokens [B, N, D] and captions."""
    model.eval()
    out = []
    for start in range(0, len(captions), batch_size):
        ids, pad = model.tokenize(captions[start : start + batch_size])
        tokens = image_tokens[start : start + batch_size].float().to(model.device)
        out.append(model.itm_logits(tokens, ids, pad).softmax(-1)[:, 1].cpu())
    return torch.cat(out)


def itm_accuracy(model, split, seed: int = 0) -> dict[str, float]:
    """Accuracy of ITM at 0.5 on every true pair and, per pair, one caption of a random other image."""
    rng = random.Random(seed)
    rows = [row for row, _ in split.pairs]
    captions = [c for _, c in split.pairs]
    wrong = []
    for row in rows:
        j = rng.randrange(len(rows))
        while rows[j] == row:
            j = rng.randrange(len(rows))
        wrong.append(captions[j])
    images = split.features[rows + rows]
    p = match_probability(model, images, captions + wrong)
    labels = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))])
    return {"itm_accuracy": ((p > 0.5).float() == labels).float().mean().item(), "itm_accuracy_chance": 0.5}


def sugarcrepe_scores(score, features: torch.Tensor, items: list[dict]) -> dict[str, float]:
    """score(image_tokens, captions) -> [B] higher = more plausible. Accuracy = true caption scored above
    its negative (ties count half)."""
    true = score(features, [x["caption"] for x in items])
    negative = score(features, [x["negative_caption"] for x in items])
    return {"accuracy": ((true > negative).float() + 0.5 * (true == negative).float()).mean().item(), "n": len(items)}


def load_stage1_run(run_dir: str | Path):
    """A finished stage-1 run (train.stage = qformer) -> (its model with the trained weights, vision encoder)."""
    from ..config import load_config
    from ..model.qformer_stage1 import build_stage1
    from ..run.checkpoint import load_trainable

    cfg = load_config(Path(run_dir) / "config.yaml")
    if cfg.train.stage != "qformer":
        raise ValueError(f"{run_dir} is a {cfg.train.stage!r} run, not a stage-1 (qformer) run")
    model, vision = build_stage1(cfg)
    load_trainable(run_dir, model)
    return model.eval(), vision, cfg


def evaluate_stage1_run(
    run_dir: str | Path,
    split: str = "test",
    sugarcrepe: str | Path | None = None,
    sugarcrepe_images: str | Path | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """`vlmlab eval retrieval` of a stage-1 run: retrieval recall vs chance, ITM accuracy, attention statistics on the
    split, and SugarCrepe per category by ITM (when its folder and images are given); eval.json + eval.md."""
    from ..data.features import FeatureCache
    from ..data.pairs import load_split_features
    from ..model.language_model import cache_dir
    from .attention_stats import attention_stats
    from .captioning import scene_boxes

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    model, vision, cfg = load_stage1_run(run_dir)
    cache = FeatureCache(cache_dir() / "features", vision)
    data = load_split_features(cfg, cache, splits=(split,))[split]
    if len(data.samples) < 2:
        raise ValueError(f"{split} split of {cfg.data.datasets}: {len(data.samples)} image(s), retrieval needs 2+")
    sim, owner = split_similarity(model, data)
    result = {
        "run": str(run_dir),
        "split": split,
        "images": len(data.samples),
        "captions": len(data.pairs),
        "retrieval": recall_at_k(sim, owner),
        **itm_accuracy(model, data),
        "attention": attention_stats(
            model, data.features, boxes=scene_boxes(data.samples), grid=getattr(vision, "grid_size", None)
        ),
    }
    if sugarcrepe:
        items = read_sugarcrepe(sugarcrepe, sugarcrepe_images or default_sugarcrepe_images(sugarcrepe), limit)
        result["sugarcrepe_itm"] = {}
        for category, rows in items.items():
            features, kept = cache.features([r["image"] for r in rows], desc=f"encoding sugarcrepe {category}")
            rows = [rows[i] for i in kept]
            result["sugarcrepe_itm"][category] = sugarcrepe_scores(
                lambda f, c: match_probability(model, f, c), features, rows
            )
    r = result["retrieval"]
    lines = [
        f"| {split} ({result['images']} images, {result['captions']} captions) | R@1 | R@5 | R@10 |",
        "| --- | --- | --- | --- |",
    ]
    for d, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        lines.append(
            f"| {name} | " + " | ".join(f"{r[f'{d}_r@{k}']:.3f} ({r[f'{d}_r@{k}_chance']:.3f})" for k in KS) + " |"
        )
    lines.append("")
    lines.append("recall (chance in brackets); ITM accuracy {:.3f} (chance 0.5)".format(result["itm_accuracy"]))
    a = result["attention"]
    lines.append(
        f"attention: entropy {a['attn_entropy']:.3f} (uniform {a['attn_entropy_uniform']:.3f}), max weight "
        f"{a['attn_max_weight']:.3f}, query correlation {a['attn_query_correlation']:.3f}"
    )
    for category, s in result.get("sugarcrepe_itm", {}).items():
        lines.append(f"SugarCrepe {category} (ITM): {s['accuracy']:.3f} of {s['n']} (chance 0.5)")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "eval.json", json.dumps(result, indent=2))
    write_atomic(out_dir / "eval.md", text)
    print(text)
    return result
