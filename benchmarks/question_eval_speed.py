"""`vlmlab eval questions --task pope` on one run, with and without each photo's image tokens remembered
(VLM.remember_images): wall time, and whether the answers and yes/no margins are the same.

    OMP_NUM_THREADS=2 python benchmarks/question_eval_speed.py RUN_DIR POPE_FILE [--blind RUN_DIR] [--record NAME]

POPE asks 6 questions of each photo, and each is answered and scored with the true and the swapped photo: without
the memo every photo is read and encoded once per question, answerer and score. The two arms run one after the
other in this process (run it alone on the machine). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine_limits import hardware_line, write_record
from vlmlab.eval.question_scores import evaluate_task
from vlmlab.model.vlm import VLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("questions", help="a POPE question file (e.g. make-tasks' pope_test_*.json, concatenated)")
    parser.add_argument("--blind", help="the blind run, answered as the fourth answerer")
    parser.add_argument("--record", metavar="NAME", help="write the figures to results/NAME.json")
    parser.add_argument("--note", default="", help="how RUN_DIR and the questions were made, for the record")
    args = parser.parse_args()
    print(hardware_line(), flush=True)
    remember = VLM.remember_images
    seconds, answers = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for arm in ("each photo encoded per question", "each photo encoded once"):
            VLM.remember_images = remember if arm.endswith("once") else (lambda self: None)
            start = time.perf_counter()
            folder = Path(out) / str(len(seconds))
            evaluate_task(args.run_dir, "pope", [args.questions], blind_run=args.blind, out_dir=folder)
            seconds[arm] = time.perf_counter() - start
            answers[arm] = json.loads((folder / "eval_pope.json").read_text())["answers"]
    VLM.remember_images = remember
    before, after = answers.values()
    keys = [k for k in before[0] if k not in ("question_id", "question_type", "question")]
    same = all(a[k] == b[k] for a, b in zip(before, after) for k in keys if "margin" not in k)
    margin = max(abs(a[k] - b[k]) for a, b in zip(before, after) for k in keys if "margin" in k)
    rows = {arm: {"seconds": round(s, 1), "questions/s": round(len(before) / s, 2)} for arm, s in seconds.items()}
    for arm, row in rows.items():
        print(f"{arm}: {row['seconds']} s, {row['questions/s']} questions/s")
    print(f"answers identical: {same}; yes/no margins differ by at most {margin:.1e}")
    if args.record:
        write_record(
            args.record,
            "benchmark",
            f"POPE evaluation of {len(before)} questions with {len(keys) - sum('margin' in k for k in keys)} "
            "answerers, each photo encoded per question vs once.",
            {"POPE evaluation": rows},
            {"answers identical": int(same), "largest yes/no margin difference": float(f"{margin:.1e}")},
            notes="The margins differ because a photo encoded alone and one encoded in a batch differ by ~1e-5 "
            "(EfficientNet-Lite0 on the CPU is not batch-invariant); the answers do not. " + args.note,
        )


if __name__ == "__main__":
    main()
