"""`vlmlab eval captions`: caption metrics next to probes of whether the image reaches the text, and baselines.

Probes, all on the same split:
- caption NLL per token under the true image, another image (a fixed derangement), the mean image
  of the split (a "blank" that carries no per-image information), and with no visual tokens at all;
  true-vs-shuffled is the *visual information gain* in nats/token;
- CIDEr-D of the generated captions against their own image's references and against a deranged
  pairing (a captioner that ignores the image scores the same on both);
- the share of distinct captions, and of images whose caption changes when the image is swapped.

Baselines, in the same table (see baselines.py): the blind LM, the frozen-connector control, and
nearest-neighbour caption retrieval. The two trained ones come in as finished run folders (trained by
analysis/baselines.py beforehand): scoring a run never trains one.

score_run computes the record (eval.json) and its notes; write_caption_eval writes eval.json, eval.md and the
contact sheet; evaluate_run does both.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import load_config, write_atomic
from ..data.features import FeatureCache
from ..data.pairs import SplitFeatures, load_split_features
from ..data.synthetic import ATTRIBUTES, OBJECT_SCORES, attribute_correct, object_scores
from ..model.language_model import cache_dir
from ..model.nll import derangement, validation_loss
from ..run import load_run
from .attention_stats import attention_stats
from .baselines import TRAINED_BASELINES, NearestNeighbourCaptioner
from .contact_sheet import contact_sheet
from .metrics import caption_metrics
from .reranking import Reranker, check_rerank, format_selection_table, selection_table

TABLE_COLUMNS = [
    ("BLEU-1", "BLEU-1"),
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
# synthetic world only: per attribute (multisets over the scene), then per object (synthetic.object_scores)
OBJECT_KEYS = {"objects exact": "obj_exact", "objects real": "obj_real", "colour-shape pairs": "obj_pairs"}
ATTRIBUTE_COLUMNS = [(f"{a} correct", f"attr_{a}") for a in ATTRIBUTES] + [(n, OBJECT_KEYS[n]) for n in OBJECT_SCORES]
RETRIEVED_TEXT_COLUMNS = [  # runs with retrieved captions in the prompt only (retrieved_captions.py)
    ("NLL swapped retrieved text", "nll_swapped_text"),
    ("text gain (nats/tok)", "retrieved_text_gain"),
    ("changed by text swap", "text_swap_changed_share"),
]
RETRIEVAL_KS = (1, 3, 5, 10, 20)
BASELINE_LABELS = {"blind": "blind LM", "frozen_connector": "frozen connector"}


@torch.no_grad()
def generate_all(
    model, features: torch.Tensor, batch_size: int, desc: str, num_candidates: int = 0, **generate_kwargs
) -> list:
    """A caption per image; with num_candidates, a list of that many beam candidates per image instead."""
    captions = []
    for start in tqdm(range(0, len(features), batch_size), desc=desc, unit="batch"):
        batch = features[start : start + batch_size].float()
        if num_candidates:
            captions += model.candidates_from_tokens(batch, num_candidates, **generate_kwargs)
        else:
            captions += model.generate_from_tokens(batch, **generate_kwargs)
    return captions


def score_captions(
    split: SplitFeatures, captions: list[str], swapped: list[str], order: list[int], use_java: bool | None = None
) -> dict:
    """Caption metrics, CIDEr-D against deranged references, distinct and swap-changed shares."""
    n = len(split.samples)
    if len(captions) != n or len(swapped) != n:
        raise ValueError(f"{n} images but {len(captions)} captions and {len(swapped)} swapped-image captions")
    refs = {str(i): s.captions for i, s in enumerate(split.samples)}
    cands = {str(i): c for i, c in enumerate(captions)}
    result = caption_metrics(refs, cands, use_java=use_java)
    deranged_refs = {str(i): split.samples[order[i]].captions for i in range(n)}
    result["cider_deranged"] = caption_metrics(deranged_refs, cands, use_java=use_java, meteor=False)["CIDEr-D"]
    result.update(attribute_scores(split, captions))
    result["distinct_share"] = len(set(captions)) / n
    result.update(most_repeated(captions))
    result["swap_changed_share"] = sum(a != b for a, b in zip(captions, swapped)) / n
    result["images"] = n
    result["examples"] = [
        {"image": s.image_path, "references": s.captions, "caption": c, "caption_with_swapped_image": w}
        for s, c, w in zip(split.samples, captions, swapped)
    ]
    return result


def most_repeated(captions: list[str]) -> dict:
    """Mode collapse, measured: the caption written for the most images and for how many (ties: the first
    written). A distinct share of 0.57 can hide one caption written for 13 of 140 photos."""
    counts = Counter(captions)
    caption, count = max(counts.items(), key=lambda kv: kv[1]) if counts else ("", 0)
    return {"most_repeated_caption": caption, "most_repeated_count": count}


def scene_boxes(samples) -> list[list] | None:
    """Per sample its objects' boxes (synthetic worlds of version 2 on), or None when any sample lacks them."""
    if not samples or not all(s.meta.get("objects") and all("box" in o for o in s.meta["objects"]) for s in samples):
        return None
    return [[o["box"] for o in s.meta["objects"]] for s in samples]


