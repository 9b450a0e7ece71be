"""VQA accuracy as the VQA v2 / EvalAI evaluation computes it.

An answer counts as fully right when at least 3 of the 10 annotators gave it: accuracy =
min(#matching annotators / 3, 1), averaged over the 10 subsets that leave one annotator out (so that a
prediction is judged against 9 humans, as each human was). Before matching, every prediction and every
human answer goes through the EvalAI normalisation: lower case, punctuation, number words -> digits,
articles dropped, contractions restored. (The official script normalises the human answers only for
punctuation, and only when they disagree; VQA v2's answers were already normalised when released. Other
sets, such as A-OKVQA's direct answers, were not, so the same normalisation is applied to both sides here.)
"""

from __future__ import annotations

import re
from collections import defaultdict

# Words without apostrophes, as people type them, mapped to the contraction the answers use.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a full stop that is not a decimal point
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # 1,000


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # glued to a word ("yes,") it goes; between two words ("black-and-white") it becomes a space
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The EvalAI normalisation of one answer: 'Two dogs.' -> '2 dogs', 'The Cat' -> 'cat', 'dont' -> "don't"."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """min(#humans agreeing / 3, 1), averaged over the leave-one-out subsets of the human answers."""
    if not human_answers:
        raise ValueError("VQA accuracy needs the human answers (VQA v2 has 10 per question)")
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in human_answers]
    scores = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


def vqa_scores(predictions: list[str], human_answers: list[list[str]], answer_types: list[str] | None = None) -> dict:
    """Mean VQA accuracy overall and per answer type ('yes/no', 'number', 'other'), with counts."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions")
    types = answer_types or ["all"] * len(predictions)
    per_type: dict[str, list[float]] = defaultdict(list)
    overall = []
    for pred, humans, kind in zip(predictions, human_answers, types):
        acc = vqa_accuracy(pred, humans)
        overall.append(acc)
        per_type[kind].append(acc)
    out = {"vqa_accuracy": sum(overall) / max(len(overall), 1), "questions": len(overall)}
    if answer_types is not None:
        for kind, accs in sorted(per_type.items()):
            out[f"vqa_accuracy[{kind}]"] = sum(accs) / len(accs)
            out[f"questions[{kind}]"] = len(accs)
    return out


def prior_answers(question_types: list[str], human_answers: list[list[str]]) -> dict[str, str]:
    """The prior baseline: the most frequent (normalised) human answer per question type, from training data."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for kind, humans in zip(question_types, human_answers):
        for a in humans:
            counts[kind][normalize_answer(a)] += 1
    return {kind: max(c.items(), key=lambda kv: (kv[1], kv[0]))[0] for kind, c in counts.items()}
