"""RESULTS.md is rendered from the committed records, and a record is written from what a run itself wrote."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import tiny_chain_file
from vlmlab.analysis.results import (
    KINDS,
    RecordError,
    add_record,
    check_page,
    load_records,
    record_from_run,
    render,
)
from vlmlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_results_page_is_what_the_records_render():
    """Fails when a record changed and RESULTS.md was not regenerated: run `vlmlab results` and commit both."""
    assert check_page(REPO / "results", REPO / "RESULTS.md") is None


def test_every_committed_record_names_its_origin_and_the_page_says_which_are_transcribed():
    records = load_records(REPO / "results")
    assert records, "results/ holds no record"
    page = (REPO / "RESULTS.md").read_text()
    for r in records:
        assert r["source"] in ("run", "transcribed") and r["kind"] in KINDS
        assert r["command"] and r["machine"] and r["date"]
        assert r["commit"] == "unknown" or len(r["commit"]) == 40
        # the index row shows the source of every record beside its command
        assert f"| [{r['name']}](#{r['name']}) | {r['kind']} | {r['source']} |" in page


def test_check_fails_with_one_line_when_a_record_changes(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(REPO / "results", results)
    page = tmp_path / "RESULTS.md"
    assert main(["results", "--results-dir", str(results), "--page", str(page)]) == 0
    assert main(["results", "--check", "--results-dir", str(results), "--page", str(page)]) == 0
    record = json.loads((results / "demo.json").read_text())
    record["values"]["shown captions changed by a swap (of 8)"] = 7
    (results / "demo.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["results", "--check", "--results-dir", str(results), "--page", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err
    page.unlink()
    assert main(["results", "--check", "--results-dir", str(results), "--page", str(page)]) == 2


def test_a_record_missing_a_field_or_with_text_for_a_figure_is_refused(tmp_path):
    good = {"name": "x", "kind": "demo", "command": "c", "commit": "unknown", "date": "d", "machine": "m"}
    (tmp_path / "x.json").write_text(json.dumps(good | {"source": "run"}))
    with pytest.raises(RecordError, match="missing"):
        load_records(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps(good | {"source": "run", "figures": {"t": {"r": {"c": "0.5"}}}}))
    with pytest.raises(RecordError, match="not numbers"):
        load_records(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps(good | {"source": "guessed", "figures": {}}))
    with pytest.raises(RecordError, match="source"):
        load_records(tmp_path)


def test_transcribed_figures_keep_the_places_they_were_given_with_and_run_figures_get_three():
    rows = {"a": {"F1": 0.5, "CIDEr-D": 1.66, "CIDEr-D std": 0.08, "n": 1600}, "b": {"F1": 0.667, "CIDEr-D": 6.2}}
    record = {"name": "r", "kind": "demo", "command": "c", "commit": "unknown", "date": "d", "machine": "m"}
    typed = render([record | {"source": "transcribed", "figures": {"t": rows}}])
    assert "| a | 0.500 | 1.66 +- 0.08 | 1,600 |" in typed and "| b | 0.667 | 6.20 | - |" in typed
    run = render([record | {"source": "run", "figures": {"t": rows}, "values": {"wall s": 61.25}}])
    assert "| a | 0.500 | 1.660 +- 0.080 | 1,600 |" in run and "| wall s | 61.2 |" in run


# ---- `vlmlab results add` on what the code writes --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_eval_json(tmp_path_factory, tiny_clip_dir, tiny_gpt2_dir):
    """eval.json of a caption run, its rows scored by evaluate_split (what `vlmlab eval` puts in "rows")."""
    from vlmlab.config import load_config
    from vlmlab.data.formats import CaptionSample
    from vlmlab.data.pairs import SplitFeatures
    from vlmlab.eval.captioning import evaluate_split
    from vlmlab.model.vlm import build_vlm

    overrides = [f"vision.name=hf:{tiny_clip_dir}", f"lm.name={tiny_gpt2_dir}", "connector.width=32",
                 "connector.heads=2", "connector.num_queries=4", "generate.max_new_tokens=4"]  # fmt: skip
    model = build_vlm(load_config(None, overrides)).eval()
    torch.manual_seed(1)
    samples = [CaptionSample(f"x:{i}", f"/img/{i}.png", [f"a {c} thing."], "test") for i, c in enumerate("abc")]
    split = SplitFeatures(samples, torch.randn(3, 16, 32).half(), [(i, s.captions[0]) for i, s in enumerate(samples)])
    row = evaluate_split(model, split, batch_size=3, use_java=False)
    run = tmp_path_factory.mktemp("run")
    result = {"run": str(run), "split": "test", "data": ["synthetic:x"], "images": row["images"],
              "tokenizer": row["tokenizer"], "generation": row["generation"], "rows": {"model (run)": row},
              "attention": None}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(result))
    return run, row


def test_add_copies_the_figures_of_an_eval_json_and_records_where_they_came_from(tiny_eval_json, tmp_path):
    run, row = tiny_eval_json
    path = add_record(run, "tiny-captions", tmp_path / "results", command="vlmlab eval captions RUN")
    record = json.loads(path.read_text())
    assert (
        record["source"] == "run" and record["kind"] == "captions" and record["command"] == "vlmlab eval captions RUN"
    )
    assert record["commit"] == "unknown"  # tmp_path is no git checkout
    assert "cores" in record["machine"] and len(record["date"]) == 10
    (table,) = record["figures"].values()
    copied = table["model (run)"]
    assert copied["CIDEr-D"] == row["CIDEr-D"] and copied["nll_true"] == row["nll_true"]  # exact, not rounded
    assert "examples" not in copied and "generation" not in copied  # figures only
    assert check_page(tmp_path / "results", tmp_path / "RESULTS.md") is not None
    page = render(load_records(tmp_path / "results"))
    assert "tiny-captions" in page and "| run |" in page
    with pytest.raises(RecordError, match="exists"):
        add_record(run, "tiny-captions", tmp_path / "results")
    with pytest.raises(RecordError, match="file name"):
        add_record(run, "../escape", tmp_path / "results")


def test_add_from_an_ablation_folder_gives_mean_and_std_over_seeds_and_the_paired_differences(tmp_path):
    from vlmlab.analysis.ablate import Suite, write_results
    from vlmlab.eval.metrics import caption_metrics

    out = tmp_path / "suite"
    suite = Suite(name="tiny", path=out / "suite.yaml", variants={"a": {}, "b": {}}, seeds=[0, 1])
    references = {
        "1.jpg": ["a red square on the left"],
        "2.jpg": ["two dogs on the grass"],
        "3.jpg": ["a blue circle at the top"],
    }
    captions = {  # b says more of what the references say than a, on each seed
        ("a", 0): ["a square", "dogs", "a circle"],
        ("a", 1): ["a red thing", "two cats", "a circle on top"],
        ("b", 0): ["a red square", "two dogs on grass", "a blue circle"],
        ("b", 1): ["a red square on the left", "two dogs", "a blue circle at the top"],
    }
    cider = {}
    for (variant, seed), written in captions.items():
        cands = dict(zip(references, written))
        cider[variant, seed] = caption_metrics(references, cands, use_java=False, meteor=False)["CIDEr-D"]
        examples = [{"image": f"/x/{k}", "references": references[k], "caption": cands[k]} for k in references]
        model = {"CIDEr-D": cider[variant, seed], "nll_true": 1.5, "tokenizer": "plain", "examples": examples}
        run = out / variant / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps({"run": str(run), "images": 3, "rows": {"model": model}}))
        (run / "model_info.json").write_text(json.dumps({"trainable_params": 10, "visual_tokens": 4}))
    with pytest.warns(UserWarning, match="Java not used"):
        write_results(suite, out, ["a", "b"])  # results.csv and paired.json, as `vlmlab ablate` writes them
    (out / "suite.json").write_text(json.dumps({"name": "tiny", "split": "test", "seeds": [0, 1]}))
    record = record_from_run(out, "tiny-suite")
    rows, paired = record["figures"].values()
    mean = {v: (cider[v, 0] + cider[v, 1]) / 2 for v in "ab"}
    assert record["kind"] == "ablation" and rows["a"]["CIDEr-D"] == pytest.approx(mean["a"])
    assert rows["b"]["CIDEr-D std"] == pytest.approx(abs(cider["b", 0] - cider["b", 1]) / 2**0.5)
    assert rows["a"]["seeds"] == 2 and list(paired) == ["b"]
    assert paired["b"]["difference"] == pytest.approx(mean["b"] - mean["a"]) and paired["b"]["seeds"] == 2
    assert paired["b"]["higher"] + paired["b"]["lower"] <= 3 and paired["b"]["standard error"] > 0


def test_a_folder_with_nothing_vlmlab_wrote_is_refused(tmp_path, capsys):
    code = main(["results", "--results-dir", str(tmp_path / "r"), "add", str(tmp_path), "--name", "x"])
    assert code == 2 and "chain.json" in capsys.readouterr().err


@pytest.mark.slow
def test_add_from_a_tiny_chain_keeps_every_table_and_its_controls(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from vlmlab.analysis.chain import load_chain, run_chain

    chain = tiny_chain_file(tmp_path, tiny_clip_dir, tiny_gpt2_dir)
    summary = run_chain(load_chain(chain), tmp_path / "out")
    path = add_record(tmp_path / "out" / "chain.json", "tiny-chain", tmp_path / "results", command="vlmlab chain tiny")
    record = json.loads(path.read_text())
    assert record["kind"] == "chain"
    pope = record["figures"]["pope"]
    assert {"model", "swapped image", "no image", "blind model", "prior"} <= set(pope)
    assert pope["model"]["f1"] == summary["tables"]["pope"]["model"]["f1"]
    assert record["figures"]["captions after each stage"]["caption"] == summary["forgetting"]["caption"]
    assert record["values"]["wall minutes"] == round(sum(summary["seconds"].values()) / 60, 1)
    # a caption stage's own eval.json, written by `vlmlab eval` inside the chain, is a captions record
    forgetting = record_from_run(tmp_path / "out" / "forgetting" / "caption", "tiny-caption-stage")
    assert forgetting["kind"] == "captions"


def test_add_from_a_question_task_keeps_the_model_beside_its_controls(tmp_path):
    from vlmlab.eval.pope import pope_scores

    labels = ["yes", "no", "yes", "no"]
    rows = {
        "model": pope_scores(["yes", "no", "no", "no"], labels) | {"answers changed by swap": 0.5},
        "swapped image": pope_scores(["no", "yes", "no", "no"], labels),
        "prior": pope_scores(["yes"] * 4, labels),
    }
    (tmp_path / "eval_pope.json").write_text(json.dumps({"task": "pope", "questions": 4, "rows": rows, "answers": []}))
    record = record_from_run(tmp_path, "tiny-pope", command="vlmlab eval questions RUN --task pope")
    assert record["kind"] == "questions" and record["figures"] == {"pope (4 questions)": rows}
    page = render([record])
    assert "| prior | 0.500 | 0.500 | 1.000 | 0.667 | 1.000 | 4 | - |" in page


def test_add_from_the_demos_captions_json_keeps_both_nlls_and_the_swap_count(tmp_path):
    run = tmp_path / "default"
    run.mkdir()
    rows = [{"image": f"{i}.png", "caption": "a", "caption_with_swapped_image": "b"} for i in range(8)]
    written = {"split": "test", "images": 30, "captions": rows, "nll_true_images": 0.5431, "nll_shuffled_images": 0.879}
    (run / "captions_test.json").write_text(json.dumps({**written, "captions_changed_by_swap": 7}))
    record = record_from_run(run, "demo", command="make demo")
    (table,) = record["figures"].values()
    assert record["kind"] == "demo" and table["model"] == {"true images": 0.5431, "shuffled images": 0.879}
    assert record["values"] == {"shown captions changed by a swap (of 8)": 7}


def test_add_from_a_sugarcrepe_json_keeps_each_row_with_its_error_the_chance_and_the_paired_gain(tmp_path):
    from vlmlab.eval.caption_matching import CHANCE, accuracy_with_error, matched, paired_gain

    logprobs = {"model": {"replace_obj": [[-1, -2], [-1, -2], [-3, -1]]}, "blind LM": {"replace_obj": [[-2, -1]] * 3}}
    written = {"rows": {}, "errors": {}, "logprobs": logprobs, "items": {"replace_obj": 3}, "chance": CHANCE}
    for row, by_category in logprobs.items():
        mean, error = accuracy_with_error(matched(*zip(*by_category["replace_obj"])))
        written["rows"][row] = {"replace_obj": mean, "all": mean}
        written["errors"][row] = {"replace_obj": error, "all": error}
    written |= {"run": "zoo:photo-captioner", "model - blind LM": paired_gain(written, "model", "blind LM")}
    (tmp_path / "sugarcrepe.json").write_text(json.dumps(written))
    record = record_from_run(tmp_path, "sugarcrepe-tiny", command="vlmlab eval retrieval RUN --sugarcrepe DIR")
    ((label, table),) = record["figures"].items()
    assert record["kind"] == "retrieval" and "3 items about unseen photos" in label
    assert table["model"]["replace_obj"] == pytest.approx(2 / 3) and table["blind LM"]["all"] == 0.0
    assert table["model - blind LM (paired)"]["all std"] == pytest.approx(1 / 3)
    assert table["chance"] == {"replace_obj": 0.5, "all": 0.5} and table["items"]["all"] == 3
    assert "| model - blind LM (paired) | 0.667 +- 0.333 | 0.667 +- 0.333 |" in render([record])


@pytest.mark.skipif(shutil.which("java") is None, reason="the committed arm records were scored with the PTB tokenizer")
def test_pair_prints_two_arm_records_paired_and_refuses_a_missing_one(tmp_path, capsys):
    """`vlmlab results pair`: the committed multi-object qformer-16 seed 0 in float32 and in bf16, image by image."""
    root = Path(__file__).resolve().parents[1] / "results" / "ablate"
    fp32, bf16 = (
        root / "multi-object" / "qformer-16" / "seed0.json",
        root / "multi-object-bf16" / "qformer-16" / "seed0.json",
    )
    assert main(["results", "pair", str(fp32), str(bf16)]) == 0
    out = capsys.readouterr().out
    assert "(float32), CIDEr-D 0.973" in out and "(bf16), CIDEr-D 2.545" in out
    assert "over 75 images: +1.572 +- 0.231" in out  # the figure docs/ablations-and-qformer.md quotes
    assert main(["results", "pair", str(fp32), str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