def attribute_scores(split: SplitFeatures, captions: list[str]) -> dict:
    """Synthetic world: per attribute, the share of images whose caption names exactly the true colours,
    shapes, sizes, positions and object count; per object, the mean of object_scores (every attribute of an
    object right at once, and colours bound to their shapes). {} for data without known scene contents."""
    if not split.samples or not all("objects" in s.meta for s in split.samples):
        return {}
    correct = [attribute_correct(c, s.meta["objects"]) for s, c in zip(split.samples, captions)]
    scores = {f"attr_{a}": sum(c[a] for c in correct) / len(correct) for a in ATTRIBUTES}
    per_object = [object_scores(c, s.meta["objects"]) for s, c in zip(split.samples, captions)]
    scores |= {OBJECT_KEYS[k]: sum(o[k] for o in per_object) / len(per_object) for k in OBJECT_SCORES}
    return scores


def nll_probes(model, split: SplitFeatures, batch_size: int, order: list[int]) -> dict:
    """Caption NLL/token under the true, a deranged, the mean, and no image; the gain true vs deranged."""
    mean_image = replace(split, features=split.features.float().mean(0, keepdim=True).expand_as(split.features))
    nll = {
        "nll_true": validation_loss(model, split, batch_size, None),
        "nll_shuffled": validation_loss(model, split, batch_size, None, image_order=order),
        "nll_mean_image": validation_loss(model, mean_image, batch_size, None),
        "nll_no_image": validation_loss(model, split, batch_size, None, no_image=True),
    }
    nll["visual_information_gain"] = nll["nll_shuffled"] - nll["nll_true"]
    return nll


def generation_settings(model, **overrides) -> dict:
    """The run's generate config with command-line overrides on top (None/0 = not overridden)."""
    g = model.cfg.generate
    return {
        "max_new_tokens": overrides.get("max_new_tokens") or g.max_new_tokens,
        "num_beams": overrides.get("num_beams") or g.num_beams,
        "repetition_penalty": overrides.get("repetition_penalty") or g.repetition_penalty,
    }


def evaluate_split(
    model,
    split: SplitFeatures,
    batch_size: int = 16,
    seed: int = 0,
    use_java: bool | None = None,
    reranker: Reranker | None = None,
    **generate_kwargs,
) -> dict:
    """All metrics and probes of a model on one split; generation settings default to the run's config.
    With a reranker, each caption (swapped-image ones too) is chosen among beam candidates (reranking.py), and
    the result holds every selection rule's scores on the same candidates."""
    n = len(split.samples)
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 readable images, got {n}")
    order = derangement(n, seed)
    settings = generation_settings(model, **generate_kwargs)
    if reranker is None:
        captions = generate_all(model, split.features, batch_size, "captioning", **settings)
        swapped = generate_all(model, split.features[order], batch_size, "captioning swapped images", **settings)
    else:
        n_cands = reranker.num_candidates
        candidates = generate_all(model, split.features, batch_size, "candidate captions", n_cands, **settings)
        swapped_candidates = generate_all(
            model, split.features[order], batch_size, "candidate captions, swapped images", n_cands, **settings
        )
        choices = reranker.choices(candidates, split.features)  # every rule, computed once
        captions = choices[reranker.rule]
        swapped = reranker.choose(swapped_candidates, split.features[order])
    result = score_captions(split, captions, swapped, order, use_java)
    result.update(nll_probes(model, split, batch_size, order))
    result["generation"] = settings if reranker is None else settings | reranker.settings(settings["num_beams"])
    if reranker is not None:
        result["selection"] = selection_table(choices, candidates, [s.captions for s in split.samples])
        for example, cands in zip(result["examples"], candidates):
            example["candidates"] = cands
    return result


