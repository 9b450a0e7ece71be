"""`vlmlab eval questions --task vqa|pope|mmbench`: answers to questions, scored as the field scores them, beside
the controls that say whether the image mattered.

Rows of every table:
- model: the run answers with the true image;
- swapped image: the same run, each question asked about another image of the set (a fixed derangement);
- no image: the same run with no visual tokens at all;
- blind model: the same recipe trained with `connector.type: none` (when such a run is given);
- prior: no model at all: the most frequent training answer per question type (VQA), "yes" (POPE), option A
  (multiple choice).
and the share of the model's answers that change when the image is swapped.

VQA number questions are scored two ways for every row: the answer the model writes (`vqa_accuracy[number]`) and
the likeliest of 0-10 as the whole reply (`vqa_accuracy[number, by likelihood 0-10]`), a closed vocabulary per
question type: a small LM may know the count and still write something else first.

Multiple choice is scored two ways for every row (multiple_choice.py): by likelihood (each option's text as the
start of the reply; `accuracy` and `circular_accuracy` normalise per character, `[sum]` does not, `[mutual_info]`
subtracts the option's log-probability as the reply to an empty message with no image, each answerer's own LM
scoring it) and by the letter the model writes (`[letter]`, with the share of replies that name no option).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ..config import ConfigError, write_atomic
from ..data.grounded_questions import MC_SUFFIX, VQA_SUFFIX
from ..data.questions import Question, QuestionFileError, read_aokvqa, read_mmbench_tsv, read_pope, read_vqa_v2
from ..model.nll import derangement
from .multiple_choice import LIKELIHOOD_NORMS, choice_scores, extract_choice, likelihood_pick
from .pope import pope_scores, pope_scores_by_setting, roc_auc
from .vqa import normalize_answer, prior_answers, vqa_scores

TASKS = ("vqa", "pope", "mmbench")


class TooFewQuestions(ValueError):
    """Fewer than 2 questions left (e.g. every photo of a real set was in the run's training split)."""


# ---- reading the questions -----------------------------------------------------------------------
def detect_format(path: Path) -> str:
    """vqa_v2 | aokvqa | pope | mmbench, from the file itself."""
    if path.suffix == ".tsv":
        return "mmbench"
    try:
        text = path.read_text(encoding="utf-8-sig").lstrip()
    except UnicodeDecodeError as e:
        raise QuestionFileError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from e
    if not text:
        raise QuestionFileError(f"{path} is empty: no questions")
    if text.startswith("["):
        return "aokvqa"
    try:
        first = json.loads(text.splitlines()[0])
    except json.JSONDecodeError:
        first = None
    # a record on the first line is JSON lines (POPE; read_pope names a record that lacks a key); a VQA v2 file is
    # one object holding a `questions` list, on one line or many
    return "pope" if isinstance(first, dict) and "questions" not in first else "vqa_v2"


def read_questions(path: str | Path, images: str | Path | None = None) -> tuple[str, list[Question]]:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "mmbench":
        return fmt, read_mmbench_tsv(path, images)
    if fmt == "aokvqa":
        return fmt, read_aokvqa(path, images)
    if fmt == "pope":
        return fmt, read_pope(path, images)
    annotations = path.with_name(path.name.replace("_questions", "_annotations"))
    return fmt, read_vqa_v2(path, annotations if annotations.exists() and annotations != path else None, images)


def resolve_pope_image(name: str, images: Path) -> str:
    """POPE names COCO photos `COCO_val2014_<id>.jpg`; a COCO-2017 folder names the same photo `<id>.jpg`."""
    direct = images / name
    if direct.exists():
        return str(direct)
    return str(images / name.rsplit("_", 1)[-1])


def default_question_files(run_cfg, task: str) -> list[Path]:
    if not run_cfg.data.tasks:
        raise ValueError("this run has no data.tasks folder: give --questions FILE (and --images DIR)")
    return task_test_files(run_cfg.data.tasks, task)


def task_test_files(tasks_dir: str | Path, task: str) -> list[Path]:
    """The test question files `vlmlab make-tasks` wrote into tasks_dir for one task."""
    root = Path(tasks_dir)
    files = {
        "vqa": [root / "vqa_test_questions.json"],
        "pope": [root / f"pope_test_{s}.json" for s in ("random", "popular", "adversarial")],
        "mmbench": [root / "mmbench_test.tsv"],
    }[task]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"missing task files {missing}: run `vlmlab make-tasks`")
    return files


