"""Choosing a caption among the model's beam candidates by consensus (`vlmlab eval captions --rerank`).

Beam search returns the most likely caption, which is not the caption a metric of agreement with five human
references prefers: the likeliest caption is often the blandest. Two rules pick among the model's own
candidates instead, each by CIDEr-D (pycocoevalcap's, plain tokenizer) against a set of pseudo-references:

- `mbr`: minimum Bayes risk decoding (Kumar & Byrne 2004; for captions e.g. Borgeaud & Emerson 2020): the
  candidate that agrees most with the other candidates. Only the model is used.
- `neighbours`: consensus reranking (Devlin et al. 2015, "Exploring nearest neighbor approaches for image
  captioning"): the candidate that agrees most with the captions of the k nearest training images. The caption
  is still one the model wrote for this image, but the choice uses the training captions: a hybrid of the model
  and the k-NN retrieval baseline, reported as such.

`selection_table` scores every rule on the same candidates (plus the oracle that picks by the true references,
an upper bound on what any rule can get), so one generation pass compares them.
"""

from __future__ import annotations

import warnings

import torch
from pycocoevalcap.cider.cider import Cider

from .baselines import NearestNeighbourCaptioner
from .metrics import caption_metrics, plain_tokenize

RERANK_RULES = ("mbr", "neighbours")


def consensus_scores(candidates: list[list[str]], pseudo_references: list[list[str]]) -> list[list[float]]:
    """CIDEr-D of each candidate of each image against that image's pseudo-references; document frequencies
    come from all images' pseudo-references together, as CIDEr-D computes them from a test set's references."""
    if len(candidates) != len(pseudo_references):
        raise ValueError(f"{len(candidates)} candidate lists but {len(pseudo_references)} pseudo-reference lists")
    gts, res, keys = {}, {}, []
    for i, (cands, refs) in enumerate(zip(candidates, pseudo_references)):
        refs = [t for t in map(plain_tokenize, refs) if t]
        if not cands:
            raise ValueError(f"image {i} has no candidate captions")
        for j, c in enumerate(cands):
            keys.append((i, j))
            gts[f"{i}:{j}"] = refs or [""]
            res[f"{i}:{j}"] = [plain_tokenize(c)]
    _, per_item = Cider().compute_score(gts, res)
    scores = [[0.0] * len(c) for c in candidates]
    for (i, j), s in zip(keys, per_item):
        scores[i][j] = float(s)
    return scores


def pick(candidates: list[list[str]], scores: list[list[float]]) -> list[str]:
    """The highest-scoring candidate per image; ties go to the earlier (likelier) beam."""
    return [cands[max(range(len(cands)), key=lambda j: (s[j], -j))] for cands, s in zip(candidates, scores)]


def mbr_choice(candidates: list[list[str]]) -> list[str]:
    """Per image, the candidate with the highest CIDEr-D against the image's other candidates."""
    others = [[c for k, c in enumerate(cands) if k != j] for cands in candidates for j in range(len(cands))]
    flat = [[c] for cands in candidates for c in cands]
    flat_scores = iter(s for (s,) in consensus_scores(flat, others))  # each candidate alone against its siblings
    return pick(candidates, [[next(flat_scores) for _ in cands] for cands in candidates])


def neighbour_choice(candidates: list[list[str]], neighbours: list[list[str]]) -> list[str]:
    """Per image, the candidate with the highest CIDEr-D against its nearest training images' captions."""
    return pick(candidates, consensus_scores(candidates, neighbours))


def check_rerank(rule: str, num_candidates: int) -> None:
    """Bad settings fail here, before a model loads."""
    if rule not in RERANK_RULES:
        raise ValueError(f"unknown rerank rule {rule!r}: one of {', '.join(RERANK_RULES)}")
    if num_candidates < 2:
        raise ValueError(f"reranking needs at least 2 candidates, got {num_candidates}")


class Reranker:
    """Keeps, among `num_candidates` beams per image, the one `rule` prefers (RERANK_RULES)."""

    def __init__(self, rule: str, num_candidates: int = 5, retriever: NearestNeighbourCaptioner | None = None):
        check_rerank(rule, num_candidates)
        if rule == "neighbours" and retriever is None:
            raise ValueError("the 'neighbours' rule needs the training split's nearest-neighbour retriever")
        self.rule, self.num_candidates, self.retriever = rule, num_candidates, retriever

    def settings(self, num_beams: int = 1) -> dict:
        """What evaluation records: the rule, the candidates and the beam width they came from."""
        out = {"num_beams": max(num_beams, self.num_candidates), "rerank": self.rule, "candidates": self.num_candidates}
        if self.rule == "neighbours":
            out["rerank_neighbours_k"] = self.retriever.k
        return out

    def choose(self, candidates: list[list[str]], features: torch.Tensor) -> list[str]:
        """This reranker's rule: per image, the candidate it prefers."""
        if self.rule == "mbr":
            return mbr_choice(candidates)
        return neighbour_choice(candidates, self.retriever.neighbour_captions(features))

    def choices(self, candidates: list[list[str]], features: torch.Tensor) -> dict[str, list[str]]:
        """Plain beam search's top-1 and every rule this reranker can apply, on the same candidates."""
        out = {"beam top-1": [c[0] for c in candidates], "mbr": mbr_choice(candidates)}
        if self.retriever is not None:
            out["neighbours"] = neighbour_choice(candidates, self.retriever.neighbour_captions(features))
        return out


def oracle_choice(candidates: list[list[str]], references: list[list[str]]) -> list[str]:
    """The candidate closest to the true references: what a perfect reranker could reach (not a captioner)."""
    return pick(candidates, consensus_scores(candidates, references))


def selection_table(
    choices: dict[str, list[str]], candidates: list[list[str]], references: list[list[str]]
) -> dict[str, dict]:
    """Every selection rule's captions (Reranker.choices) and the oracle's, scored: CIDEr-D / BLEU-4 (plain
    tokenizer, fast) and the distinct share. 'oracle' picks by the true references."""
    chosen = choices | {"oracle (true references)": oracle_choice(candidates, references)}
    refs = {str(i): r for i, r in enumerate(references)}
    table = {}
    for name, captions in chosen.items():
        with warnings.catch_warnings():  # the plain tokenizer is chosen here (speed), not a fallback
            warnings.simplefilter("ignore")
            m = caption_metrics(refs, {str(i): c for i, c in enumerate(captions)}, use_java=False, meteor=False)
        table[name] = {
            "CIDEr-D": m["CIDEr-D"],
            "BLEU-4": m["BLEU-4"],
            "distinct_share": len(set(captions)) / len(captions),
        }
    return table


def format_selection_table(table: dict[str, dict], num_candidates: int) -> str:
    lines = [
        f"Choosing among the model's {num_candidates} beam candidates (plain tokenizer):",
        "",
        "| selection | CIDEr-D | BLEU-4 | distinct captions |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {r['CIDEr-D']:.3f} | {r['BLEU-4']:.3f} | {r['distinct_share']:.3f} |" for name, r in table.items()
    ]
    return "\n".join(lines)
