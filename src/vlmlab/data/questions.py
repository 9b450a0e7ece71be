"""Readers for question and conversation sets in their authors' formats, into two plain records.

- LLaVA conversations JSON: `[{id, image?, conversations: [{from: human|gpt, value}]}]` -> `Conversation`
  (records without an image are allowed: text-only turns).
- VQA v2: a questions file (`{questions: [{question_id, image_id, question}]}`) and an annotations file
  (`{annotations: [{question_id, answers: [{answer}] x10, answer_type, question_type, multiple_choice_answer}]}`).
- A-OKVQA: `[{question_id, image_id, question, choices, correct_choice_idx, direct_answers}]`: both a VQA item
  (from its 10 direct answers) and a multiple-choice item.
- POPE: JSON lines `{question_id, image, text, label}`.
- MMBench: TSV with `index, question, hint, A, B, C, D, answer, category` and `image` (base64 or a path).

Every error names the file and the record; nothing is dropped silently.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .formats import InputError

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class QuestionFileError(InputError):
    """A question or conversation file that cannot be read as its format says: names the file and record."""


@dataclass
class Conversation:
    id: str
    image: str | None  # a path (resolved against the image folder) or None for text-only
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str}], `<image>` where the image goes


@dataclass
class Question:
    question_id: str
    image: str | None  # a path, or None when `image_data` holds the picture (MMBench base64)
    question: str
    answers: list[str] = field(default_factory=list)  # human answers (VQA: 10), or [label] (POPE)
    answer_type: str = ""  # VQA: yes/no | number | other
    question_type: str = ""  # VQA: "how many", ...; POPE: its sampling setting
    choices: list[str] = field(default_factory=list)  # multiple choice
    answer_index: int | None = None
    hint: str = ""
    category: str = ""
    image_data: bytes | None = None
    group: str = ""  # multiple choice: the question all rotations of it share (CircularEval)


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuestionFileError(f"{path}: cannot be read as JSON ({e})") from e


def _image_path(image_root: Path | None, name) -> str | None:
    if name in (None, ""):
        return None
    return str(Path(image_root) / str(name)) if image_root is not None else str(name)


def read_llava_conversations(path: str | Path, image_root: str | Path | None = None) -> list[Conversation]:
    records = _load_json(Path(path))
    if not isinstance(records, list):
        raise QuestionFileError(f"{path}: a LLaVA conversation file is a JSON list of records")
    out = []
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list) or not r["conversations"]:
            raise QuestionFileError(f"{where}: needs a non-empty 'conversations' list")
        messages = []
        for j, turn in enumerate(r["conversations"]):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise QuestionFileError(f"{where}, turn {j}: expected {{from: human|gpt, value: text}}, got {turn!r}")
            messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
        if messages[0]["role"] != "user":
            raise QuestionFileError(f"{where}: the first turn must be the human's")
        image = _image_path(image_root, r.get("image"))
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if image is None and placeholders:
            raise QuestionFileError(f"{where}: has an {IMAGE_PLACEHOLDER} placeholder but no 'image'")
        if placeholders > 1:
            raise QuestionFileError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders; one image per record")
        out.append(Conversation(str(r.get("id", i)), image, messages))
    return out


def coco_image_name(image_id) -> str:
    return f"{int(image_id):012d}.jpg"


def read_vqa_v2(questions_path: str | Path, annotations_path: str | Path | None, image_root=None) -> list[Question]:
    """VQA v2 questions (+ annotations when given: test sets have none). Images: COCO file names by image_id."""
    qs = _load_json(Path(questions_path))
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise QuestionFileError(f"{questions_path}: a VQA v2 questions file has a 'questions' list")
    annotations = {}
    if annotations_path is not None:
        an = _load_json(Path(annotations_path))
        if not isinstance(an, dict) or not isinstance(an.get("annotations"), list):
            raise QuestionFileError(f"{annotations_path}: a VQA v2 annotations file has an 'annotations' list")
        for i, a in enumerate(an["annotations"]):
            try:
                annotations[a["question_id"]] = a
                [x["answer"] for x in a["answers"]]
            except (KeyError, TypeError) as e:
                raise QuestionFileError(f"{annotations_path}: annotation {i} lacks {e}") from e
    out = []
    for i, q in enumerate(qs["questions"]):
        try:
            qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        except (KeyError, TypeError) as e:
            raise QuestionFileError(f"{questions_path}: question {i} lacks {e}") from e
        a = annotations.get(qid)
        if annotations_path is not None and a is None:
            raise QuestionFileError(f"{annotations_path}: no annotation for question_id {qid}")
        out.append(
            Question(
                str(qid),
                _image_path(image_root, q["image"] if q.get("image") else coco_image_name(image_id)),
                text,
                answers=[x["answer"] for x in a["answers"]] if a else [],
                answer_type=a.get("answer_type", "") if a else "",
                question_type=a.get("question_type", "") if a else "",
            )
        )
    return out


def read_aokvqa(path: str | Path, image_root=None) -> list[Question]:
    records = _load_json(Path(path))
    if not isinstance(records, list):
        raise QuestionFileError(f"{path}: an A-OKVQA file is a JSON list")
    out = []
    for i, r in enumerate(records):
        try:
            choices, idx = list(r["choices"]), r.get("correct_choice_idx")
            out.append(
                Question(
                    str(r["question_id"]),
                    _image_path(image_root, coco_image_name(r["image_id"])),
                    r["question"],
                    answers=list(r.get("direct_answers") or []),
                    answer_type="other",
                    question_type="aokvqa",
                    choices=choices,
                    answer_index=None if idx is None else int(idx),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise QuestionFileError(f"{path}: record {i} ({r.get('question_id', '?')}) lacks or mangles {e}") from e
        if idx is not None and not 0 <= int(idx) < len(choices):
            raise QuestionFileError(f"{path}: record {i}: correct_choice_idx {idx} outside its {len(choices)} choices")
    return out


def read_pope(path: str | Path, image_root=None, setting: str | None = None) -> list[Question]:
    """POPE JSON lines; `setting` (random / popular / adversarial) defaults to the file name's last word."""
    path = Path(path)
    setting = setting or path.stem.split("_")[-1]
    out = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QuestionFileError(f"{path}: unreadable ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionFileError(f"{path}: line {n} is not a POPE record ({e})") from e
        if not isinstance(r, dict):
            raise QuestionFileError(f"{path}: line {n} is not a POPE record (a {type(r).__name__}, not an object)")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in r]
        if missing:
            raise QuestionFileError(f"{path}: line {n} lacks {', '.join(map(repr, missing))}")
        label = str(r["label"]).strip().lower()
        q = Question(str(r["question_id"]), _image_path(image_root, r["image"]), str(r["text"]), [label])
        if label not in ("yes", "no"):
            raise QuestionFileError(f"{path}: line {n}: label {r['label']!r} is not yes/no")
        q.question_type, q.answer_type = setting, "yes/no"
        out.append(q)
    return out


