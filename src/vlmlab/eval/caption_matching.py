"""SugarCrepe by a captioner's own likelihood, beside its controls.

SugarCrepe (Hsieh et al. 2023) pairs a COCO photo's true caption with a hard negative that replaces, swaps or adds
an object, an attribute or a relation. A captioner matches an item when log p(true caption | image) is above
log p(negative | image), both summed over the caption's tokens (a negative that adds words must not win by being
longer, nor lose by it: the add_* negatives are longer, the others about as long). The authors filtered the
negatives so that text-only models cannot tell them apart well, but not perfectly, so each accuracy stands beside
the text prior asked the same way:

- *swapped image*: the same model, each caption scored under another photo of the set;
- *no image*: the same model with no visual tokens;
- *blind LM*: the same LLM + LoRA trained on the same captions with no image (`baselines/blind` of the run).

What the image adds is the model row minus the blind LM row, item by item (paired), with its standard error.

A second scoring asks only what the image adds: each caption scored by log p(caption | image) - log p(caption | no
image) under the same model, its pointwise mutual information with the image (the "domain-conditional PMI" of
Holtzman et al. 2021; VisualGPTScore, Lin et al. 2023, divides by the text prior the same way). Plain likelihood
lets the captioner's text prior (its LoRA read COCO captions) vote on every item; PMI cancels it, so an item is
matched only if the image raises the true caption more than the negative. Its control is the same score under a
swapped photo: an image-specific gain is gone there. Both scorings stand in the table; neither replaces the other.

SugarCrepe's true caption is one of the photo's COCO captions: a run that trained on a photo has read it, so only
photos the run never trained on are scored (`unseen_only`, the default; matched by COCO id).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, expand_data_root, write_atomic

CHANCE = 0.5
SUGARCREPE_FILES = "sugarcrepe"  # sugarcrepe.json, sugarcrepe.md


def read_sugarcrepe(folder: str | Path, image_dir: str | Path, limit: int | None = None) -> dict[str, list[dict]]:
    """-> {category: [{"image": path, "caption", "negative_caption"}]} for the images present in image_dir."""
    folder, image_dir = Path(folder), Path(image_dir)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no SugarCrepe category files (*.json) in {folder}")
    out = {}
    for f in files:
        rows = [
            {
                "image": str(image_dir / v["filename"]),
                "caption": v["caption"],
                "negative_caption": v["negative_caption"],
            }
            for v in json.loads(f.read_text()).values()
            if (image_dir / v["filename"]).is_file()
        ]
        out[f.stem] = rows[:limit] if limit else rows
    return out


def default_sugarcrepe_images(folder: str | Path) -> Path:
    """DATA/questions/sugar-crepe -> DATA/coco2017-val/val2017 (its images are COCO-2017 val)."""
    return Path(folder).resolve().parent.parent / "coco2017-val" / "val2017"


def swapped_images(images: list[str]) -> list[str]:
    """Each item's photo -> another photo of the list (the next distinct one in sorted order): never its own."""
    distinct = sorted(set(images))
    if len(distinct) < 2:
        raise ValueError("the swapped-image control needs items about at least 2 photos")
    following = {p: distinct[(k + 1) % len(distinct)] for k, p in enumerate(distinct)}
    return [following[p] for p in images]


@torch.no_grad()
def caption_logprobs(model, images: list[str | None], captions: list[str], batch_size: int = 32) -> list[float]:
    """Summed log p(caption | image) for each pair, in the caption format the run trained on (None: no image).
    Pairs with and without an image are scored in separate batches: a caption batch has no mask for a missing
    image (image_tokens_of gives it zero features, which the connector turns into a visual prefix)."""
    out = [0.0] * len(captions)
    for seen in (True, False):
        rows = [i for i, im in enumerate(images) if (im is not None) == seen]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tokens = model.image_tokens_of([images[i] for i in chunk]) if seen else None
            text = model.text_batch([captions[i] for i in chunk])
            nll, _ = model(None if tokens is None else tokens.float(), text, reduction="sum_per_sample")
            for i, value in zip(chunk, (-nll.float().cpu()).tolist()):
                out[i] = value
    return out


def accuracy_with_error(correct: list[float]) -> tuple[float, float]:
    """Mean and its standard error (ties count half)."""
    n = len(correct)
    mean = sum(correct) / n
    return mean, math.sqrt(sum((c - mean) ** 2 for c in correct) / max(n - 1, 1) / n)


