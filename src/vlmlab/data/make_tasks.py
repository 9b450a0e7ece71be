"""`vlmlab make-tasks`: write instruction, VQA, POPE and multiple-choice files from annotations, offline.

The files are in their authors' formats, so the same readers (questions.py) read these and the real sets:

    OUT/conversations_{train,val,test}.json        LLaVA conversations (stage 2: instruct)
    OUT/vqa_conversations_{train,val}.json         single-turn short answers and lettered multiple choice (stage 3: vqa)
    OUT/vqa_{train,test}_questions.json            VQA v2 questions ...
    OUT/vqa_{train,test}_annotations.json          ... and annotations (10 answers each; train: the prior)
    OUT/pope_test_{random,popular,adversarial}.json   POPE JSON lines
    OUT/mmbench_test.tsv                           4 options, every rotation (CircularEval), image as a path
    OUT/captions_test.json                         the test images and their reference captions (lmms-eval captioning)
    OUT/tasks.json                                 what was written, from which data, and the split check

OUT is a new or empty folder: `vlmlab make-tasks` refuses one that holds anything (check_out_folder) unless
--overwrite. Each file is written whole or not at all, tasks.json last, and a rewrite removes the old tasks.json
first: a folder with a tasks.json holds one whole set of files.

With `--objects-from-captions`, training photos without boxes get the objects their captions name; with
`--presence-from-boxes` as well, those photos feed the instruct conversations only, and the stage-3 files ask
about photos with boxes alone. With `--vqa-turns K`, the stage-3 questions of one photo are asked K to a
conversation (LLaVA-1.5 packs VQAv2 so): the image tokens are paid once per K answers.
Images are split as the caption data splits them (by image); no image file is in both the training
files and the evaluation files, checked by the SHA-1 of the file bytes.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from itertools import zip_longest
from pathlib import Path

from ..config import Config, ConfigError, check_datasets, write_atomic
from .features import file_digest
from .formats import InputError
from .grounded_questions import (
    TaskQuestion,
    caption_count_questions,
    choice_conversation,
    choice_questions,
    conversation,
    image_facts,
    pope_questions,
    short_questions,
    vocabulary_of,
    vqa_conversation,
)
from .pairs import load_samples
from .questions import IMAGE_PLACEHOLDER as IMAGE


def _llava(records: list[tuple[str, list[dict]]], root: Path) -> list[dict]:
    out = []
    for i, (image, messages) in enumerate(records):
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages]
        out.append({"id": str(i), "image": str(Path(image).resolve()), "conversations": turns})
    return out


def _vqa_files(questions, out: Path, split: str) -> int:
    qs, anns = [], []
    for i, q in enumerate(questions):
        # VQA v2 names images by COCO image_id; `image` (a path) is how these files name theirs
        qs.append({"question_id": i, "image_id": i, "image": str(Path(q.image).resolve()), "question": q.question})
        anns.append(
            {
                "question_id": i,
                "answers": [{"answer": q.answer, "answer_id": k + 1} for k in range(10)],
                "multiple_choice_answer": q.answer,
                "answer_type": q.answer_type,
                "question_type": q.question_type,
            }
        )
    write_atomic(out / f"vqa_{split}_questions.json", json.dumps({"questions": qs}))
    write_atomic(out / f"vqa_{split}_annotations.json", json.dumps({"annotations": anns}))
    return len(qs)


def rotated_rows(start: int, image: str, question: str, options: list[str], right: int, category: str) -> list:
    """One TSV row per rotation of the options (A B C D, B C D A, ...), sharing a `group` for CircularEval.
    A question of fewer than four options leaves the last columns empty, as MMBench's own files do."""
    if not 2 <= len(options) <= 4:
        raise ValueError(f"{question!r}: {len(options)} options; the TSV holds 2 to 4")
    rows = []
    for k in range(len(options)):
        rotated = options[k:] + options[:k] + [""] * (4 - len(options))
        letter = "ABCD"[(right - k) % len(options)]
        rows.append([start + k, start, question, "", *rotated, letter, category, str(Path(image).resolve())])
    return rows


