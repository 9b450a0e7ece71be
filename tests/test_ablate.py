"""`vlmlab ablate`: a tiny two-variant, two-seed suite runs, tabulates, plots, and is skipped on a rerun."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vlmlab.analysis.ablate import (
    arm_results,
    load_suite,
    pair_arm_records,
    paired_rows,
    paired_table,
    per_image_cider,
    run_suite,
)
from vlmlab.config import ConfigError


def test_the_roles_recipe_loads_and_names_the_roles():
    for name in ["roles", "suite-roles", "roles.yaml"]:  # a recipe is found by its name, prefixed or not
        suite = load_suite(name)
        assert {
            "qformer-16",
            "meanpool",
            "linear",
            "mlp",
            "lora-off",
            "frozen-qformer",
            "qformer-8",
            "qformer-32",
        } == set(suite.variants)
        assert suite.config("mlp", 0, suite.path).connector.type == "mlp"
        assert suite.config("lora-off", 0, suite.path).lm.lora.enabled is False


def test_a_bad_variant_is_refused_before_anything_trains(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"variants": {"ok": {}, "bad": {"connector.num_queries": 0}}}))
    with pytest.raises(ConfigError, match="variant 'bad': connector.num_queries = 0 is impossible"):
        load_suite(str(tmp_path / "s.yaml"))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"variants": {"a": {}}, "sedes": [1]}))
    with pytest.raises(ConfigError, match="unknown: \\['sedes'\\]"):
        load_suite(str(tmp_path / "t.yaml"))


@pytest.mark.slow
def test_tiny_suite_end_to_end(tiny_suite):
    suite_file, out = tiny_suite
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("meanpool", "0"),
        ("meanpool", "1"),
        ("qformer", "0"),
        ("qformer", "1"),
    ]
    tokens = {r["variant"]: r["visual_tokens"] for r in rows}
    assert tokens == {"qformer": "4", "meanpool": "2"}
    assert all(0 <= float(r["attr_colour"]) <= 1 for r in rows)  # synthetic world: attribute scores present
    first, second = [r for r in rows if r["variant"] == "qformer"]
    assert (first["CIDEr-D"], first["nll_true"]) != (second["CIDEr-D"], second["nll_true"])  # two seeds, two runs
    table = (out / "results.md").read_text()
    assert "| qformer | 2 |" in table and "+-" in table and "colour correct" in table
    for name in ("bar_CIDEr_D.png", "bar_nll_true.png", "bar_attr_position.png", "val_loss.png"):
        assert (out / name).stat().st_size > 1000, name

    # a rerun trains and evaluates nothing again
    stamps = {p: p.stat().st_mtime for p in out.glob("*/seed*/checkpoint/trainable.safetensors")}
    evals = {p: p.stat().st_mtime for p in out.glob("*/seed*/eval.json")}
    run_suite(load_suite(str(suite_file)), out)
    assert stamps == {p: p.stat().st_mtime for p in out.glob("*/seed*/checkpoint/trainable.safetensors")}
    assert evals == {p: p.stat().st_mtime for p in out.glob("*/seed*/eval.json")}


def test_report_is_one_self_contained_page_that_renders_in_headless_chromium(tiny_suite, tmp_path):
    from vlmlab.analysis.report import build_report

    _, out = tiny_suite
    page = build_report(out, inspect_images=1)
    text = page.read_text()
    assert 'src="data:image/png;base64,' in text and 'src="http' not in text and "file:" not in text
    for needle in (
        "What the model is made of",
        "connector.type: meanpool",
        "colour correct",
        "qformer",
        "meanpool",
        "Read-out: each switch against the reference (qformer)",
    ):
        assert needle in text, needle
    import re

    assert re.search(r"hf:\S+: \d+x\d+ = \d+ vectors of 32 numbers", text)  # the suite's own encoder, not the default's
    assert (out / "qformer" / "seed0" / "inspect").is_dir()  # attention maps drawn for the Q-Former variant
    assert not (out / "meanpool" / "seed0" / "inspect").exists()  # none for a connector without queries

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed: apt-get install chromium")
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    images = text.count("<img ")
    assert f'data-images-loaded="{images}/{images}"' in dom, dom[-500:]  # every inline image decoded
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1200) and pixels.std() > 10  # not a blank page
    shutil.copy(shot, out / "report_screenshot.png")


def test_report_inlines_large_pictures_as_jpeg_that_keep_their_content(tmp_path):
    import base64
    import io
    import re

    from vlmlab.analysis.report import _img

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)  # noise: a PNG of ~700 kB
    Image.fromarray(photo).save(tmp_path / "big.png")
    Image.fromarray(photo[:20, :20]).save(tmp_path / "small.png")
    big, small = _img(tmp_path / "big.png", "big"), _img(tmp_path / "small.png", "small")
    assert "data:image/png;base64," in small  # small plots stay lossless PNG
    data = base64.b64decode(re.search(r"data:image/jpeg;base64,([^\"]+)", big).group(1))
    assert len(data) < (tmp_path / "big.png").stat().st_size
    decoded = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
    assert decoded.shape == photo.shape and np.abs(decoded.mean() - photo.mean()) < 2


def test_readout_marks_better_worse_and_noise_against_the_reference():
    from vlmlab.analysis.report import _readout

    metrics = [("CIDEr-D", "CIDEr-D", True), ("NLL true", "nll_true", False)]
    values = {
        "ref": [(1.0, 3.0), (1.2, 3.0)],
        "up": [(2.0, 3.5), (2.2, 3.5)],
        "same": [(1.05, 2.99), (1.15, 3.01)],
        "one": [(1.3, 2.9)],
    }
    rows = [{"variant": v, "CIDEr-D": str(c), "nll_true": str(n)} for v, runs in values.items() for c, n in runs]
    html_rows = {
        line.split("</td>")[0].removeprefix("<tr><td>"): line
        for line in _readout(rows, list(values), {"ref": {}}, metrics)
        if line.startswith("<tr><td>")
    }
    assert "ref" not in html_rows  # the reference (no settings) is what the others are measured against
    assert "<td class='better'>+1.000</td><td class='worse'>+0.500</td>" in html_rows["up"]
    assert "<td class='noise'>+0.000</td><td class='noise'>+0.000</td>" in html_rows["same"]
    assert "<td class='noise'>" not in html_rows["one"]  # one seed: no noise estimate, so no cell is greyed
    assert "<td class='better'>+0.200</td><td class='better'>-0.100</td>" in html_rows["one"]  # lower NLL is better


PHOTO_RECORDS = Path(__file__).resolve().parents[1] / "results" / "ablate" / "photos-16-tokens"


@pytest.mark.skipif(shutil.which("java") is None, reason="the photo records were scored with the PTB tokenizer")
def test_the_paired_table_of_the_photo_records_matches_their_scores_and_refuses_altered_captions(tmp_path):
    """Per-image CIDEr-D recomputed from each committed record averages to the score its eval reported; one seed
    paired on the same images, the mean difference is the difference of the two arms' scores."""
    suite = load_suite("photos-16-tokens")
    variants = list(suite.variants)
    paired = paired_rows(suite, tmp_path, variants, PHOTO_RECORDS)
    lines = paired_table(variants[0], paired, suite.split)
    rows = {cells[0]: cells for line in lines if line.startswith("| ") for cells in [line.strip("| ").split(" | ")]}
    score = {
        v: next(iter(arm_results(tmp_path, v, 0, PHOTO_RECORDS)["eval"]["rows"].values()))["CIDEr-D"] for v in variants
    }
    for variant in variants[1:]:
        _, seeds, images, difference, error, higher, lower = rows[variant]
        assert (seeds, images) == ("0", "228")
        assert float(difference) == pytest.approx(score[variant] - score[variants[0]], abs=5e-4)
        assert 0 < float(error) < 0.1 and int(higher) + int(lower) <= 228
    # two record files paired directly (`vlmlab results pair`) give the suite table's figures
    pair = pair_arm_records(*(PHOTO_RECORDS / v / "seed0.json" for v in (variants[0], "meanpool")))
    assert pair["difference"] == pytest.approx(paired["meanpool"]["difference"])
    assert pair["standard error"] == pytest.approx(paired["meanpool"]["standard error"])
    assert [a["CIDEr-D"] for a in pair["arms"]] == [score[variants[0]], score["meanpool"]]
    other_split = tmp_path / "other.json"  # the same arm with one test image another photo: not the same split
    arm = arm_results(tmp_path, "meanpool", 0, PHOTO_RECORDS)
    next(iter(arm["eval"]["rows"].values()))["examples"][0]["image"] = "elsewhere/another-photo.jpg"
    other_split.write_text(json.dumps(arm))
    with pytest.raises(ValueError, match="captioned different images"):
        pair_arm_records(PHOTO_RECORDS / "meanpool" / "seed0.json", other_split)
    arm = arm_results(tmp_path, "meanpool", 0, PHOTO_RECORDS)
    next(iter(arm["eval"]["rows"].values()))["examples"][0]["caption"] = "a cat"  # not the caption it scored
    with pytest.raises(ValueError, match="the kept captions are not the ones scored"):
        per_image_cider(arm)