def photo_key(path) -> str:
    """One photo's name across folders: COCO by its id (`000000123.jpg`, `COCO_val2014_000000123.jpg` and
    `123.jpg` are one photo), anything else by file name."""
    name = Path(str(path)).name
    stem = Path(name).stem.rsplit("_", 1)[-1]
    return f"coco:{int(stem)}" if stem.isdigit() else name


def trained_photo_keys(cfg) -> set[str]:
    """Photos in the run's training split. make-tasks builds a run's conversations and questions from the
    same split of the same annotations, so this is every photo the run (and the stages before it) trained on."""
    from ..data.formats import SkipReport
    from ..data.pairs import load_samples

    return {photo_key(s.image_path) for s in load_samples(cfg, SkipReport())["train"]}


def drop_trained_photos(questions: list[Question], cfg) -> tuple[list[Question], int]:
    """Questions whose photo the run never trained on, and how many were dropped."""
    seen = trained_photo_keys(cfg)
    kept = [q for q in questions if q.image is None or photo_key(q.image) not in seen]
    return kept, len(questions) - len(kept)


# ---- asking ----------------------------------------------------------------------------------------
def question_text(task: str, q: Question) -> str:
    """What the user turn says after the image (the lmms-eval plugin's tasks ask exactly this too)."""
    if task == "mmbench":
        options = "\n".join(f"{'ABCDEFGH'[i]}. {c}" for i, c in enumerate(q.choices))
        hint = f"Hint: {q.hint}\n" if q.hint else ""
        return f"{hint}{q.question}\n{options}{MC_SUFFIX}"
    return f"{q.question}{VQA_SUFFIX}"


def prompt_of(task: str, q: Question) -> str:
    return "<image>\n" + question_text(task, q)


def image_of(q: Question):
    if q.image_data is not None:
        from PIL import Image

        from ..data.formats import to_rgb

        return to_rgb(Image.open(io.BytesIO(q.image_data)))
    return q.image


ANSWER_TOKENS = 10  # a short answer or an option's letter


def answer_all(model, task: str, questions: list[Question], images: list, batch_size: int = 16, desc="") -> list[str]:
    """The model's reply to every question, asked about the given image (or None: no visual tokens). A question
    too long for the LM's context is asked cut to fit (long_questions counts them): one such question of a set
    must not cost the whole evaluation, and its answer, likely wrong, still counts."""
    out = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc or "answering", unit="batch", leave=False):
        chunk = questions[start : start + batch_size]
        convs = [[{"role": "user", "content": prompt_of(task, q)}] for q in chunk]
        out += model.chat_batch(images[start : start + batch_size], convs, cut_long=True, max_new_tokens=ANSWER_TOKENS)
    return out


def long_questions(model, task: str, questions: list[Question]) -> list[str]:
    """The ids of the questions whose prompt, with the image's visual tokens and the answer's, is longer than the
    LM's context: answer_all asks them cut to fit, and the record says which."""
    budget = model.prompt_budget(image=True, new_tokens=ANSWER_TOKENS)
    if budget is None:
        return []
    return [
        q.question_id
        for q in questions
        if len(model.encode_messages([{"role": "user", "content": prompt_of(task, q)}], generation=True).ids) > budget
    ]


def option_logprobs(model, questions: list[Question], images: list, desc="") -> list[list[float]]:
    """log p(option text | image, question) at the start of the reply, for each option of each question (asked as
    answer_all asks it: the options listed with their letters); a prompt too long for the context is cut."""
    out = []
    for q, image in tqdm(list(zip(questions, images)), desc=desc or "option likelihoods", unit="q", leave=False):
        messages = [{"role": "user", "content": prompt_of("mmbench", q)}]
        out.append([lp for lp, _, _ in model.continuation_logprobs(image, messages, q.choices, cut_long=True)])
    return out