def matched(true: list[float], negative: list[float]) -> list[float]:
    return [1.0 if t > g else 0.5 if t == g else 0.0 for t, g in zip(true, negative)]


def accuracies(correct: dict[str, list[float]]) -> tuple[dict, dict]:
    """matched() per category -> (accuracy per category and "all", its standard error the same way)."""
    rows, errors = {}, {}
    for category, values in correct.items():
        rows[category], errors[category] = accuracy_with_error(values)
    pooled = [v for values in correct.values() for v in values]
    rows["all"], errors["all"] = accuracy_with_error(pooled) if pooled else (float("nan"), 0.0)
    return rows, errors


def score_rows(answerers: dict[str, tuple[object, str]], items: dict[str, list[dict]], desc: str = "") -> dict:
    """answerers: row name -> (model, 'true' | 'swapped' | 'none'); items: category -> SugarCrepe items.
    -> {"rows": {row: {category: accuracy, ..., "all"}}, "errors": the same with standard errors, "logprobs":
    {row: {category: [[true, negative], ...]}}}."""
    rows, errors, per_item = {}, {}, {}
    for name, (model, which) in answerers.items():
        per_item[name], correct = {}, {}
        for category, rows_of in tqdm(items.items(), desc=f"{desc}{name}", leave=False):
            photos = [r["image"] for r in rows_of]
            photos = {"true": photos, "swapped": swapped_images(photos), "none": [None] * len(photos)}[which]
            true = caption_logprobs(model, photos, [r["caption"] for r in rows_of])
            negative = caption_logprobs(model, photos, [r["negative_caption"] for r in rows_of])
            per_item[name][category] = [[round(t, 4), round(g, 4)] for t, g in zip(true, negative)]
            correct[category] = matched(true, negative)
        rows[name], errors[name] = accuracies(correct)
    return {"rows": rows, "errors": errors, "logprobs": per_item}


IMAGE_PMI = "model, image PMI"  # log p(c | image) - log p(c | no image)
SWAPPED_PMI = "swapped image, image PMI"  # the same with another photo: its control
# the paired gains a record can hold, (row, control): the table's and the results record's order
PAIRED_GAINS = (("model", "blind LM"), ("model", "no image"), (IMAGE_PMI, "blind LM"), (IMAGE_PMI, SWAPPED_PMI))


def add_image_pmi_rows(record: dict) -> None:
    """The PMI rows (module docstring) from the rows' logprobs: each caption's score with its image (or a swapped
    one) minus its score with none, item by item."""
    none = record["logprobs"]["no image"]
    for source, name in (("model", IMAGE_PMI), ("swapped image", SWAPPED_PMI)):
        per_item = {
            category: [[round(t - tn, 4), round(g - gn, 4)] for (t, g), (tn, gn) in zip(pairs, none[category])]
            for category, pairs in record["logprobs"][source].items()
        }
        record["logprobs"][name] = per_item
        record["rows"][name], record["errors"][name] = accuracies({c: matched(*zip(*v)) for c, v in per_item.items()})


def paired_gain(record: dict, row: str, control: str) -> dict[str, tuple[float, float]]:
    """Per category (and all): mean of (row matched - control matched) over the same items, and its standard error."""
    out, pooled = {}, []
    for category, pairs in record["logprobs"][row].items():
        a = matched(*zip(*pairs))
        b = matched(*zip(*record["logprobs"][control][category]))
        diffs = [x - y for x, y in zip(a, b)]
        pooled += diffs
        out[category] = accuracy_with_error(diffs)
    out["all"] = accuracy_with_error(pooled)
    return out


def check_caption_matching(run_dir: str | Path, folder: str | Path, blind_run: str | Path | None = None) -> Path:
    """Refusals before any model loads (and before `vlmlab eval captions` spends its time on captions): a run that
    trained on conversations, a blind LM that sees, a folder with no SugarCrepe category files. -> the folder,
    $VLMLAB_DATA expanded."""
    from ..config import load_config
    from ..run.release import resolve_model

    run_dir = resolve_model(run_dir)
    if load_config(run_dir / "config.yaml").data.tasks:
        raise ConfigError(
            f"{run_dir} trained on conversations (data.tasks): SugarCrepe scores a caption run's own caption "
            "likelihood; score the caption stage it started from"
        )
    if blind_run is not None:
        connector = load_config(resolve_model(blind_run) / "config.yaml").connector.type
        if connector != "none":
            raise ConfigError(f"--blind {blind_run}: its connector is {connector!r}, not 'none' (a blind LM)")
    folder = Path(expand_data_root(str(folder), "--sugarcrepe"))  # '$VLMLAB_DATA/questions/sugar-crepe', as recipes
    if not any(folder.glob("*.json")):
        raise FileNotFoundError(f"no SugarCrepe category files (*.json) in {folder}")
    return folder