def evaluate_retrieval(
    retriever: NearestNeighbourCaptioner, split: SplitFeatures, seed: int = 0, use_java: bool | None = None
) -> dict:
    """The caption metrics of nearest-neighbour retrieval (it has no likelihood, so no NLL probes)."""
    order = derangement(len(split.samples), seed)
    captions = retriever.caption(split.features)
    result = score_captions(split, captions, [captions[j] for j in order], order, use_java)
    result["generation"] = {"retrieval_k": retriever.k}
    return result


def choose_retrieval_k(train: SplitFeatures, val: SplitFeatures, ks=RETRIEVAL_KS) -> tuple[int, dict[int, float]]:
    """Tunes the retrieval baseline's k on the validation split (CIDEr-D, plain tokenizer): a fair baseline."""
    if len(val.samples) < 2:
        return 5, {}
    refs = {str(i): s.captions for i, s in enumerate(val.samples)}
    scores = {}
    for k in ks:
        captions = NearestNeighbourCaptioner(train, k).caption(val.features)
        cands = {str(i): c for i, c in enumerate(captions)}
        with warnings.catch_warnings():  # the plain tokenizer is chosen here (speed), not a fallback
            warnings.simplefilter("ignore")
            scores[k] = caption_metrics(refs, cands, use_java=False, meteor=False)["CIDEr-D"]
    return max(scores, key=scores.get), scores


def retrieval_baseline(own: dict[str, SplitFeatures], k: int | None) -> tuple[NearestNeighbourCaptioner, dict]:
    """The k-NN captioner over the run's training split; k tuned on its validation split unless given."""
    k_scores = {}
    if k is None:
        k, k_scores = choose_retrieval_k(own["train"], own["val"])
    return NearestNeighbourCaptioner(own["train"], k), k_scores


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per evaluated captioner, the columns of TABLE_COLUMNS."""
    optional = ATTRIBUTE_COLUMNS + RETRIEVED_TEXT_COLUMNS
    columns = TABLE_COLUMNS + [c for c in optional if any(c[1] in r for r in rows.values())]
    header = "| run | " + " | ".join(name for name, _ in columns) + " | most repeated caption (images) |"
    lines = [header, "|" + " --- |" * (len(columns) + 2)]
    for run, r in rows.items():
        cells = []
        for _, key in columns:
            value = r.get(key)
            cells.append("n/a" if value is None else f"{value:.3f}")
        cells.append(_repeated_cell(r))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _repeated_cell(r: dict, width: int = 60) -> str:
    """'"A bathroom with a sink..." (13 of 140)', pipes escaped for markdown; n/a for rows without captions."""
    if "most_repeated_count" not in r:
        return "n/a"
    text = r["most_repeated_caption"].replace("|", "\\|")
    text = text if len(text) <= width else text[: width - 3] + "..."
    return f'"{text}" ({r["most_repeated_count"]} of {r.get("images", "?")})'


def _contact_cells(rows: dict[str, dict], main: str, count: int) -> list[dict]:
    """Per image: a reference, the model's caption, its caption under a swapped image, then each baseline's."""
    cells = []
    for i, example in enumerate(rows[main]["examples"][:count]):
        lines = [
            ("reference", example["references"][0]),
            ("model", example["caption"]),
            ("model, swapped image", example["caption_with_swapped_image"]),
        ]
        lines += [(name, r["examples"][i]["caption"]) for name, r in rows.items() if name != main]
        cells.append({"image": example["image"], "lines": lines})
    return cells


@dataclass
class CaptionEval:
    """What scoring a caption run found: `record` is eval.json; `notes` say in eval.md how each row was made."""

    record: dict
    notes: list[str]


def check_caption_eval(run_dir: str | Path, rerank: str | None, num_candidates: int) -> None:
    """Settings a run cannot be scored with, refused before a model loads or a baseline trains."""
    if rerank is None:
        return
    check_rerank(rerank, num_candidates)
    if load_config(Path(run_dir) / "config.yaml").data.retrieved_captions:
        raise ValueError("--rerank is not built for runs with retrieved captions in the prompt (SmallCap)")


def evaluate_run(
    run_dir: str | Path,
    data: list[str] | None = None,
    split: str = "test",
    baselines: dict[str, Path | None] | None = None,
    retrieval_k: int | None = None,
    contact_images: int = 16,
    use_java: bool | None = None,
    out_dir: str | Path | None = None,
    rerank: str | None = None,
    num_candidates: int = 5,
    **generate_kwargs,
) -> dict:
    """Scores a run (and the baselines handed to it) on a split; writes eval.json, eval.md and contact_sheet.png
    into out_dir (default: the run dir) and returns eval.json's record. See score_run for the settings."""
    out_dir = Path(out_dir) if out_dir else Path(run_dir)
    evaluation = score_run(
        run_dir,
        data,
        split,
        baselines,
        retrieval_k,
        use_java,
        rerank,
        num_candidates,
        log_dir=out_dir,
        **generate_kwargs,
    )
    print(write_caption_eval(evaluation, out_dir, contact_images))
    return evaluation.record