def unconditional_logprobs(model, questions: list[Question], batch_size: int = 64) -> dict[str, float]:
    """log p(text) as the reply to an empty message with no image, for every distinct option text: what the LM
    says of an option with no image and no question (lm-evaluation-harness's acc_mutual_info scores each choice
    after an empty context), the baseline that mutual-information scoring subtracts."""
    texts = sorted({c for q in questions for c in q.choices})
    empty = [{"role": "user", "content": ""}]
    out = {}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        out |= {t: lp for t, (lp, _, _) in zip(chunk, model.continuation_logprobs(None, empty, chunk))}
    return out


NUMBER_ANSWERS = [str(n) for n in range(11)]  # the closed vocabulary of number questions: 0-10, as make-tasks writes


def number_picks(model, questions: list[Question], images: list, desc="") -> dict[int, str]:
    """Number questions (answer_type 'number') answered from a closed vocabulary: the likeliest of 0-10 as the
    whole reply (its end token scored), not what greedy decoding writes. -> {question index: the number}."""
    out = {}
    asked = [(i, q, images[i]) for i, q in enumerate(questions) if q.answer_type == "number"]
    for i, q, image in tqdm(asked, desc=desc or "numbers by likelihood", unit="q", leave=False):
        messages = [{"role": "user", "content": prompt_of("vqa", q)}]
        scored = model.continuation_logprobs(image, messages, NUMBER_ANSWERS, cut_long=True, ended=True)
        out[i] = NUMBER_ANSWERS[max(range(len(scored)), key=lambda k: scored[k][0])]
    return out


def with_number_picks(answers: list[str], picks: dict[int, str]) -> list[str]:
    return [picks.get(i, a) for i, a in enumerate(answers)]


YES_NO = [["yes", "Yes"], ["no", "No"]]


def yes_no_margins(model, questions: list[Question], images: list, batch_size: int = 16, desc="") -> list[float]:
    """log p(yes) - log p(no) at the start of the reply to each POPE question (VLM.reply_logprobs)."""
    out = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc or "yes/no margins", unit="batch", leave=False):
        chunk = questions[start : start + batch_size]
        convs = [[{"role": "user", "content": prompt_of("pope", q)}] for q in chunk]
        logprobs = model.reply_logprobs(images[start : start + batch_size], convs, YES_NO, cut_long=True)
        out += (logprobs[:, 0] - logprobs[:, 1]).tolist()
    return out


# ---- scoring ----------------------------------------------------------------------------------------
def score(
    task: str,
    questions: list[Question],
    answers: list[str],
    options: list[list[float]] | None = None,
    unconditional: dict[str, float] | None = None,
) -> dict:
    """The task's scores of one answerer; multiple choice also by likelihood when its option log-probs are given
    (and by mutual information when the option texts' unconditional log-probs are given too)."""
    if task == "vqa":
        usable = [(q, a) for q, a in zip(questions, answers) if q.answers]
        if not usable:
            raise ValueError("no question has human answers to score against")
        return vqa_scores([a for _, a in usable], [q.answers for q, _ in usable], [q.answer_type for q, _ in usable])
    if task == "pope":
        labels = [q.answers[0] for q in questions]
        out = pope_scores(answers, labels)
        for setting, s in pope_scores_by_setting(answers, labels, [q.question_type for q in questions]).items():
            out |= {f"{k}[{setting}]": v for k, v in s.items() if k in ("f1", "accuracy", "yes_ratio")}
        return out
    right, groups = [q.answer_index for q in questions], [q.group or q.question_id for q in questions]
    letters = choice_scores([extract_choice(a, q.choices) for a, q in zip(answers, questions)], right, groups)
    out = {f"{k}[letter]": v for k, v in letters.items() if k in ("accuracy", "circular_accuracy", "no_option_share")}
    out |= {k: letters[k] for k in ("items", "questions") if k in letters}
    for norm in LIKELIHOOD_NORMS if options is not None else ():
        if norm == "mutual_info" and unconditional is None:
            continue
        picks = [likelihood_pick(lp, q.choices, norm, unconditional) for lp, q in zip(options, questions)]
        scores = choice_scores(picks, right, groups)
        suffix = "" if norm == LIKELIHOOD_NORMS[0] else f"[{norm}]"
        out |= {f"{k}{suffix}": scores[k] for k in ("accuracy", "circular_accuracy") if k in scores}
    return out