def caption_matching(
    run_dir: str | Path,
    folder: str | Path,
    images: str | Path | None = None,
    blind_run: str | Path | None = None,
    limit: int | None = None,
    unseen_only: bool = True,
) -> dict:
    """The record: every row's accuracy per category beside the controls, on photos the run never trained on."""
    from ..config import load_config
    from ..run import load_run
    from ..run.release import model_name, resolve_model
    from .question_scores import TooFewQuestions, photo_key, trained_photo_keys

    named = {"run": model_name(run_dir), "blind_run": None if blind_run is None else model_name(blind_run)}
    folder = check_caption_matching(run_dir, folder, blind_run)
    run_dir = resolve_model(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    items = read_sugarcrepe(folder, images or default_sugarcrepe_images(folder), limit)
    asked = sum(len(v) for v in items.values())
    if unseen_only:
        seen = trained_photo_keys(cfg)
        items = {c: [r for r in rows if photo_key(r["image"]) not in seen] for c, rows in items.items()}
    items = {c: rows for c, rows in items.items() if len(rows) >= 2}
    if not items:
        raise TooFewQuestions(f"no SugarCrepe category keeps 2 items about photos the run never trained on ({folder})")
    model = load_run(run_dir)
    model.remember_images()  # a photo is encoded once for all its captions and categories
    answerers = {"model": (model, "true"), "swapped image": (model, "swapped"), "no image": (model, "none")}
    record = score_rows(answerers, items)
    del model, answerers
    if blind_run is not None:
        for key, value in score_rows({"blind LM": (load_run(blind_run), "none")}, items).items():
            record[key] |= value
    record |= named | {
        "folder": str(folder),
        "items": {c: len(rows) for c, rows in items.items()},
        "asked": asked,
        "dropped_trained_photos": asked - sum(len(v) for v in items.values()) if unseen_only else None,
        "chance": CHANCE,
    }
    add_image_pmi_rows(record)
    for row, control in PAIRED_GAINS:
        if control in record["rows"]:
            record[f"{row} - {control}"] = paired_gain(record, row, control)
    return record


def format_caption_matching(record: dict) -> str:
    """One table, categories as columns (accuracy ± standard error), then the paired gains over the text prior."""
    categories = list(record["items"]) + ["all"]
    lines = ["| row | " + " | ".join(categories) + " |", "| --- |" + " --- |" * len(categories)]
    lines.append("| items | " + " | ".join(str(record["items"].get(c, sum(record["items"].values()))) for c in categories) + " |")  # fmt: skip
    for name, row in record["rows"].items():
        err = record["errors"][name]
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f} ± {err[c]:.3f}" for c in categories) + " |")
    lines.append("| chance | " + " | ".join(f"{record['chance']:.3f}" for _ in categories) + " |")
    for key in (f"{row} - {control}" for row, control in PAIRED_GAINS):
        if key in record:
            lines.append(f"| {key} (paired) | " + " | ".join(f"{record[key][c][0]:+.3f} ± {record[key][c][1]:.3f}" for c in categories) + " |")  # fmt: skip
    dropped = record.get("dropped_trained_photos")
    note = f"; {dropped} of {record['asked']} items about photos the run trained on left out" if dropped else ""
    return (
        "SugarCrepe by caption likelihood: how often log p(true caption | image) > log p(hard negative | image) "
        f"(summed over tokens){note}. The image PMI rows compare log p(caption | image) - log p(caption | no image) "
        "instead: only what the image adds.\n\n" + "\n".join(lines)
    )


def evaluate_caption_matching(
    run_dir: str | Path,
    folder: str | Path,
    images: str | Path | None = None,
    blind_run: str | Path | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    unseen_only: bool = True,
) -> dict:
    """caption_matching, written to OUT_DIR/sugarcrepe.json and .md (default: the run dir) and printed."""
    from ..run.release import resolve_model

    record = caption_matching(run_dir, folder, images, blind_run, limit, unseen_only)
    out = Path(out_dir) if out_dir else resolve_model(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = format_caption_matching(record)
    write_atomic(out / f"{SUGARCREPE_FILES}.json", json.dumps(record, indent=1))
    write_atomic(out / f"{SUGARCREPE_FILES}.md", text + "\n")
    print(text)
    return record
