"""POPE: object hallucination as yes/no questions ("Is there a {object} in the image?").

Answers are parsed to yes/no as the POPE authors' evaluation does: keep the first sentence, drop commas,
and call it "no" when the words "No", "no" or "not" occur in it, "yes" otherwise. The yes-ratio is the
share of PREDICTIONS that are yes: a model that says yes to everything scores recall 1 and yes-ratio 1,
which is what the score is there to expose. (lmms-eval 0.7.3 computes it from the labels, which is 0.5 by
construction whatever the model says; and it matches "Yes." against "yes" without parsing it.)
"""

from __future__ import annotations

from collections import defaultdict


def parse_yes_no(answer: str) -> str:
    """'Yes, there is a dog.' -> 'yes'; 'There is no dog.' -> 'no'; 'No.' -> 'no' (the POPE authors' rule)."""
    text = str(answer)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split()
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall and F1 with 'yes' as the positive class, and the yes-ratio of the predictions."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    bad = sorted({str(x) for x in labels} - {"yes", "no"})
    if bad:
        raise ValueError(f"POPE labels are 'yes' or 'no', got {bad[:5]}")
    pred = [parse_yes_no(p) for p in predictions]
    tp = sum(p == "yes" and y == "yes" for p, y in zip(pred, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(pred, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(pred, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(pred, labels))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": pred.count("yes") / n if n else 0.0,
        "questions": n,
    }


def pope_scores_by_setting(predictions: list[str], labels: list[str], settings: list[str]) -> dict[str, dict]:
    """pope_scores per sampling setting (random / popular / adversarial)."""
    groups: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for p, y, s in zip(predictions, labels, settings):
        groups[s][0].append(p)
        groups[s][1].append(y)
    return {s: pope_scores(p, y) for s, (p, y) in sorted(groups.items())}


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """P(a random positive scores above a random negative), ties half: the Mann-Whitney U over n_pos * n_neg.
    For POPE, with the log p(yes) - log p(no) margin as the score: 0.5 is no better than a coin, whatever the
    threshold; below the always-yes F1 with a good AUC is a threshold to move, with a poor one a model to fix."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        raise ValueError(f"AUC needs positives and negatives; got {len(pos)} and {len(neg)}")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