PRIOR_FILE = "prior_answers.json"  # an exported model's VQA prior, for machines without its training questions


def vqa_prior(train: list[Question]) -> dict:
    """The prior row's answers: the most frequent training answer per question type, and overall (for types the
    training questions never asked)."""
    overall = Counter(normalize_answer(a) for q in train for a in q.answers).most_common(1)
    return {
        "by question type": prior_answers([q.question_type for q in train], [q.answers for q in train]),
        "overall": overall[0][0] if overall else "yes",
        "training questions": len(train),
    }


def training_prior(run_dir: Path, cfg, required: bool = True) -> dict | None:
    """vqa_prior of the questions the run trained on (data.tasks/vqa_train_questions.json); in an exported model
    whose tasks folder is not on this machine, the one its export saved (PRIOR_FILE). None: the run trained on no
    questions. Refused where it did but neither is here: a prior of other answers would stand in the table as this
    run's (it did, as "yes" to every question, before this check); with required=False (an export, which carries
    the prior only where there is one) None instead."""
    if not cfg.data.tasks:
        return None
    path = Path(cfg.data.tasks) / "vqa_train_questions.json"
    if path.exists():
        return vqa_prior(read_questions(path)[1])
    if (run_dir / PRIOR_FILE).exists():
        return json.loads((run_dir / PRIOR_FILE).read_text())
    if not required:
        return None
    raise ConfigError(
        f"{run_dir} trained on the questions of {cfg.data.tasks}, and {path} is not here: the prior row (the most "
        "frequent training answer per question type) needs them. Write that folder with `vlmlab make-tasks` as "
        f"the run's chain did, or evaluate a model exported with its {PRIOR_FILE}."
    )


def prior_predictions(task: str, questions: list[Question], prior: dict | None) -> list[str]:
    if task == "pope":
        return ["yes"] * len(questions)
    if task == "mmbench":
        return ["A"] * len(questions)
    prior = prior or {"by question type": {}, "overall": "yes"}
    return [prior["by question type"].get(q.question_type, prior["overall"]) for q in questions]