def read_mmbench_tsv(path: str | Path, image_root=None) -> list[Question]:
    """MMBench TSV; `image` is base64 (MMBench's own files) or a path relative to `image_root` / the TSV."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")), delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise QuestionFileError(f"{path}: unreadable as TSV ({e})") from e
    out = []
    for n, r in enumerate(rows, 2):
        missing = [k for k in ("index", "question", "A", "B", "image") if not (r.get(k) or "").strip()]
        if missing:
            raise QuestionFileError(f"{path}: row {n} lacks {missing}")
        choices = [r[k] for k in "ABCDEFGH" if (r.get(k) or "").strip()]
        answer = (r.get("answer") or "").strip()
        if answer and answer not in "ABCDEFGH"[: len(choices)]:
            raise QuestionFileError(f"{path}: row {n}: answer {answer!r} is not one of its option letters")
        image, data = r["image"].strip(), None
        if not (root / image).is_file():
            try:
                data = base64.b64decode(image, validate=True)
            except ValueError as e:
                raise QuestionFileError(f"{path}: row {n}: image is neither a file under {root} nor base64") from e
            try:  # the header only: a picture that is no image is named here, not mid-evaluation
                Image.open(io.BytesIO(data)).close()
            except (OSError, Image.DecompressionBombError) as e:
                raise QuestionFileError(f"{path}: row {n}: image is base64 but not of an image ({e})") from e
        hint = (r.get("hint") or "").strip()
        out.append(
            Question(
                str(r["index"]),
                None if data is not None else str(root / image),
                r["question"],
                choices=choices,
                answer_index="ABCDEFGH".index(answer) if answer else None,
                hint="" if hint.lower() == "nan" else hint,
                category=r.get("category", ""),
                image_data=data,
                group=str(r.get("group") or r["index"]),
            )
        )
    return out
