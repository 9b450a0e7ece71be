"""`vlmlab eval captions|questions|retrieval`: each evaluator takes only its own flags and refuses the others'
by name; `vlmlab eval RUN` alone picks the evaluator a run has; scoring a run never trains one."""

import json

import pytest

from vlmlab.cli import main as cli_main
from vlmlab.config import load_config, save_config
from vlmlab.eval.caption_matching import IMAGE_PMI, SWAPPED_PMI


def refused(argv, capsys) -> str:
    """argparse's refusal: exit status 2, and its message."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def run_folder(path, *overrides):
    """A folder with a run's config.yaml and nothing else: enough for the command line to tell its kind."""
    path.mkdir()
    save_config(load_config(None, list(overrides)), path / "config.yaml")
    return path


@pytest.mark.parametrize(
    "argv, flag, home",
    [
        (["eval", "questions", "RUN", "--task", "vqa", "--beams", "3"], "--beams", "`vlmlab eval captions`"),
        (["eval", "captions", "RUN", "--task", "pope"], "--task", "`vlmlab eval questions`"),
        (
            ["eval", "captions", "RUN", "--blind", "DIR"],
            "--blind",
            "`vlmlab eval questions` or `vlmlab eval retrieval`",
        ),
        (["eval", "retrieval", "RUN", "--rerank", "mbr"], "--rerank", "`vlmlab eval captions`"),
        (["eval", "retrieval", "RUN", "--unseen-only"], "--unseen-only", "`vlmlab eval questions`"),
        (["eval", "captions", "RUN", "--limit", "3"], "--limit", "`vlmlab eval questions` or `vlmlab eval retrieval`"),
    ],
)
def test_an_evaluator_refuses_another_ones_flag_by_name(argv, flag, home, capsys):
    err = refused(argv, capsys)
    assert f"error: {flag} does not apply to `vlmlab eval {argv[1]}`; it is a flag of {home}" in err


def test_questions_need_a_task_and_baseline_switches_exclude_each_other(capsys):
    assert "--task" in refused(["eval", "questions", "RUN"], capsys)
    err = refused(["eval", "captions", "RUN", "--no-baselines", "--no-train-baselines"], capsys)
    assert "--no-train-baselines: not allowed with argument --no-baselines" in err


def test_eval_without_an_evaluator_takes_the_one_of_the_run(tmp_path, capsys):
    captioner = run_folder(tmp_path / "captioner")
    stage1 = run_folder(tmp_path / "stage1", "train.stage=qformer")
    # a caption run goes to `eval captions`, which refuses the flags of the questions evaluator ...
    assert "--task does not apply to `vlmlab eval captions`" in refused(
        ["eval", str(captioner), "--task", "pope"], capsys
    )
    # ... and a stage-1 run to `eval retrieval`, which has no decoding to set
    assert "--beams does not apply to `vlmlab eval retrieval`" in refused(["eval", str(stage1), "--beams", "3"], capsys)
    assert "invalid choice: 'val'" in refused(["eval", "--split", "val", str(captioner)], capsys)


def test_settings_that_cannot_apply_to_the_run_fail_in_one_line_before_anything_loads(tmp_path, capsys):
    captioner = run_folder(tmp_path / "captioner")
    stage1 = run_folder(tmp_path / "stage1", "train.stage=qformer")
    chat = run_folder(tmp_path / "chat", f"data.tasks={tmp_path}")
    cases = [
        (["eval", "captions", str(captioner), "--candidates", "3"], "--candidates applies to --rerank"),
        (["eval", "captions", str(stage1)], f"{stage1} is a stage-1 (qformer) run"),
        (["eval", "questions", str(stage1), "--task", "pope"], f"`vlmlab eval retrieval {stage1}`"),
        (["eval", "retrieval", str(captioner)], "no retrieval heads, only its caption likelihood"),
        (["eval", "retrieval", str(stage1), "--limit", "3"], "--images and --limit apply to --sugarcrepe"),
        (["eval", "retrieval", str(captioner), "--sugarcrepe", "DIR", "--split", "val"], "--split applies to a"),
        (["eval", "retrieval", str(captioner), "--blind", str(captioner)], "--blind applies to a caption run's"),
        (["eval", "retrieval", str(stage1), "--sugarcrepe", "DIR", "--blind", "B"], "--blind applies to a caption"),
        (["eval", "captions", str(chat), "--sugarcrepe", "DIR"], "trained on conversations (data.tasks)"),
        (["eval", "captions", str(captioner), "--sugarcrepe", str(tmp_path)], "no SugarCrepe category files"),
        (["eval", "retrieval", str(captioner), "--sugarcrepe", "DIR", "--blind", str(captioner)], "not 'none'"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlmlab eval: error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["captioner", "chat"] + ["config.yaml"] * 3 + ["stage1"]


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_an_out_dir_that_is_another_run_or_holds_earlier_results_is_refused_unless_overwrite(tmp_path, capsys):
    """`vlmlab eval RUN_O --out-dir RUN_B` would replace B's eval.json, eval.md, contact_sheet.png with O's."""
    run_o, stage1 = run_folder(tmp_path / "O"), run_folder(tmp_path / "S", "train.stage=qformer")
    run_b = run_folder(tmp_path / "B")
    for name in ("eval.json", "eval.md", "contact_sheet.png"):
        (run_b / name).write_text(f"B's {name}")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "eval_pope.json").write_text("{}")
    o, b = str(run_o), str(run_b)
    cases = [
        (["eval", "captions", o, "--out-dir", b], f"--out-dir {b} is another run's folder (config.yaml)"),
        (["eval", o, "--out-dir", b], "give another --out-dir, or --overwrite to write eval.json, eval.md, contact"),
        (["eval", "questions", o, "--task", "pope", "--out-dir", b], "another run's folder"),
        (["eval", "retrieval", str(stage1), "--out-dir", b], "another run's folder"),
        (["eval", "retrieval", o, "--sugarcrepe", "DIR", "--out-dir", b], "another run's folder"),
        (["eval", "questions", o, "--task", "pope", "--out-dir", str(earlier)], "already holds eval_pope.json;"),
        (["eval", "captions", o, "--overwrite"], "--overwrite applies to --out-dir"),
    ]
    before = _tree(tmp_path)
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("vlmlab eval: error: ") and message in err and err.count("\n") == 1, err
    assert _tree(tmp_path) == before  # no lock file, no folder, nothing replaced


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory, tiny_config):
    from vlmlab.train.loop import train

    tmp = tmp_path_factory.mktemp("cli-eval")
    cfg = tiny_config(tmp, "train.max_steps=2", "generate.max_new_tokens=4")
    return train(cfg)


