"""Arm records: a suite's finished arms, recorded in small JSON files, stand in for their runs on another machine."""

import csv
import json
import shutil

import pytest
import yaml

from vlmlab.analysis import arm_records
from vlmlab.analysis.ablate import load_suite, run_suite
from vlmlab.analysis.arm_records import arm_record_path, portable_config, portable_dataset, read_arm_record
from vlmlab.config import ConfigError, apply_settings, load_config


def test_a_data_path_reads_the_same_under_two_machines_data_roots(tmp_path, monkeypatch):
    here, there = tmp_path / "here" / "data", tmp_path / "there" / "shared"
    for root in (here, there):
        (root / "coco2017-val").mkdir(parents=True)
    assert portable_dataset(f"coco:{here}/coco2017-val", str(here)) == "coco:$VLMLAB_DATA/coco2017-val"
    assert portable_dataset("coco:/elsewhere/coco2017-val", str(here)) == "coco:/elsewhere/coco2017-val"
    assert portable_dataset("synthetic", str(here)) == "synthetic"

    def config_on(root):
        monkeypatch.setenv("VLMLAB_DATA", str(root))
        return portable_config(apply_settings(load_config(None), {"data.datasets": ["coco:$VLMLAB_DATA/coco2017-val"]}))

    assert config_on(here) == config_on(there)  # the same experiment on two machines
    assert config_on(here)["data.datasets"] == ["coco:$VLMLAB_DATA/coco2017-val"]


def _rows(path):
    return sorted((r["variant"], r["seed"], r["CIDEr-D"], r["nll_true"]) for r in csv.DictReader(open(path)))


def test_a_recorded_suite_finishes_on_a_machine_without_its_runs(tiny_suite, tmp_path, monkeypatch):
    suite_file, trained = tiny_suite
    suite = load_suite(str(suite_file))
    records, out = tmp_path / "records", shutil.copytree(trained, tmp_path / "out")
    run_suite(suite, out, records=records)  # the finished arms are recorded, nothing is trained
    paths = sorted(p.relative_to(records).as_posix() for p in records.rglob("*.json"))
    assert paths == ["meanpool/seed0.json", "meanpool/seed1.json", "qformer/seed0.json", "qformer/seed1.json"]
    record = json.loads((records / "qformer" / "seed1.json").read_text())
    assert record["step"] == 4 and record["eval"]["split"] == "val" and record["val_curve"]
    assert record["model_info"]["visual_tokens"] == 4 and record["machine"] and record["commit"]
    assert record["speed"]["samples_per_s"] > 0 and record["speed"]["threads"] >= 1  # to size the next arm

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded arm was trained or evaluated again")

    monkeypatch.setattr("vlmlab.train.loop.train", no_training)
    monkeypatch.setattr("vlmlab.eval.captioning.evaluate_run", no_training)
    fresh = tmp_path / "another-machine"  # no run folders: only the records
    run_suite(suite, fresh, records=records)
    assert _rows(fresh / "results.csv") == _rows(out / "results.csv")
    assert (fresh / "results.md").read_text() == (out / "results.md").read_text()
    assert not list(fresh.glob("*/seed*"))

    # a record of another experiment is refused by name, before anything trains
    other = tmp_path / "other.yaml"
    tree = yaml.safe_load(suite_file.read_text())
    other.write_text(
        yaml.safe_dump({**tree, "base": str(suite_file.parent / tree["base"]), "overrides": {"train.lr": 0.5}})
    )
    with pytest.raises(ConfigError, match=r"/seed0.json records this arm with other settings \(train.lr"):
        run_suite(load_suite(str(other)), tmp_path / "other", records=records)
    assert not (tmp_path / "other").exists()


def test_a_table_of_unequal_seeds_trains_nothing_and_says_what_is_missing(tiny_suite, tmp_path, monkeypatch, capsys):
    suite_file, trained = tiny_suite
    suite = load_suite(str(suite_file))
    records = tmp_path / "records"
    run_suite(suite, shutil.copytree(trained, tmp_path / "out"), records=records)
    arm_record_path(records, "meanpool", 1).unlink()  # meanpool has one seed recorded, qformer two

    def no_training(*args, **kwargs):
        raise AssertionError("--table-only trained or evaluated an arm")

    monkeypatch.setattr("vlmlab.train.loop.train", no_training)
    monkeypatch.setattr("vlmlab.eval.captioning.evaluate_run", no_training)
    fresh = tmp_path / "another-machine"
    run_suite(suite, fresh, records=records, table_only=True)
    assert "not in the table (neither evaluated in" in capsys.readouterr().out
    assert [(v, s) for v, s, _, _ in _rows(fresh / "results.csv")] == [
        ("meanpool", "0"),
        ("qformer", "0"),
        ("qformer", "1"),
    ]
    table = (fresh / "results.md").read_text()
    one_seed = next(line for line in table.splitlines() if line.startswith("| meanpool | 1 |"))
    assert "+-" not in one_seed  # one seed: the mean alone, no spread claimed
    assert "| qformer | 2 |" in table and "+-" in table
    paired = table[table.index("## Paired against meanpool") :]  # the suite file's first variant
    assert "| qformer | 0 | " in paired  # seed-matched: qformer's seed 0 against meanpool's only seed
    assert not list(fresh.glob("*/seed*"))


