"""`vlmlab ablate`: a tiny two-variant, two-seed suite runs, tabulates, plots, and is skipped on a rerun."""

import csv

import pytest
import yaml

from test_train import tiny_config
from vlmlab.ablate import BUILTIN_SUITES, load_suite, run_suite
from vlmlab.config import ConfigError, save_config


def test_builtin_suites_load_and_name_the_roles():
    for name in BUILTIN_SUITES:
        suite = load_suite(name)
        assert {"qformer-16", "meanpool", "linear", "mlp", "lora-off", "frozen-qformer", "qformer-8", "qformer-32"} == set(
            suite.variants
        )
        assert suite.config("mlp", 0, suite.path).connector.type == "mlp"
        assert suite.config("lora-off", 0, suite.path).lm.lora.enabled is False


def test_a_bad_variant_is_refused_before_anything_trains(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"variants": {"ok": {}, "bad": {"connector.num_queries": 0}}}))
    with pytest.raises(ConfigError, match="variant 'bad': connector.num_queries = 0 is impossible"):
        load_suite(str(tmp_path / "s.yaml"))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"variants": {"a": {}}, "sedes": [1]}))
    with pytest.raises(ConfigError, match="unknown: \\['sedes'\\]"):
        load_suite(str(tmp_path / "t.yaml"))


def test_tiny_suite_end_to_end(tmp_path, tiny_clip_dir, tiny_gpt2_dir, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    base = tiny_config(tmp_path, tiny_clip_dir, tiny_gpt2_dir, "train.max_steps=4", "train.eval_every=2",
                       "generate.max_new_tokens=6")  # fmt: skip
    save_config(base, tmp_path / "base.yaml")
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "tiny", "base": "base.yaml", "seeds": [0, 1], "split": "val", "contact_images": 2,
        "variants": {"qformer": {}, "meanpool": {"connector.type": "meanpool", "connector.num_queries": 2}},
    }))  # fmt: skip
    out = run_suite(load_suite(str(suite_file)), tmp_path / "out")

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("meanpool", "0"), ("meanpool", "1"), ("qformer", "0"), ("qformer", "1")]
    tokens = {r["variant"]: r["visual_tokens"] for r in rows}
    assert tokens == {"qformer": "4", "meanpool": "2"}
    assert all(0 <= float(r["attr_colour"]) <= 1 for r in rows)  # synthetic world: attribute scores present
    seeds = [r["CIDEr-D"] for r in rows if r["variant"] == "qformer"]
    assert seeds[0] != seeds[1] or [r["nll_true"] for r in rows if r["variant"] == "qformer"][0] != [
        r["nll_true"] for r in rows if r["variant"] == "qformer"][1]  # the seeds are different runs  # fmt: skip
    table = (out / "results.md").read_text()
    assert "| qformer | 2 |" in table and "+-" in table and "colour correct" in table
    for name in ("bar_CIDEr_D.png", "bar_nll_true.png", "bar_attr_position.png", "val_loss.png"):
        assert (out / name).stat().st_size > 1000, name

    # a rerun trains and evaluates nothing again
    stamps = {p: p.stat().st_mtime for p in out.glob("*/seed*/checkpoint/trainable.safetensors")}
    evals = {p: p.stat().st_mtime for p in out.glob("*/seed*/eval.json")}
    run_suite(load_suite(str(suite_file)), tmp_path / "out")
    assert stamps == {p: p.stat().st_mtime for p in out.glob("*/seed*/checkpoint/trainable.safetensors")}
    assert evals == {p: p.stat().st_mtime for p in out.glob("*/seed*/eval.json")}