def score_run(
    run_dir: str | Path,
    data: list[str] | None = None,
    split: str = "test",
    baselines: dict[str, Path | None] | None = None,
    retrieval_k: int | None = None,
    use_java: bool | None = None,
    rerank: str | None = None,
    num_candidates: int = 5,
    log_dir: str | Path | None = None,
    **generate_kwargs,
) -> CaptionEval:
    """The rows of a run and its baselines on a split, their probes and selection tables; writes nothing but the
    log of unreadable images (into log_dir).

    data: FORMAT:PATH specs to evaluate on (default: the run's own data); retrieval always searches the run's
    own training split.
    baselines: the trained baselines' finished run folders by name, as analysis.baselines.train_baselines gives
    them (None for one not trained: a note says so); with them come the retrieval row. None: the run's rows alone.
    rerank: 'mbr' or 'neighbours' (reranking.py): every trained row's captions are chosen among
    `num_candidates` beams by that rule; the neighbours are the retrieval baseline's (k tuned on val).
    """
    run_dir = Path(run_dir)
    check_caption_eval(run_dir, rerank, num_candidates)  # before anything loads
    model = load_run(run_dir)
    run_cfg = copy.deepcopy(model.cfg)
    eval_cfg = copy.deepcopy(model.cfg)
    if data:
        eval_cfg.data.datasets = list(data)
    cache = FeatureCache(cache_dir() / "features", model.vision)
    split_data = load_split_features(eval_cfg, cache, splits=(split,), log_dir=log_dir)[split]
    batch, seed = run_cfg.train.batch_size, run_cfg.train.seed
    main = f"model ({run_dir.name})"
    notes = []
    own = None  # the run's own train / val splits: the retrieval datastore
    retriever, k_scores, reranker = None, {}, None
    if rerank is not None:
        own = load_split_features(run_cfg, cache, splits=("train", "val"))  # neighbours for the rule and its table
        retriever, k_scores = retrieval_baseline(own, retrieval_k)
        reranker = Reranker(rerank, num_candidates, retriever)
        how = {
            "mbr": "CIDEr-D against the other candidates: minimum Bayes risk, the model alone",
            "neighbours": f"CIDEr-D against the captions of the k={retriever.k} nearest "
            "training images: the model's own candidates, chosen with the retrieval baseline's neighbours",
        }[rerank]
        notes.append(
            f"captions chosen among {num_candidates} beam candidates by '{rerank}' ({how}); every trained row "
            "uses the same rule"
        )
    if run_cfg.data.retrieved_captions:  # SmallCap: image and retrieved text, each swapped on its own
        from .retrieved_captions import evaluate_split_with_retrieved_captions

        own = load_split_features(run_cfg, cache, splits=("train", "val"))
        rows = evaluate_split_with_retrieved_captions(
            model, split_data, own["train"], main, batch, seed, use_java, **generate_kwargs
        )
        notes.append(
            f"retrieved captions in the prompt: the first caption of each of the {run_cfg.data.retrieved_captions} "
            "nearest training images (pooled features, cosine); the rows under the model swap the image or the "
            "retrieved captions (a fixed derangement) or drop the image"
        )
    else:
        rows = {main: evaluate_split(model, split_data, batch, seed, use_java, reranker, **generate_kwargs)}
    attention = None
    if hasattr(model.connector, "queries"):  # a Q-Former: is its attention selective?
        grid = getattr(model.vision, "grid_size", None)
        attention = attention_stats(model, split_data.features, boxes=scene_boxes(split_data.samples), grid=grid)
        notes.append(
            "Q-Former last-layer cross-attention: entropy {attn_entropy:.3f} nats (uniform {attn_entropy_uniform:.3f}), "
            "max weight {attn_max_weight:.3f}, correlation between queries' maps {attn_query_correlation:.3f}".format(
                **attention
            )
        )
        if "attn_object_mass" in attention:
            notes.append(
                "attention on the objects' grid cells {attn_object_mass:.3f} (their share of the grid "
                "{attn_object_mass_uniform:.3f})".format(**attention)
            )
        if "attn_objects_covered" in attention:
            notes.append(
                "objects that are some query's favourite, scenes with two or more: {attn_objects_covered:.3f} "
                "(all queries on one object: {attn_objects_covered_alike:.3f})".format(**attention)
            )
    del model
    gc.collect()

    if baselines is not None:
        for name, baseline_dir in baselines.items():
            if baseline_dir is None:
                notes.append(f"{BASELINE_LABELS[name]}: not trained yet (run without --no-train-baselines)")
                continue
            baseline = load_run(baseline_dir)
            rows[BASELINE_LABELS[name]] = evaluate_split(
                baseline, split_data, batch, seed, use_java, reranker, **generate_kwargs
            )
            notes.append(f"{BASELINE_LABELS[name]}: {TRAINED_BASELINES[name]} ({baseline_dir})")
            del baseline
            gc.collect()
        own = own or load_split_features(run_cfg, cache, splits=("train", "val"))
        if retriever is None:
            retriever, k_scores = retrieval_baseline(own, retrieval_k)
        label = f"retrieval k-NN (k={retriever.k})"
        rows[label] = evaluate_retrieval(retriever, split_data, seed, use_java)
        tuned = f"; k tuned on val CIDEr-D { ({k: round(v, 3) for k, v in k_scores.items()}) }" if k_scores else ""
        notes.append(
            f"{label}: consensus caption (BLEU) of the k nearest training images, pooled "
            f"{run_cfg.vision.name} features, cosine{tuned}"
        )

    first = rows[main]
    record = {
        "run": str(run_dir),
        "split": split,
        "data": eval_cfg.data.datasets,
        "images": first["images"],
        "tokenizer": first["tokenizer"],
        "generation": first["generation"],
        "rows": rows,
        "attention": attention,
    }
    return CaptionEval(record, notes)