def boxes_presence_questions(facts, seed: int, population) -> list:
    """Presence questions on photos with boxes, negatives sampled as POPE samples them: every boxed category of
    a photo ("yes"), and as many absent ones ("no"), taken in turn from POPE's random, popular and adversarial
    (co-occurring) negatives of that photo, none twice. Balanced per photo, so the share of "yes" is 0.5."""
    per_setting = {
        setting: pope_questions(facts, setting, seed, per_image=10**6, min_categories=1, population=population)
        for setting in ("random", "popular", "adversarial")
    }
    negatives: dict[str, dict[str, list[str]]] = {}  # photo -> setting -> its negatives, in POPE's order
    positives: dict[str, list[str]] = {}
    for setting, items in per_setting.items():
        for image, text, label in items:
            if label == "no":
                negatives.setdefault(image, {}).setdefault(setting, []).append(text)
            elif text not in positives.setdefault(image, []):
                positives[image].append(text)
    out = []
    for image, yes in positives.items():
        by_setting = list(negatives.get(image, {}).values())
        turns = [n for group in zip_longest(*by_setting) for n in group if n is not None]
        no = list(dict.fromkeys(turns))[: len(yes)]
        out += [TaskQuestion(image, t, "yes", "yes/no", "is there a") for t in yes]
        out += [TaskQuestion(image, t, "no", "yes/no", "is there a") for t in no]
    return out


def grouped_turns(records: list[tuple[str, list[dict]]], turns: int, rng: random.Random) -> list:
    """Single-turn (image, [user, assistant]) records -> conversations of up to `turns` question-answer pairs
    about one photo, its questions in a random order; the <image> placeholder stays in the first turn only.

    LLaVA-1.5 trains on VQAv2 this way (one image, many questions in one conversation). On 2 CPU cores a step
    costs a fixed ~1.6 s plus ~3 ms a token (blind vs model steps of the boxes chain), and a photo's 49 visual
    tokens are most of a one-question conversation's 84: on the boxes chain's files, K = 4 gives 3.5 answers a
    conversation for 2.0x the tokens of one (171)."""
    if turns < 1:
        raise ValueError(f"vqa turns is how many questions one conversation asks: at least 1, got {turns}")
    if turns == 1:
        return records
    by_image: dict[str, list[list[dict]]] = {}
    for image, messages in records:
        if len(messages) != 2 or not messages[0]["content"].startswith(IMAGE + "\n"):
            raise ValueError(f"grouped_turns takes single-turn records that start with {IMAGE}; got {messages!r}")
        by_image.setdefault(image, []).append(messages)
    out = []
    for image, conversations in by_image.items():
        rng.shuffle(conversations)
        for start in range(0, len(conversations), turns):
            chunk = conversations[start : start + turns]
            messages = [m for c in chunk for m in c]
            for k in range(2, len(messages), 2):  # later questions: the same text without the placeholder
                messages[k] = {**messages[k], "content": messages[k]["content"][len(IMAGE) + 1 :]}
            out.append((image, messages))
    rng.shuffle(out)
    return out