def by_question_type(questions: list[Question], answers: dict[str, list[str]]) -> str:
    """VQA accuracy per question type (rows) for every answerer (columns): which questions the image answers.
    An answer-type split can hide it: 'other' mixes colour (read from the image) with position (guessed)."""
    from .vqa import vqa_accuracy

    types = sorted({q.question_type for q in questions if q.answers})
    names = list(answers)
    lines = ["| question type | questions | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for t in types:
        idx = [i for i, q in enumerate(questions) if q.question_type == t and q.answers]
        cells = [f"{sum(vqa_accuracy(answers[n][i], questions[i].answers) for i in idx) / len(idx):.3f}" for n in names]
        lines.append(f"| {t or '(none)'} | {len(idx)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NUMBERS_BY_LIKELIHOOD = "vqa_accuracy[number, by likelihood 0-10]"
MAIN_COLUMNS = {
    "vqa": [
        "vqa_accuracy",
        "vqa_accuracy[yes/no]",
        "vqa_accuracy[number]",
        NUMBERS_BY_LIKELIHOOD,
        "vqa_accuracy[other]",
    ],
    "pope": ["accuracy", "precision", "recall", "f1", "yes_ratio", "yes-no AUC"],
    "mmbench": [
        "accuracy",
        "circular_accuracy",
        "accuracy[sum]",
        "circular_accuracy[sum]",
        "accuracy[mutual_info]",
        "circular_accuracy[mutual_info]",
        "accuracy[letter]",
        "circular_accuracy[letter]",
        "no_option_share[letter]",
    ],
}


def format_task_table(task: str, rows: dict[str, dict]) -> str:
    cols = [c for c in MAIN_COLUMNS[task] if any(c in r for r in rows.values())]
    cols += sorted({k for r in rows.values() for k in r if "[" in k and k not in cols and task == "pope"})
    cols += ["answers changed by swap"] if any("answers changed by swap" in r for r in rows.values()) else []
    lines = ["| answerer | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in rows.items():
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_task(
    run_dir: str | Path,
    task: str,
    question_files: list[str | Path] | None = None,
    images: str | Path | None = None,
    blind_run: str | Path | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    unseen_only: bool = False,
) -> dict:
    """Answers, scores and controls for one task; writes OUT/eval_<task>.json and .md and returns the rows.

    unseen_only: drop questions about photos in the run's training split (real question sets such as A-OKVQA
    are asked about COCO photos a run may have captioned in training)."""
    from ..config import load_config
    from ..run import load_run
    from ..run.release import resolve_model

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")
    run_dir = resolve_model(run_dir)  # a run folder, a release, zoo:NAME or hf:ORG/NAME
    cfg = load_config(run_dir / "config.yaml")
    files = [Path(f) for f in question_files] if question_files else default_question_files(cfg, task)
    questions: list[Question] = []
    for f in files:
        fmt, qs = read_questions(f, images)
        if fmt == "pope" and images is not None:
            for q in qs:
                q.image = resolve_pope_image(Path(q.image).name, Path(images))
        if task == "mmbench" and fmt == "aokvqa":  # A-OKVQA as multiple choice: its 4 choices, each rotation
            qs = _rotated_aokvqa(qs)
        questions += qs
    dropped = 0
    if unseen_only:
        questions, dropped = drop_trained_photos(questions, cfg)
    if limit:
        questions = questions[:limit]
    if len(questions) < 2:
        left_out = f" ({dropped} about photos the run trained on left out)" if unseen_only else ""
        raise TooFewQuestions(f"{len(questions)} question(s){left_out}: the swapped-image control needs at least 2")
    prior = training_prior(run_dir, cfg) if task == "vqa" else None  # refused here, before any model loads

    true_images = [image_of(q) for q in questions]
    distinct = sorted({str(im) for im in true_images if not hasattr(im, "size")})
    order = derangement(len(questions), seed=0)
    swapped = [true_images[order[i]] for i in range(len(questions))]
    if distinct and len(distinct) > 1:  # swap to another IMAGE, not just another question about the same one
        shift = {p: distinct[(k + 1) % len(distinct)] for k, p in enumerate(distinct)}
        swapped = [shift.get(str(im), swapped[i]) for i, im in enumerate(true_images)]

    model = load_run(run_dir)
    model.remember_images()  # each photo encoded once, not once per question, answerer and margin
    cut = long_questions(model, task, questions)
    if cut:
        print(
            f"{task}: {len(cut)} of {len(questions)} questions are longer than the language model's context "
            f"({model.context_length} positions with the image and the answer): asked cut to fit, e.g. {cut[0]}"
        )
    asked = {"model": true_images, "swapped image": swapped, "no image": [None] * len(questions)}
    if len(distinct) == 1:  # e.g. the real POPE files (one photo each): a swap would ask about the same photo
        del asked["swapped image"]
        print(f"{task}: every question is about one image ({distinct[0]}): no swapped-image control")
    answers = {name: answer_all(model, task, questions, imgs, desc=name) for name, imgs in asked.items()}
    margins = {}  # POPE: the yes/no margin of every answerer that is a model, for the AUC column
    if task == "pope":
        margins = {name: yes_no_margins(model, questions, imgs, desc=name) for name, imgs in asked.items()}
    options = {}  # multiple choice: every option's log-probability, for each answerer that is a model
    unconditional = {}  # ... and each option text's with no image and no question, by that answerer's LM
    if task == "mmbench":
        options = {name: option_logprobs(model, questions, imgs, desc=name) for name, imgs in asked.items()}
        unconditional = dict.fromkeys(asked, unconditional_logprobs(model, questions))
    numbers = {}  # VQA: number questions also answered from the closed vocabulary 0-10, by likelihood
    if task == "vqa":
        numbers = {name: number_picks(model, questions, imgs, desc=name) for name, imgs in asked.items()}
    del model
    if blind_run is not None:
        blind = load_run(blind_run)
        blind.remember_images()
        answers["blind model"] = answer_all(blind, task, questions, true_images, desc="blind model")
        if task == "pope":
            margins["blind model"] = yes_no_margins(blind, questions, true_images, desc="blind model")
        if task == "mmbench":
            options["blind model"] = option_logprobs(blind, questions, true_images, desc="blind model")
            unconditional["blind model"] = unconditional_logprobs(blind, questions)
        if task == "vqa":
            numbers["blind model"] = number_picks(blind, questions, true_images, desc="blind model")
        del blind
    answers["prior"] = prior_predictions(task, questions, prior)
    if task == "mmbench":  # the prior picks option A, by letter and by likelihood alike
        options["prior"] = [[0.0] + [float("-inf")] * (len(q.choices) - 1) for q in questions]
        unconditional["prior"] = dict.fromkeys(unconditional["model"], 0.0)
    rows = {name: score(task, questions, a, options.get(name), unconditional.get(name)) for name, a in answers.items()}
    if any(numbers.values()):  # the prior's number answer is already one of the closed vocabulary
        for name, a in answers.items():
            closed = score(task, questions, with_number_picks(a, numbers.get(name, {})))
            rows[name][NUMBERS_BY_LIKELIHOOD] = closed["vqa_accuracy[number]"]
    for name, m in margins.items():
        rows[name]["yes-no AUC"] = roc_auc(m, [q.answers[0] == "yes" for q in questions])
    if "swapped image" in answers:
        changed = sum(a != b for a, b in zip(answers["model"], answers["swapped image"])) / len(questions)
        rows["model"]["answers changed by swap"] = changed
    table = format_task_table(task, rows)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task,
        "files": [str(f) for f in files],
        "questions": len(questions),
        "dropped_trained_photos": dropped if unseen_only else None,
        "questions_cut_to_fit": cut,
        "rows": rows,
        "unconditional option logprobs": {k: v for k, v in unconditional.items() if k in ("model", "blind model")},
        "answers": [
            {"question_id": q.question_id, "question_type": q.question_type, "question": q.question}
            | {k: v[i] for k, v in answers.items()}
            | {f"{k} yes-no margin": v[i] for k, v in margins.items()}
            | {f"{k} option logprobs": v[i] for k, v in options.items() if k != "prior"}
            | {f"{k} number by likelihood": v[i] for k, v in numbers.items() if i in v}
            for i, q in enumerate(questions)
        ],
    }
    write_atomic(out / f"eval_{task}.json", json.dumps(record, indent=1))
    if task == "vqa" and len({q.question_type for q in questions}) > 1:
        table += "\n\nVQA accuracy by question type:\n\n" + by_question_type(questions, answers)
    write_atomic(out / f"eval_{task}.md", table + "\n")
    print(f"{task}: {len(questions)} questions from {', '.join(str(f) for f in files)}")
    if unseen_only:
        print(f"left out {dropped} questions about photos the run trained on")
    print(table)
    return rows


def _rotated_aokvqa(questions: list[Question]) -> list[Question]:
    from dataclasses import replace

    out = []
    for q in questions:
        n = len(q.choices)
        for k in range(n):
            rotated = q.choices[k:] + q.choices[:k]
            out.append(replace(q, choices=rotated, answer_index=(q.answer_index - k) % n, group=q.question_id))
    return out