def test_a_damaged_or_unfinished_record_is_refused(tiny_suite, tmp_path):
    suite_file, out = tiny_suite
    suite = load_suite(str(suite_file))
    records = tmp_path / "records"
    shutil.copytree(out, tmp_path / "out")
    run_suite(suite, tmp_path / "out", records=records, only=["meanpool"])
    cfg = suite.config("meanpool", 0, tmp_path / "out")
    path = arm_record_path(records, "meanpool", 0)
    assert read_arm_record(path, cfg, "val") is not None
    with pytest.raises(ConfigError, match="split: recorded 'val', the suite scores 'test'"):
        read_arm_record(path, cfg, "test")
    with pytest.raises(ConfigError, match="step: recorded 4, the arm trains to 8"):
        read_arm_record(path, apply_settings(suite.config("meanpool", 0, tmp_path), {"train.max_steps": 8}), "val")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not an arm record"):
        read_arm_record(path, cfg, "val")
    assert read_arm_record(arm_record_path(records, "qformer", 0), cfg, "val") is None  # none there
    assert arm_records.ARM_RECORD_FORMAT == json.loads(arm_record_path(records, "meanpool", 1).read_text())["format"]


def test_a_record_older_than_a_config_key_reads_that_key_at_its_default(tiny_suite, tmp_path):
    """A key added to the config after an arm was recorded did, at its default, what the code did before it
    existed: the record still stands for the arm, unless the suite now sets that key otherwise."""
    suite_file, out = tiny_suite
    suite = load_suite(str(suite_file))
    records = tmp_path / "records"
    shutil.copytree(out, tmp_path / "out")
    run_suite(suite, tmp_path / "out", records=records, only=["meanpool"])
    path = arm_record_path(records, "meanpool", 0)
    record = json.loads(path.read_text())
    del record["config"]["train.gate_lr"]  # as written before the key existed
    path.write_text(json.dumps(record))
    cfg = suite.config("meanpool", 0, tmp_path / "out")
    assert read_arm_record(path, cfg, "val") is not None
    with pytest.raises(ConfigError, match=r"train.gate_lr: recorded 0.01, now 0.5"):
        read_arm_record(path, apply_settings(cfg, {"train.gate_lr": 0.5}), "val")


def test_an_arm_is_the_same_experiment_only_in_the_precision_it_trained_in(tiny_suite, tmp_path, monkeypatch, capsys):
    """`auto` is float32 on one CPU and bf16 on another: a record is compared by the precision it used, a new arm
    in another precision than the records' is refused before it trains (unless --precision says so), and a table
    that mixes them names each arm's precision and says so."""
    suite_file, out = tiny_suite
    suite = load_suite(str(suite_file))
    records = tmp_path / "records"
    run_suite(suite, shutil.copytree(out, tmp_path / "out"), records=records)  # the tiny runs: float32
    path = arm_record_path(records, "meanpool", 0)
    cfg = suite.config("meanpool", 0, tmp_path / "out")
    assert read_arm_record(path, cfg, "val", precision_here="float32") is not None
    assert read_arm_record(path, apply_settings(cfg, {"train.mixed_precision": "auto"}), "val", None, "float32")
    with pytest.raises(
        ConfigError, match=r"train.mixed_precision: recorded 'float32', now 'bf16'.*--precision float32"
    ):
        read_arm_record(path, apply_settings(cfg, {"train.mixed_precision": "bf16"}), "val", None, "bf16")

    def no_training(cfg, **kwargs):
        raise AssertionError(f"an arm trained in {cfg.train.mixed_precision}")

    monkeypatch.setattr("vlmlab.train.loop.train", no_training)
    for seed in (0, 1):  # every meanpool arm as if trained on a CPU where `auto` meant bf16
        path = arm_record_path(records, "meanpool", seed)
        record = json.loads(path.read_text())
        record["model_info"]["precision"]["used"] = "bf16"
        path.write_text(json.dumps(record))
    arm_record_path(records, "qformer", 1).unlink()  # an arm left to train, on this float32 run's settings
    for path in records.rglob("seed*.json"):  # every record bf16: the float32 arm is refused before it trains
        record = json.loads(path.read_text())
        record["model_info"]["precision"]["used"] = "bf16"
        path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"qformer/seed0.json records .* recorded 'bf16', now 'float32'"):
        run_suite(suite, tmp_path / "fresh", records=records, only=["qformer"])
    suite.seeds = [1]  # the unrecorded arm alone: the records of other arms still say which precision
    with pytest.raises(ConfigError, match=r"trained in bf16; here train.mixed_precision='no' means float32: pass "):
        run_suite(suite, tmp_path / "fresh", records=records, only=["qformer"])
    with pytest.raises(AssertionError, match="an arm trained in bf16"):  # --precision bf16: it goes on to train
        run_suite(suite, tmp_path / "fresh", records=records, only=["qformer"], precision="bf16")
    suite.seeds = [0, 1]

    record = json.loads(arm_record_path(records, "qformer", 0).read_text())
    record["model_info"]["precision"]["used"] = "float32"
    arm_record_path(records, "qformer", 0).write_text(json.dumps(record))
    run_suite(suite, tmp_path / "table", records=records, table_only=True)  # tables take any precision
    table = (tmp_path / "table" / "results.md").read_text()
    assert "| meanpool | 2 | 38,176 | 2 | bf16 | " in table and "| qformer | 1 | 53,696 | 4 | float32 | " in table
    assert "**The arms trained in different precisions** (bf16, float32;" in table
