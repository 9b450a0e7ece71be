"""The lmms-eval plugin, run offline as users run it (`python -m lmms_eval --model vlmlab ...`), gives the same
numbers as `vlmlab eval --task` on the same questions."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")  # the `lmms` extra; CI installs it (VLMLAB_NO_SKIPS=1 fails on a skip)


def test_the_plugin_is_registered_through_the_entry_point_group():
    from lmms_eval.models import get_model

    from vlmlab.integrations.lmms_eval.model import VlmlabLMM

    assert get_model("vlmlab") is VlmlabLMM


@pytest.mark.slow
# One connector is enough: the plugin calls only the model's chat and likelihood methods, which the xattn chain
# test (tests/test_xattn.py) drives for the cross-attention connector (the xattn copy of this test cost CI 105 s).
def test_lmms_eval_offline_matches_vlmlab_eval(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from vlmlab.config import load_config
    from vlmlab.data.make_tasks import make_tasks
    from vlmlab.eval.question_scores import evaluate_task
    from vlmlab.integrations.lmms_eval.task_yamls import write_lmms_tasks
    from vlmlab.train.loop import train

    cfg = load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            f"data.datasets=[synthetic:{tmp_path / 'world'}]",
            "data.synthetic_images=60",
            f"data.tasks={tmp_path / 'tasks'}",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.eval_every=2",
            "train.save_every=2",
            "connector.num_queries=4",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    make_tasks(cfg, tmp_path / "tasks")
    run = train(cfg)
    names = write_lmms_tasks(tmp_path / "tasks", tmp_path / "lmms")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "vlmlab", "--model_args", f"run={run}",
         "--tasks", ",".join(names), "--include_path", str(tmp_path / "lmms"),
         "--output_path", str(tmp_path / "results"), "--batch_size", "1", "--log_samples"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted((tmp_path / "results").rglob("*results*.json"))
    assert files, f"no results file under {tmp_path / 'results'}: {out.stdout[-2000:]}"
    results = json.loads(files[-1].read_text())["results"]

    def lmms(task, metric):
        return next(v for k, v in results[task].items() if k.split(",")[0] == metric)

    from vlmlab.eval.captioning import evaluate_run

    captions = evaluate_run(run, contact_images=0, out_dir=tmp_path / "ours")
    ours_caption = next(iter(captions["rows"].values()))  # the model row comes first
    assert lmms("vlmlab_caption", "caption_cider_d") == pytest.approx(ours_caption["CIDEr-D"])
    assert lmms("vlmlab_caption", "caption_bleu_4") == pytest.approx(ours_caption["BLEU-4"])
    ours = {task: evaluate_task(run, task, out_dir=tmp_path / "ours")["model"] for task in ("vqa", "pope", "mmbench")}
    assert lmms("vlmlab_vqa", "vqa_accuracy") == pytest.approx(ours["vqa"]["vqa_accuracy"])
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert lmms("vlmlab_pope", f"pope_{metric}") == pytest.approx(ours["pope"][metric])
    assert lmms("vlmlab_mmbench", "mc_accuracy") == pytest.approx(ours["mmbench"]["accuracy[letter]"])
    assert lmms("vlmlab_mmbench", "mc_circular_accuracy") == pytest.approx(ours["mmbench"]["circular_accuracy[letter]"])
    # multiple choice by likelihood: lmms-eval's multiple_choice requests, answered by the plugin's loglikelihood
    likelihood = {"accuracy": "mc_likelihood_accuracy", "circular_accuracy": "mc_likelihood_circular_accuracy"}
    likelihood["accuracy[sum]"] = "mc_likelihood_sum_accuracy"
    likelihood["accuracy[mutual_info]"] = "mc_likelihood_mutual_info_accuracy"
    likelihood["circular_accuracy[mutual_info]"] = "mc_likelihood_circular_mutual_info_accuracy"
    for ours_key, metric in likelihood.items():
        assert lmms("vlmlab_mmbench_likelihood", metric) == pytest.approx(ours["mmbench"][ours_key]), metric
    # not only the same scores: the same replies, question by question (lmms-eval logs doc_id, the row of the
    # documents file, which lists the questions in vlmlab's order: random, popular, adversarial)
    logged = [
        json.loads(line)
        for f in (tmp_path / "results").rglob("*samples_vlmlab_pope*.jsonl")
        for line in f.read_text().splitlines()
    ]
    theirs = {s["doc_id"]: s["filtered_resps"] for s in logged}
    theirs = {k: v[0] if isinstance(v, list) else v for k, v in theirs.items()}
    record = json.loads((tmp_path / "ours" / "eval_pope.json").read_text())["answers"]
    assert len(theirs) == len(record) > 0
    assert [theirs[i] for i in range(len(record))] == [r["model"] for r in record]
