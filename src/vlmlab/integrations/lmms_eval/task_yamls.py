"""Task YAMLs for lmms-eval over the files `vlmlab make-tasks` writes (`dataset_path: json`, offline).

`vlmlab lmms-tasks TASKS_DIR OUT` turns a make-tasks folder into OUT/vlmlab_{caption,vqa,pope,mmbench}.yaml, their
JSON-lines documents, and the task functions (vlmlab_utils.py); vlmlab_mmbench_likelihood asks the same multiple-choice
questions through lmms-eval's `multiple_choice` output type (one loglikelihood request per option), scored as
`vlmlab eval questions` scores them (per character, CircularEval, by the summed score, and by mutual information
from a second request per option with no context and no image); then

    python -m lmms_eval --model vlmlab --model_args run=RUN_DIR --tasks vlmlab_pope --include_path OUT

Data paths are written absolute: lmms-eval expands variables only in its cache directory, not in data_files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...config import write_atomic
from ...eval.question_scores import read_questions

HERE = Path(__file__).parent / "task_files"
METRICS = {  # per task kind, the metric names its yaml lists (vlmlab_utils.py reads them here)
    "caption": ["caption_cider_d", "caption_bleu_4"],
    "pope": ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio"],
    "vqa": ["vqa_accuracy"],
    "mmbench": ["mc_accuracy", "mc_circular_accuracy"],
    "mmbench_likelihood": [
        "mc_likelihood_accuracy",
        "mc_likelihood_circular_accuracy",
        "mc_likelihood_sum_accuracy",
        "mc_likelihood_mutual_info_accuracy",
        "mc_likelihood_circular_mutual_info_accuracy",
    ],
}
TEXT = {
    "caption": "caption_doc_to_text",
    "pope": "vqa_doc_to_text",
    "vqa": "vqa_doc_to_text",
    "mmbench": "mc_doc_to_text",
    "mmbench_likelihood": "mc_doc_to_text",
}
SOURCES = {
    "caption": ["captions_test.json"],
    "vqa": ["vqa_test_questions.json"],
    "pope": ["pope_test_random.json", "pope_test_popular.json", "pope_test_adversarial.json"],
    "mmbench": ["mmbench_test.tsv"],
    "mmbench_likelihood": ["mmbench_test.tsv"],
}


def _doc(kind: str, q) -> dict:
    return {
        "task_kind": kind,
        "question_id": q.question_id,
        "image": str(Path(q.image).resolve()),
        "question": q.question,
        "answer": q.answers[0] if q.answers else "",
        "answers": q.answers,
        "answer_type": q.answer_type,
        "question_type": q.question_type,
        "options": q.choices,
        "answer_index": q.answer_index,
        "hint": q.hint,
        "group": q.group or q.question_id,
    }


def _caption_doc(index: int, record: dict) -> dict:
    return {
        "task_kind": "caption",
        "question_id": index,
        "image": record["image"],
        "answer": record["captions"][0],
        "answers": record["captions"],
    }


def _yaml(kind: str, data: Path, max_new_tokens: int) -> str:
    if kind == "mmbench_likelihood":
        return _likelihood_yaml(data)
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: !function vlmlab_utils.{m}\n    higher_is_better: true\n"
        for m in METRICS[kind]
    )
    return (
        f"task: vlmlab_{kind}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function vlmlab_utils.doc_to_visual\n"
        f"doc_to_text: !function vlmlab_utils.{TEXT[kind]}\n"
        'doc_to_target: "answer"\n'
        f"generation_kwargs:\n  max_new_tokens: {max_new_tokens}\n  do_sample: false\n  num_beams: 1\n"
        "process_results: !function vlmlab_utils.keep\n"
        f"metric_list:\n{metrics}"
        "metadata:\n  - version: 0.1\n"
    )


def _likelihood_yaml(data: Path) -> str:
    """Multiple choice by likelihood through lmms-eval's requests: every option is a continuation of the question
    (target_delimiter "": the option's text is the start of the reply, as vlmlab scores it); vlmlab's own
    process_results, since lmms-eval 0.7.3's cannot read a loglikelihood result (vlmlab_utils._loss)."""
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: !function vlmlab_utils.{m}\n    higher_is_better: true\n"
        for m in METRICS["mmbench_likelihood"]
    )
    return (
        "task: vlmlab_mmbench_likelihood\n"
        "class: !function vlmlab_utils.MutualInfoChoiceTask\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_visual: !function vlmlab_utils.doc_to_visual\n"
        "doc_to_text: !function vlmlab_utils.mc_doc_to_text\n"
        "doc_to_choice: !function vlmlab_utils.mc_doc_to_choice\n"
        "doc_to_target: !function vlmlab_utils.mc_doc_to_target\n"
        'target_delimiter: ""\n'
        "process_results: !function vlmlab_utils.mc_likelihood_keep\n"
        f"metric_list:\n{metrics}"
        "metadata:\n  - version: 0.1\n"
    )


def write_lmms_tasks(tasks_dir: str | Path, out_dir: str | Path, max_new_tokens: int = 10) -> list[str]:
    tasks_dir, out = Path(tasks_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "vlmlab_utils.py", (HERE / "vlmlab_utils.py").read_bytes())
    names = []
    for kind, files in SOURCES.items():
        if kind == "caption":
            docs = [_caption_doc(i, r) for f in files for i, r in enumerate(json.loads((tasks_dir / f).read_text()))]
        else:
            docs = [_doc(kind, q) for f in files for q in read_questions(tasks_dir / f)[1]]
        data = (out / f"vlmlab_{kind}.jsonl").resolve()
        write_atomic(data, "".join(json.dumps(d) + "\n" for d in docs))
        write_atomic(out / f"vlmlab_{kind}.yaml", _yaml(kind, data, max_new_tokens))
        names.append(f"vlmlab_{kind}")
    return names
