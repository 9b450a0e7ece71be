"""BLIP-2 stage 1: the masks, the hard negatives, each loss learning, and the hand-off to stage 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import SHARED_DATA
from vlmlab.config import ConfigError, load_config, validate
from vlmlab.model.qformer import QFormerConnector, stage1_mask
from vlmlab.model.qformer_stage1 import QFormerStage1, sample_hard_negatives


def settings(**kw):
    base = {"itc": True, "itm": True, "itg": True, "max_text_tokens": 12}
    return SimpleNamespace(**{**base, **kw})


def tiny_stage1(tokenizer, seed=0, **kw) -> QFormerStage1:
    torch.manual_seed(seed)
    connector = QFormerConnector(32, 64, 16, num_queries=4, depth=2, width=64, heads=4)
    embeddings = torch.randn(len(tokenizer), 64) * 0.1
    return QFormerStage1(connector, embeddings, tokenizer, settings(**kw))


def test_masks_keep_queries_from_the_text_and_the_text_causal():
    padding = torch.tensor([[False, False, False, True]])  # 3 text tokens and one pad
    q = 2
    itg = stage1_mask("itg", q, padding)[0]  # True = blocked
    assert itg[:q, q:].all()  # a query never attends to text
    assert not itg[q:, :q].any()  # every text token sees every query
    for t in range(3):
        row = itg[q + t, q:]
        assert not row[: t + 1].any() and row[t + 1 :].all()  # token t sees text <= t, nothing after
    itc = stage1_mask("itc", q, padding)[0]
    assert itc[:q, q:].all() and itc[q:, :q].all()  # two unimodal encoders
    itm = stage1_mask("itm", q, padding)[0]
    assert not itm[:, : q + 3].any() and itm[:, q + 3].all()  # all see all, but nobody the pad


def test_a_query_output_does_not_change_with_the_text_under_itc_and_itg(gpt2_tokenizer):
    model = tiny_stage1(gpt2_tokenizer).eval()
    image = torch.randn(2, 16, 32)
    a = model.tokenize(["a red circle", "a blue square on the left"])
    b = model.tokenize(["something else entirely", "a green triangle"])
    for mode in ("itc", "itg"):
        qa, _ = model.encode(image, *a, mode, model.stage1.cls)
        qb, _ = model.encode(image, *b, mode, model.stage1.cls)
        assert torch.allclose(qa, qb, atol=1e-5)
    qa, _ = model.encode(image, *a, "itm", model.stage1.cls)
    qb, _ = model.encode(image, *b, "itm", model.stage1.cls)
    assert not torch.allclose(qa, qb, atol=1e-3)  # the matching mask lets the queries read the text
    # and under itg, text token t is unchanged by the tokens after it
    ids, pad = model.tokenize(["a red circle on the left"])
    _, full = model.encode(image[:1], ids, pad, "itg", model.stage1.dec)
    changed = ids.clone()
    changed[0, 3:] = gpt2_tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    _, other = model.encode(image[:1], changed, pad, "itg", model.stage1.dec)
    assert torch.allclose(full[:, :4], other[:, :4], atol=1e-5)  # [DEC] + tokens 0..2
    assert not torch.allclose(full[:, 4:], other[:, 4:], atol=1e-3)


def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    ids = ["a", "a", "b", "c", "c", "d"]  # two images with two captions each
    positive = torch.tensor([[x == y for y in ids] for x in ids])
    for _ in range(200):
        sim = torch.randn(6, 6, generator=g) * 5 + positive * 20  # positives most similar by far
        picks = sample_hard_negatives(sim, positive, generator=g)
        assert (picks >= 0).all()
        assert not positive[torch.arange(6), picks].any()
    # a batch of one image's captions has no negative: -1, never a positive
    assert (sample_hard_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool)) == -1).all()
    # and the draw follows the similarities: the most similar negative is picked most
    sim = torch.tensor([[9.0, 5.0, 0.0, 0.0]])
    counts = torch.bincount(
        torch.cat([sample_hard_negatives(sim, torch.tensor([[True, False, False, False]])) for _ in range(300)]),
        minlength=4,
    )
    assert counts[0] == 0 and counts[1] > counts[2] + counts[3]


@pytest.mark.parametrize("loss", ["itc", "itm", "itg"])
def test_each_loss_falls_on_a_tiny_run(gpt2_tokenizer, loss):
    """Eight images with their own captions: each loss, trained alone, falls well below its start."""
    model = tiny_stage1(gpt2_tokenizer, **{k: k == loss for k in ("itc", "itm", "itg")})
    torch.manual_seed(1)
    images = torch.randn(8, 16, 32)
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
    shapes = ["circle", "square", "triangle", "star", "circle", "square", "triangle", "star"]
    captions = [f"a {c} {s}" for c, s in zip(colours, shapes)]
    ids = [str(i) for i in range(8)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    losses = []
    for _ in range(90):
        out = model(images, captions, ids)
        assert set(out) == {loss, "loss"}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out[loss].item())
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert end < 0.5 * start, (loss, start, end)


def test_stage1_config_is_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="connector.type"):
        validate(load_config(None, ["train.stage=qformer", "connector.type=mlp"]))
    with pytest.raises(ConfigError, match="nothing to train"):
        validate(
            load_config(
                None,
                [
                    "train.stage=qformer",
                    "qformer_stage1.itc=false",
                    "qformer_stage1.itm=false",
                    "qformer_stage1.itg=false",
                ],
            )
        )


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_clip_dir, tiny_gpt2_dir):
    from vlmlab.train.loop import train

    tmp = tmp_path_factory.mktemp("stage1")
    common = [
        f"vision.name=hf:{tiny_clip_dir}",
        f"lm.name={tiny_gpt2_dir}",
        f"data.datasets=[synthetic:{tmp / 'world'}]",
        "data.synthetic_images=40",
        "train.batch_size=4",
        "train.eval_every=4",
        "train.save_every=4",
        "train.max_steps=4",
        "train.eval_batches=1",
        "connector.num_queries=4",
        "connector.width=64",
    ]
    stage1 = train(load_config(None, [*common, "train.stage=qformer", f"train.output_dir={tmp / 's1'}"]))
    return tmp, common, stage1


@pytest.mark.slow
def test_stage1_run_logs_each_loss_and_hands_exactly_its_qformer_to_stage2(stage1_run):

    from safetensors.torch import load_file

    from vlmlab.model.vlm import build_vlm
    from vlmlab.run.checkpoint import TRAINABLE_FILE
    from vlmlab.train.stages import initialise_from

    tmp, common, stage1 = stage1_run
    records = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "train_loss" in r][-1]
    assert {"train_itc", "train_itm", "train_itg"} <= set(trained)
    assert trained["train_loss"] == pytest.approx(trained["train_itc"] + trained["train_itm"] + trained["train_itg"])
    assert {"val_itc", "val_itm", "val_itg", "val_loss"} <= set(records[0])

    source = load_file(stage1 / "checkpoint" / TRAINABLE_FILE)
    cfg = load_config(None, [*common, f"train.init_from={stage1}", f"train.output_dir={tmp / 's2'}"])
    vlm = build_vlm(cfg)
    before = {k: v.clone() for k, v in vlm.trainable_state_dict().items()}
    report = initialise_from(vlm, stage1)
    now = vlm.trainable_state_dict()
    connector = [k for k in source if k.startswith("connector.")]
    assert sorted(connector) == sorted(k for k in now if k.startswith("connector."))
    assert all(torch.equal(now[k], source[k]) for k in connector)  # bit for bit
    assert any(not torch.equal(before[k], source[k]) for k in connector)  # stage 1 moved them: a real hand-off
    assert report["unused"] and all(k.startswith("stage1.") for k in report["unused"])
    assert set(report["not_in_source"]) == {k for k in now if k.startswith("lm.")}  # LoRA starts fresh


@pytest.mark.slow
def test_a_stage1_qformer_starts_the_resampler_of_an_xattn_model(stage1_run):
    from safetensors.torch import load_file

    from vlmlab.model.vlm import build_vlm
    from vlmlab.run.checkpoint import TRAINABLE_FILE
    from vlmlab.train.stages import initialise_from

    tmp, common, stage1 = stage1_run
    info = json.loads((stage1 / "model_info.json").read_text())
    assert info["device"]  # the stage-1 loop says where it trained (CUDA where there is one)
    source = load_file(stage1 / "checkpoint" / TRAINABLE_FILE)
    cfg = load_config(
        None, [*common, "connector.type=xattn", "connector.xattn_every=1", f"train.output_dir={tmp / 'x'}"]
    )
    vlm = build_vlm(cfg)
    report = initialise_from(vlm, stage1)
    now = vlm.trainable_state_dict()
    qformer = [k for k in source if k.startswith("connector.")]
    assert qformer and all(torch.equal(now["connector.resampler." + k[10:]], source[k]) for k in qformer)
    assert sorted(report["loaded"]) == sorted("connector.resampler." + k[10:] for k in qformer)
    # the cross-attention blocks are new: left at their init, their gates shut, so the model starts as its LLM
    blocks = [k for k in now if k.startswith("connector.") and not k.startswith("connector.resampler.")]
    assert blocks and set(blocks) <= set(report["not_in_source"])
    assert all(torch.all(now[k] == 0) for k in blocks if k.endswith("gate"))


@pytest.mark.slow
def test_eval_of_a_stage1_run_reports_retrieval_against_chance_itm_and_attention(stage1_run, tmp_path):
    from vlmlab.eval.retrieval import evaluate_stage1_run

    _, _, stage1 = stage1_run
    sugarcrepe = SHARED_DATA / "questions" / "sugar-crepe"
    sugarcrepe = sugarcrepe if sugarcrepe.is_dir() else None
    result = evaluate_stage1_run(stage1, split="val", sugarcrepe=sugarcrepe, limit=3, out_dir=tmp_path)
    r = result["retrieval"]
    assert 0 <= r["i2t_r@1"] <= 1 and r["t2i_r@1_chance"] == pytest.approx(1 / result["images"])
    assert 0 <= result["itm_accuracy"] <= 1
    assert result["attention"]["attn_entropy"] <= result["attention"]["attn_entropy_uniform"] + 1e-6
    assert "R@1" in (tmp_path / "eval.md").read_text()
    if sugarcrepe is not None:
        assert len(result["sugarcrepe_itm"]) == 7
        assert all(s["n"] == 3 and 0 <= s["accuracy"] <= 1 for s in result["sugarcrepe_itm"].values())


def test_the_stage_suite_pretrains_the_stage1_arms_and_chains_them(tmp_path):
    from vlmlab.analysis.ablate import load_suite

    suite = load_suite(
        "qformer-stages"
    )  # its photo twin is a record: docs/experiments/, loaded by test_shipped_configs
    assert {"qformer-scratch", "qformer-stage1", "qformer-stage1-itc", "meanpool", "mlp", "qformer-scratch-2x"} == set(
        suite.variants
    )
    assert len(suite.seeds) >= 2
    stage1 = suite.pretrain_config("qformer-stage1-itc", 1, tmp_path)
    assert stage1.train.stage == "qformer" and stage1.train.seed == 1 and stage1.connector.type == "qformer"
    assert (stage1.qformer_stage1.itc, stage1.qformer_stage1.itm, stage1.qformer_stage1.itg) == (True, False, False)
    stage2 = suite.config("qformer-stage1-itc", 1, tmp_path)
    assert stage2.train.stage == "caption" and stage2.train.init_from == stage1.train.output_dir
    assert (
        suite.pretrain_config("meanpool", 1, tmp_path) is None
        and suite.config("meanpool", 1, tmp_path).train.init_from is None
    )
    # an xattn arm's stage 1 pretrains the Q-Former its cross-attention blocks read
    (tmp_path / "x.yaml").write_text(
        "variants: {xattn-stage1: {connector.type: xattn, pretrain: {train.max_steps: 3}}}"
    )
    xattn = load_suite(str(tmp_path / "x.yaml"))
    assert xattn.pretrain_config("xattn-stage1", 0, tmp_path).connector.type == "qformer"
    assert xattn.config("xattn-stage1", 0, tmp_path).connector.type == "xattn"
    scratch, twice = suite.config("qformer-scratch", 0, tmp_path), suite.config("qformer-scratch-2x", 0, tmp_path)
    assert twice.train.max_steps == 2 * scratch.train.max_steps


@pytest.mark.slow
def test_a_suite_trains_the_stage1_run_before_the_caption_run_that_starts_from_it(tmp_path, tiny_config):
    import csv
    import os

    import yaml

    from vlmlab.analysis.ablate import load_suite, run_suite
    from vlmlab.config import save_config

    old = os.environ.get("VLMLAB_CACHE")
    os.environ["VLMLAB_CACHE"] = str(tmp_path / "cache")
    try:
        base = tiny_config(
            tmp_path,
            "train.max_steps=3",
            "train.eval_every=3",
            "generate.max_new_tokens=4",
        )
        save_config(base, tmp_path / "base.yaml")
        pretrain = {"train.max_steps": 3, "train.batch_size": 4, "train.save_every": 3, "train.eval_every": 3}
        (tmp_path / "suite.yaml").write_text(
            yaml.safe_dump(
                {
                    "base": "base.yaml",
                    "split": "val",
                    "contact_images": 0,
                    "variants": {"scratch": {}, "stage1": {"pretrain": pretrain}},
                }
            )
        )
        out = run_suite(load_suite(str(tmp_path / "suite.yaml")), tmp_path / "out")
    finally:
        if old is None:
            os.environ.pop("VLMLAB_CACHE")
        else:
            os.environ["VLMLAB_CACHE"] = old
    stage1 = out / "stage1" / "seed0-stage1"
    assert load_config(stage1 / "config.yaml").train.stage == "qformer"
    assert load_config(out / "stage1" / "seed0" / "config.yaml").train.init_from == str(stage1)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["variant"] for r in rows} == {"scratch", "stage1"}
    assert all(float(r["attn_entropy"]) <= float(r["attn_entropy_uniform"]) + 1e-6 for r in rows)
    assert "query corr" in (out / "results.md").read_text()
    # the stage-1 run is evaluated on its own too (retrieval vs chance, ITM), in a table of its own
    stage1_eval = json.loads((stage1 / "eval.json").read_text())
    assert stage1_eval["split"] == "val" and 0 <= stage1_eval["itm_accuracy"] <= 1
    table = (out / "results.md").read_text().split("## Stage 1 alone")[1]
    assert "| stage1 | 1 |" in table and "| scratch |" not in table
    assert f"| {stage1_eval['retrieval']['i2t_r@1']:.3f} |" in table and "+-" not in table  # one seed: no spread
    from vlmlab.analysis.report import build_report

    page = build_report(out, inspect_images=1).read_text()
    assert "Stage 1 alone" in page and f"<td>{stage1_eval['itm_accuracy']:.3f}</td>" in page
