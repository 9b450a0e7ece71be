"""Multiple-choice scoring, MMBench style: which option did a free-text answer pick, and CircularEval.

The option is read from the answer statically (no judge model): first an option letter the answer
clearly gives ("B", "(B)", "B.", "Answer: B", "the answer is B"), then, failing that, the one option
whose text the answer contains. An answer that names no option, or several, picks none and counts as
wrong. (lmms-eval 0.7.3's mmbench_en_dev asks a web judge model when this fails and, offline, falls back
to a random letter: a score that changes from run to run.)

CircularEval: each question is asked once per rotation of its options (A B C D, B C D A, ...); it is right
only if every rotation is answered right, which a model that always says "A" cannot pass by luck.

By likelihood (lm-evaluation-harness's `multiple_choice` output type, lmms-eval's `loglikelihood` requests):
each option's text is scored as the start of the model's reply to the question (VLM.continuation_logprobs) and
the likeliest is its pick, so a small LM that cannot keep to "answer with the letter" still says which option it
finds likelier. Three scores of an option: its log-probability summed over its tokens ("sum"), which favours short
options; that sum divided by the option's length in characters ("char", lm-evaluation-harness's acc_norm); and
that sum minus the log-probability of the same text as the reply to an empty message with no image
("mutual_info", lm-evaluation-harness's acc_mutual_info, which scores each choice after an empty context): how
much the image and the question raise the option over what the LM says anyway, so that a common word ("dog")
does not win by being common.
"""

from __future__ import annotations

import re
from collections import defaultdict

LETTERS = "ABCDEFGH"


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z ]+", " ", str(text).lower()).split())


def extract_choice(answer: str, options: list[str]) -> int | None:
    """Index of the option the answer picks, or None when it picks none or several."""
    letters = LETTERS[: len(options)]
    text = str(answer).strip()
    patterns = [
        rf"^\(?([{letters}])\)?(?:[.:)\s]|$)",  # "B", "B.", "(B) cat", "B: cat"
        rf"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([{letters}])\)?(?![a-z])",  # "Answer: B", "the answer is (B)"
    ]
    for pattern in patterns:
        m = re.search(pattern, text, flags=re.IGNORECASE if pattern is patterns[1] else 0)
        if m:
            letter = m.group(1).upper()
            # "A dog." starts with the article, not option A: a letter followed by a lower-case word is prose
            if pattern is patterns[0] and letter == "A" and re.match(r"^A\s+[a-z]", text):
                continue
            return letters.index(letter)
    said = _norm(text)
    hits = [
        i for i, option in enumerate(options) if _norm(option) and re.search(rf"\b{re.escape(_norm(option))}\b", said)
    ]
    if len(hits) > 1:  # "red" inside "dark red": keep the longest option text the answer contains
        longest = max(len(_norm(options[i])) for i in hits)
        hits = [i for i in hits if len(_norm(options[i])) == longest]
    return hits[0] if len(hits) == 1 else None


def rotations(options: list[str], answer: int) -> list[tuple[list[str], int]]:
    """Every circular shift of the options, with where the right answer lands in each."""
    n = len(options)
    return [(options[k:] + options[:k], (answer - k) % n) for k in range(n)]


LIKELIHOOD_NORMS = ("char", "sum", "mutual_info")  # the first is the default (question_scores says why)


def likelihood_pick(
    option_logprobs: list[float], options: list[str], norm: str, unconditional: dict[str, float] | None = None
) -> int:
    """The option whose score is highest: its log-probability ("sum"), that per character ("char"), or that less
    the option text's unconditional log-probability ("mutual_info": `unconditional` maps each text to it)."""
    if norm not in LIKELIHOOD_NORMS:
        raise ValueError(f"norm {norm!r}: one of {LIKELIHOOD_NORMS}")
    if norm == "mutual_info" and unconditional is None:
        raise ValueError("mutual_info needs each option's unconditional log-probability")
    if norm == "char":
        values = [lp / max(len(o), 1) for lp, o in zip(option_logprobs, options)]
    elif norm == "mutual_info":
        values = [lp - unconditional[o] for lp, o in zip(option_logprobs, options)]
    else:
        values = list(option_logprobs)
    return max(range(len(values)), key=values.__getitem__)


def choice_scores(predictions: list[int | None], answers: list[int], question_ids: list | None = None) -> dict:
    """Plain accuracy over all asked items, and CircularEval accuracy when items share a question id."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    right = [p == a for p, a in zip(predictions, answers)]
    out = {
        "accuracy": sum(right) / max(len(right), 1),
        "no_option_share": sum(p is None for p in predictions) / max(len(predictions), 1),
        "items": len(right),
    }
    if question_ids is not None:
        per_question: dict = defaultdict(list)
        for qid, ok in zip(question_ids, right):
            per_question[qid].append(ok)
        out["circular_accuracy"] = sum(all(v) for v in per_question.values()) / max(len(per_question), 1)
        out["questions"] = len(per_question)
    return out
