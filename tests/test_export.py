"""`vlmlab export`: a finished run -> a release folder that loads anywhere, verified, with a model card whose
figures come from the run's own records; `zoo:NAME` wherever a run folder is accepted."""

import json
import shutil

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from helpers import write_vqa_training_files
from vlmlab.analysis.export import ExportError, export_run
from vlmlab.cli import main as cli_main
from vlmlab.run import load_run
from vlmlab.run.release import ReleaseError, verify_release
from vlmlab.train.loop import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config):
    """A tiny trained run with its captions_val.json (NLL true vs shuffled): what a card reads figures from."""
    tmp = tmp_path_factory.mktemp("export")
    run = train(tiny_config(tmp, "train.max_steps=4", "train.save_every=4", "generate.max_new_tokens=4"))
    assert cli_main(["captions", str(run), "--split", "val", "--num-images", "2"]) == 0
    return run


def test_an_export_loads_with_the_runs_weights_and_says_what_it_is(finished_run, tmp_path):
    out = export_run(finished_run, tmp_path / "tiny-model", command="vlmlab train tiny")
    manifest = verify_release(out)
    assert manifest["step"] == 4 and manifest["dtype"] == "float16"
    assert not (out / "checkpoint").exists() and not list(out.glob("*.pt"))  # no training state

    original, released = load_run(finished_run), load_run(out)
    for name, value in original.trainable_state_dict().items():
        torch.testing.assert_close(released.trainable_state_dict()[name], value, rtol=1e-3, atol=1e-3)

    card = ModelCard.load(out / "README.md")  # the Hugging Face parser reads its front matter
    assert card.data.library_name == "vlmlab" and card.data.eval_results
    nll = json.loads((finished_run / "captions_val.json").read_text())["nll_true_images"]
    assert any(r.metric_value == nll for r in card.data.eval_results)  # read from the record, not typed
    assert (out / "records" / "captions_val.json").exists() and "vlmlab train tiny" in card.text
    assert "shuffled images" in card.text  # the control beside the figure


def test_a_float32_export_holds_the_weights_exactly_and_records_of_one_name_keep_apart(finished_run, tmp_path):
    copies = []
    for folder in ("coco_pope_random", "coco_pope_popular"):  # as a chain writes them: eval/<set>/eval_pope.json
        (tmp_path / folder).mkdir()
        copies.append(tmp_path / folder / "captions_val.json")
        copies[-1].write_text((finished_run / "captions_val.json").read_text())
    out = export_run(finished_run, tmp_path / "exact", dtype="float32", extra_records=copies)
    manifest = verify_release(out)
    assert manifest["dtype"] == "float32" and manifest["data_root"]  # the root its data paths are read against
    assert {p.name for p in (out / "records").iterdir()} == {  # each under its folder's name
        f"{finished_run.name}-captions_val.json",
        "coco_pope_popular-captions_val.json",
        "coco_pope_random-captions_val.json",
    }
    original, released = load_run(finished_run), load_run(out)
    for name, value in original.trainable_state_dict().items():
        assert torch.equal(released.trainable_state_dict()[name], value), name
    with pytest.raises(ExportError, match="given twice"):
        export_run(finished_run, tmp_path / "twice", extra_records=[copies[0], copies[0]])


def test_a_run_trained_on_questions_exports_its_vqa_prior(finished_run, tmp_path):
    """Its training questions stay on the machine that made them; the prior row of every later evaluation needs
    them, so the export carries the prior they give (listed in the manifest, checked on loading)."""
    from vlmlab.config import load_config, save_config
    from vlmlab.eval.question_scores import PRIOR_FILE, training_prior

    run, tasks = tmp_path / "run", tmp_path / "tasks"
    shutil.copytree(finished_run, run)
    tasks.mkdir()
    write_vqa_training_files(tasks, [("1", "how many", ["3"] * 10), ("2", "is there a", ["yes"] * 10)])
    save_config(load_config(run / "config.yaml", [f"data.tasks={tasks}"]), run / "config.yaml")
    out = export_run(run, tmp_path / "asked")
    assert PRIOR_FILE in verify_release(out)["files"]
    shutil.rmtree(tasks)  # elsewhere: the release alone gives the prior
    prior = training_prior(out, load_config(out / "config.yaml"))
    assert prior["by question type"] == {"how many": "3", "is there a": "yes"}
    assert PRIOR_FILE not in verify_release(export_run(finished_run, tmp_path / "captions"))["files"]


def test_an_unfinished_run_or_a_taken_folder_is_not_exported(finished_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for item in finished_run.iterdir():
        target = unfinished / item.name
        target.symlink_to(item, target_is_directory=item.is_dir())
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["train"]["max_steps"] = 8
    (unfinished / "config.yaml").unlink()
    (unfinished / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ExportError, match="step 4 of 8"):
        export_run(unfinished, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_run(finished_run, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_changed_or_unlisted_file_is_refused_on_loading(finished_run, tmp_path):
    out = export_run(finished_run, tmp_path / "m")
    weights = out / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="SHA-256 does not match"):
        load_run(out)
    out = export_run(finished_run, tmp_path / "m", overwrite=True)
    (out / "extra.safetensors").write_bytes(b"")
    with pytest.raises(ReleaseError, match="does not list"):
        load_run(out)


def test_zoo_names_work_where_a_run_folder_does(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMLAB_ZOO", str(tmp_path / "zoo"))
    export_run(finished_run, tmp_path / "zoo" / "tiny")
    image = sorted((finished_run.parent / "world" / "images").glob("*.png"))[0]
    assert cli_main(["caption", "zoo:tiny", str(image)]) == 0
    assert capsys.readouterr().out.startswith(str(image))
    assert cli_main(["zoo"]) == 0 and "zoo:tiny" in capsys.readouterr().out
    assert cli_main(["caption", "zoo:nope", str(image)]) == 2
    err = capsys.readouterr().err
    assert "zoo:nope: no such model in the zoo" in err and "it has: tiny" in err
    # an exported model is kept as released: a command that writes into its folder needs --out-dir
    assert cli_main(["eval", "captions", "zoo:tiny", "--no-train-baselines"]) == 2
    assert "exported model" in capsys.readouterr().err
    assert not (tmp_path / "zoo" / "tiny" / "eval.json").exists()


def test_a_hub_model_not_in_the_cache_is_refused_offline_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert cli_main(["caption", "hf:vlmlab/no-such-model", str(image)]) == 2
    assert "vlmlab caption: error:" in capsys.readouterr().err


def test_serve_without_a_run_serves_the_zoos_chat_model_first(finished_run, tmp_path, monkeypatch):
    from vlmlab.cli import served_by_default

    monkeypatch.setenv("VLMLAB_ZOO", str(tmp_path / "zoo"))
    export_run(finished_run, tmp_path / "zoo" / "demo")
    assert served_by_default() == tmp_path / "zoo" / "demo"  # no training first
    export_run(finished_run, tmp_path / "zoo" / "photo-chat")
    assert served_by_default() == tmp_path / "zoo" / "photo-chat"


def test_a_blind_twins_card_takes_its_own_row_of_the_chain_tables():
    from vlmlab.analysis.export import model_index

    tables = [("chain.json", "chain", {"pope": {"model": {"f1": 0.74}, "blind model": {"f1": 0.66}}}, {}, "chain")]
    assert model_index("blind", tables, "blind model")[0]["results"][0]["metrics"][0]["value"] == 0.66
    assert model_index("model", tables)[0]["results"][0]["metrics"][0]["value"] == 0.74
    assert model_index("other", tables, "no such row") == []