def format_caption_eval(evaluation: CaptionEval) -> str:
    """eval.md: the table of rows, the split and settings, the notes, and the selection table when reranked."""
    record = evaluation.record
    first = next(iter(record["rows"].values()))  # the run's own row
    text = (
        format_table(record["rows"])
        + f"\n\n{record['split']} split of {record['data']}: {first['images']} images; "
        + f"tokenizer: {first['tokenizer']}"
        + ("" if first["java"] else " (no Java: plain tokenizer, METEOR skipped)")
        + f"; generation: {first['generation']}\n"
        + "".join(f"- {note}\n" for note in evaluation.notes)
    )
    if "selection" in first:
        text += "\n" + format_selection_table(first["selection"], first["generation"]["candidates"]) + "\n"
    return text


def write_caption_eval(evaluation: CaptionEval, out_dir: str | Path, contact_images: int = 16) -> str:
    """Writes eval.json, eval.md and (contact_images > 0) contact_sheet.png into out_dir; returns eval.md's text
    with the contact sheet's path after it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = evaluation.record
    text = format_caption_eval(evaluation)
    write_atomic(out_dir / "eval.json", json.dumps(record, indent=2))
    write_atomic(out_dir / "eval.md", text)
    if contact_images > 0:
        rows, run_name = record["rows"], Path(record["run"]).name
        sheet = contact_sheet(
            _contact_cells(rows, next(iter(rows)), contact_images),
            out_dir / "contact_sheet.png",
            title=f"{run_name}: {record['split']} images, reference (grey) and captions",
        )
        text += f"contact sheet: {sheet}\n"
    return text