def check_out_folder(out_dir: str | Path, overwrite: bool = False) -> None:
    """`vlmlab make-tasks OUT`: OUT is new or empty, or overwrite is given. A folder holding anything (the user's own
    tasks.json, a run, an earlier make-tasks output) is refused before anything is created or written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        listed = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise ConfigError(
            f"{out} is not empty (it holds {listed}); make-tasks writes into a new or empty folder: give another "
            "OUT, or --overwrite to write into this one (its files of the same names are replaced, others left)"
        )


def check_task_options(objects_from_captions: bool, min_captions: int, vqa_turns: int, counts_from_captions: bool):
    """make_tasks' options (and `vlmlab make-tasks`' flags), refused before anything is read or written."""
    if min_captions < 1:
        raise ConfigError(
            f"min_captions (--objects-min-captions) {min_captions}: at least 1 caption must name an object"
        )
    if vqa_turns < 1:
        raise ConfigError(f"vqa_turns (--vqa-turns) {vqa_turns}: a conversation asks at least 1 question")
    if counts_from_captions and not objects_from_captions:
        raise ConfigError(
            "counts_from_captions (--counts-from-captions) reads the photos objects_from_captions "
            "(--objects-from-captions) grounds: give both"
        )


def make_tasks(
    cfg: Config,
    out_dir: str | Path,
    seed: int = 0,
    objects_from_captions: bool = False,
    min_captions: int = 2,
    presence_from_boxes: bool = False,
    vqa_turns: int = 1,
    counts_from_captions: bool = False,
) -> dict:
    """Writes every task file for the config's data (cfg.data.datasets and its split) into out_dir.

    objects_from_captions: training and validation photos without boxes get the objects that at least
    `min_captions` of their captions name (data/caption_objects.py), for presence questions and conversations;
    test questions stay on annotated photos only, and POPE's popular / adversarial negatives are counted over
    annotated photos only.

    presence_from_boxes: the stage-3 files (vqa_conversations_*, vqa_train_*) ask about presence only on photos
    with boxes, POPE's way (boxes_presence_questions); photos grounded by captions only then feed the
    instruct conversations alone. A caption names the salient objects, a box any object: trained on captions'
    "yes", a model learns "salient", and POPE's positives are any boxed object.

    vqa_turns: the stage-3 conversations ask this many questions of one photo each (grouped_turns); the VQA-v2
    files and every test file are the same whatever it is.

    counts_from_captions (with objects_from_captions): the stage-3 files also ask "How many X are there?" of each
    training and validation photo whose captions agree on X's number (caption_objects.counts_from_captions: "two
    dogs" in 2 of them, or `min_captions`); every other file is the same as without it."""
    check_task_options(objects_from_captions, min_captions, vqa_turns, counts_from_captions)
    # everything is read and checked before OUT is made: a refused input leaves no folder behind
    check_datasets(cfg)
    samples = load_samples(cfg)
    facts = {
        split: image_facts(
            samples[split], objects_from_captions and split != "test", min_captions, counts_from_captions
        )
        for split in samples
    }
    vocabulary = vocabulary_of([f for fs in facts.values() for f in fs])
    if not vocabulary:
        raise InputError(f"{cfg.data.datasets}: no image has annotated objects (COCO instances or a synthetic world)")
    train_digests = {file_digest(f.sample.image_path) for split in ("train", "val") for f in facts[split]}
    leaked = [f.sample.image_path for f in facts["test"] if file_digest(f.sample.image_path) in train_digests]
    if leaked:
        raise InputError(f"{len(leaked)} evaluation images are also training images (same bytes), e.g. {leaked[0]}")
    if presence_from_boxes and not any(not f.from_captions for f in facts["train"]):
        raise InputError(f"presence_from_boxes: no training photo of {cfg.data.datasets} has boxes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    summary: dict = {"datasets": cfg.data.datasets, "split_seed": cfg.data.split_seed, "files": {}}
    (out / "tasks.json").unlink(missing_ok=True)  # written again last: until then the folder is no finished set

    def write_json(name: str, obj) -> None:
        write_atomic(out / name, json.dumps(obj))
        summary["files"][name] = len(obj)

    for split in ("train", "val", "test"):
        write_json(
            f"conversations_{split}.json",
            _llava([(f.sample.image_path, conversation(f, vocabulary, rng)) for f in facts[split]], out),
        )
    short = {split: [q for f in facts[split] for q in short_questions(f, vocabulary, rng)] for split in facts}
    stage3 = dict(facts)  # the photos the short-answer stage asks about
    # presence_from_boxes replaces the train / val questions above, but they are still drawn first: they advance
    # `rng` as the default path does, so the later draws (choices, test rows) are the same with the flag or without
    if presence_from_boxes:  # photos with boxes only; every box asked, and as many negatives POPE's way
        population = [f for split in ("train", "val") for f in facts[split] if not f.from_captions]
        for split in ("train", "val"):
            stage3[split] = [f for f in facts[split] if not f.from_captions]
            short[split] = [q for f in stage3[split] for q in short_questions(f, vocabulary, rng)]
            short[split] = [q for q in short[split] if q.question_type != "is there a"]
            short[split] += boxes_presence_questions(stage3[split], seed, population)
            rng.shuffle(short[split])
    caption_counts = {}
    for split in ("train", "val") if counts_from_captions else ():  # its own rng: the other files stay the same
        caption_counts[split] = [q for f in facts[split] for q in caption_count_questions(f)]
        short[split] = short[split] + caption_counts[split]
        random.Random(f"{seed}:{split}:caption-counts").shuffle(short[split])
    for split in ("train", "val"):  # short answers, then lettered options (LLaVA-1.5 mixes in A-OKVQA's)
        records = [(q.image, vqa_conversation(q)) for q in short[split]]
        records += [
            (f.sample.image_path, choice_conversation(*question))
            for f in stage3[split]
            for question in choice_questions(f, vocabulary, rng)
        ]
        # its own rng: `rng`'s later draws (the test rows) stay those of single-turn files
        records = grouped_turns(records, vqa_turns, random.Random(f"{seed}:{split}:vqa-turns"))
        write_json(f"vqa_conversations_{split}.json", _llava(records, out))
    for split in ("train", "test"):
        summary["files"][f"vqa_{split}_questions.json"] = _vqa_files(short[split], out, split)

    synthetic = bool(facts["test"]) and all(f.synthetic for f in facts["test"])  # one object each: min 1 category
    for setting in ("random", "popular", "adversarial"):
        everything = [f for fs in facts.values() for f in fs if not f.from_captions]
        items = pope_questions(
            facts["test"], setting, seed, min_categories=1 if synthetic else 3, population=everything
        )
        lines = [
            json.dumps({"question_id": i, "image": str(Path(img).resolve()), "text": text, "label": label})
            for i, (img, text, label) in enumerate(items)
        ]
        write_atomic(out / f"pope_test_{setting}.json", "".join(line + "\n" for line in lines))
        summary["files"][f"pope_test_{setting}.json"] = len(lines)

    rows = []
    for f in facts["test"]:
        for question, options, right in choice_questions(f, vocabulary, rng):
            category = "count" if question.startswith("How many") else "attribute" if "colour" in question else "object"
            rows += rotated_rows(len(rows), f.sample.image_path, question, options, right, category)
    table = io.StringIO(newline="")
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "group", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
    writer.writerows(rows)
    write_atomic(out / "mmbench_test.tsv", table.getvalue())
    summary["files"]["mmbench_test.tsv"] = len(rows)

    write_json(
        "captions_test.json",
        [{"image": str(Path(s.image_path).resolve()), "captions": s.captions} for s in samples["test"]],
    )

    summary["images"] = {split: len(facts[split]) for split in facts}
    summary["objects_from_captions"] = {split: sum(f.from_captions for f in facts[split]) for split in facts}
    if objects_from_captions:
        summary["objects_min_captions"] = min_captions
    if vqa_turns > 1:
        summary["vqa_turns"] = vqa_turns
    if counts_from_captions:
        summary["counts_from_captions"] = {
            split: dict(sorted(Counter(q.answer for q in qs).items(), key=lambda kv: int(kv[0])))
            for split, qs in caption_counts.items()
        }
    if presence_from_boxes:
        summary["presence_from_boxes"] = {split: len(stage3[split]) for split in ("train", "val")}
    summary["split_check"] = "no evaluation image file equals a training or validation image file (SHA-1)"
    write_atomic(out / "tasks.json", json.dumps(summary, indent=1))
    return summary
