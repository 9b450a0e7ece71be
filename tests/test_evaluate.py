"""Image-dependence probes on a tiny model: they separate a model that sees the image from one that cannot."""

import pytest
import torch

from vlmlab.config import load_config
from vlmlab.eval.captioning import evaluate_split, format_table
from vlmlab.model.vlm import build_vlm


def test_probes_of_a_model_that_sees_the_image(tiny_vlm, tiny_split):
    r = evaluate_split(tiny_vlm, tiny_split, batch_size=3)
    assert r["visual_information_gain"] == pytest.approx(r["nll_shuffled"] - r["nll_true"])
    assert r["nll_true"] != pytest.approx(r["nll_shuffled"], abs=1e-6)  # random images move a random model
    assert 0 <= r["distinct_share"] <= 1 and 0 <= r["swap_changed_share"] <= 1
    assert r["images"] == 4 and len(r["examples"]) == 4
    assert r["generation"]["max_new_tokens"] == 5
    table = format_table({"tiny": r})
    assert table.count("\n") == 2 and "visual gain" in table


@pytest.mark.slow
def test_probes_of_a_blind_connector_show_no_image_dependence(tiny_vlm, tiny_split):
    """Zero the projection: every image gives the same visual tokens, so all image probes must agree."""
    state = {k: v.clone() for k, v in tiny_vlm.connector.state_dict().items()}
    try:
        with torch.no_grad():
            tiny_vlm.connector.projection.weight.zero_()
        r = evaluate_split(tiny_vlm, tiny_split, batch_size=3)
    finally:
        tiny_vlm.connector.load_state_dict(state)
    assert r["nll_true"] == pytest.approx(r["nll_shuffled"], abs=1e-5)
    assert r["nll_true"] == pytest.approx(r["nll_mean_image"], abs=1e-5)
    assert r["visual_information_gain"] == pytest.approx(0, abs=1e-5)
    assert r["swap_changed_share"] == 0
    assert r["distinct_share"] == 0.25  # one caption for all four images


def test_probes_of_the_blind_baseline_show_no_image_dependence(tiny_clip_dir, tiny_gpt2_dir, tiny_split):
    """connector.type=none: no visual tokens at all, so every NLL probe is the no-image NLL, exactly."""
    cfg = load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            "connector.type=none",
            "lm.lora.dropout=0.0",
            "generate.max_new_tokens=4",
        ],
    )
    blind = build_vlm(cfg).eval()
    assert blind.blind and blind.parameter_table()[1][1:] == (0, 0)  # the connector row: nothing
    r = evaluate_split(blind, tiny_split, batch_size=3)
    assert r["nll_true"] == r["nll_shuffled"] == r["nll_mean_image"] == r["nll_no_image"]
    assert r["visual_information_gain"] == 0
    assert r["swap_changed_share"] == 0 and r["distinct_share"] == 0.25
    assert r["CIDEr-D"] == pytest.approx(r["cider_deranged"])  # one caption for all: the pairing cannot matter


@pytest.mark.slow
def test_eval_command_trains_and_reuses_baselines(tmp_path, tiny_config, monkeypatch, capsys):
    """One `vlmlab eval` gives the model, the blind LM, the frozen connector and retrieval in one table."""
    import json

    from safetensors.torch import load_file

    from vlmlab.cli import main as cli_main
    from vlmlab.train.loop import train

    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(
        tmp_path,
        "train.max_steps=6",
        "train.eval_every=6",
        "train.save_every=6",
        "generate.max_new_tokens=4",
    )
    run_dir = train(cfg)
    argv = ["eval", str(run_dir), "--retrieval-k", "3", "--contact-images", "4", "--split", "val"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "baseline blind" in out and "baseline frozen_connector" in out  # trained on first use

    result = json.loads((run_dir / "eval.json").read_text())
    rows = result["rows"]
    assert list(rows) == [f"model ({run_dir.name})", "blind LM", "frozen connector", "retrieval k-NN (k=3)"]
    assert rows["blind LM"]["visual_information_gain"] == 0
    assert rows["blind LM"]["nll_true"] == rows["blind LM"]["nll_no_image"]
    assert rows["retrieval k-NN (k=3)"]["generation"] == {"retrieval_k": 3}
    assert result["generation"]["max_new_tokens"] == 4
    table = (run_dir / "eval.md").read_text()
    assert table.count("\n| ") == 5 and "retrieval" in table and "n/a" in table  # retrieval has no NLL
    assert (run_dir / "contact_sheet.png").stat().st_size > 10_000

    # the frozen control's connector is exactly the seeded initialisation; the model's has moved
    model_state = load_file(run_dir / "checkpoint" / "trainable.safetensors")
    frozen_state = load_file(run_dir / "baselines" / "frozen_connector" / "checkpoint" / "trainable.safetensors")
    from vlmlab.model.vlm import build_vlm

    init = build_vlm(cfg).trainable_state_dict()
    assert torch.equal(frozen_state["connector.queries"], init["connector.queries"])
    assert not torch.equal(model_state["connector.queries"], init["connector.queries"])
    assert not any(
        k.startswith("connector.") for k in load_file(run_dir / "baselines/blind/checkpoint/trainable.safetensors")
    )

    # a second eval reuses the finished baselines; overridden generation settings are recorded
    assert cli_main(argv + ["--max-new-tokens", "2", "--no-train-baselines"]) == 0
    assert "training into" not in capsys.readouterr().out
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["rows"]["blind LM"]["nll_true"] == pytest.approx(rows["blind LM"]["nll_true"])
    assert again["generation"]["max_new_tokens"] == 2