@pytest.mark.slow  # trains a tiny run
def test_each_evaluator_scores_a_caption_run_and_none_trains_one(caption_run, tmp_path, capsys):
    out = tmp_path / "captions"
    argv = ["eval", "captions", str(caption_run), "--split", "val", "--no-train-baselines", "--retrieval-k", "2"]
    assert cli_main(argv + ["--contact-images", "0", "--beams", "2", "--out-dir", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["rows"]) == [f"model ({caption_run.name})", "retrieval k-NN (k=2)"]
    assert result["generation"]["num_beams"] == 2
    assert "blind LM: not trained yet" in (out / "eval.md").read_text()
    assert not (caption_run / "baselines").exists()  # the baselines were not asked to train, so none did
    assert "training into" not in capsys.readouterr().out
    assert cli_main(argv + ["--contact-images", "0", "--out-dir", str(out)]) == 2  # results there: refused ...
    assert f"--out-dir {out} already holds eval.json, eval.md;" in capsys.readouterr().err
    assert cli_main(argv + ["--contact-images", "0", "--out-dir", str(out), "--overwrite"]) == 0  # ... or replaced
    assert json.loads((out / "eval.json").read_text())["generation"]["num_beams"] != 2

    image = next(iter(caption_run.parent.joinpath("world").rglob("*.png")))
    questions = tmp_path / "pope.jsonl"
    lines = [{"question_id": i, "image": str(image), "text": f"Is there a {s}?", "label": label}
             for i, (s, label) in enumerate([("circle", "yes"), ("square", "no"), ("star", "no")])]  # fmt: skip
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["eval", "questions", str(caption_run), "--task", "pope", "--questions", str(questions), "--limit", "2"]
    assert cli_main(argv + ["--out-dir", str(tmp_path / "questions")]) == 0
    rows = json.loads((tmp_path / "questions" / "eval_pope.json").read_text())["rows"]
    assert {"model", "no image", "prior"} <= set(rows)


@pytest.mark.slow  # trains a tiny stage-1 run
def test_eval_retrieval_scores_a_stage1_run_and_sugarcrepe_by_a_caption_runs_likelihood(
    caption_run, tmp_path, tiny_config
):
    from conftest import SHARED_DATA, require
    from vlmlab.train.loop import train

    stage1 = train(tiny_config(tmp_path, "train.stage=qformer", "train.max_steps=2"))
    assert cli_main(["eval", str(stage1), "--split", "val", "--out-dir", str(tmp_path / "stage1")]) == 0  # no evaluator
    result = json.loads((tmp_path / "stage1" / "eval.json").read_text())
    assert result["split"] == "val" and "i2t_r@1" in result["retrieval"] and "itm_accuracy" in result

    sugarcrepe = require(SHARED_DATA / "questions" / "sugar-crepe")
    argv = ["eval", "retrieval", str(caption_run), "--sugarcrepe", str(sugarcrepe), "--limit", "2"]
    assert cli_main(argv + ["--out-dir", str(tmp_path / "sugarcrepe")]) == 0
    record = json.loads((tmp_path / "sugarcrepe" / "sugarcrepe.json").read_text())
    assert record["items"] == dict.fromkeys(record["items"], 2) and len(record["items"]) == 7  # none trained on
    assert set(record["rows"]) == {"model", "swapped image", "no image", IMAGE_PMI, SWAPPED_PMI}
    assert not (caption_run / "sugarcrepe.json").exists()  # --out-dir is where it goes
