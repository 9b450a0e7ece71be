"""The shipped recipes: the photo recipe's held-out split is fixed and disjoint, `vlmlab eval` measures mode
collapse, and the GPU/hub recipe trains with small random models of the same architectures put in by --set."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, require
from vlmlab.config import load_config
from vlmlab.data.formats import CaptionSample
from vlmlab.data.pairs import SplitFeatures, load_samples
from vlmlab.eval.captioning import evaluate_split, format_table, score_captions

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "recipes" / "photo-captions.yaml"


def _digest(samples) -> str:
    return hashlib.sha1("\n".join(sorted(s.image_id for s in samples)).encode()).hexdigest()[:16]


def test_the_photo_recipe_split_is_fixed_by_image_and_disjoint(monkeypatch):
    """The numbers written in recipes/photo-captions.yaml: if this fails, the held-out split moved and no
    score before the change can be compared with one after it."""
    require(SHARED_DATA / "coco2017-val")
    monkeypatch.setenv("VLMLAB_DATA", str(SHARED_DATA))  # the data root the recipe names
    samples = load_samples(load_config(PHOTOS))
    sizes = {split: (len(v), sum(len(s.captions) for s in v)) for split, v in samples.items()}
    assert sizes == {"train": (1957, 9791), "val": (237, 1185), "test": (228, 1140)}
    assert {split: _digest(v) for split, v in samples.items()} == {
        "train": "0edebe871a457757",
        "val": "0a0cd8722fa589aa",
        "test": "dd992e98a5a0baa9",
    }
    ids = {split: {s.image_id for s in v} for split, v in samples.items()}
    paths = {split: {os.path.realpath(s.image_path) for s in v} for split, v in samples.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not ids[a] & ids[b] and not paths[a] & paths[b], f"an image is in both {a} and {b}"
    # the rule is by image id alone: coco2017-mini's held-out photos stay held out here too
    mini = load_config(None, ["data.datasets=[coco:$VLMLAB_DATA/coco2017-mini]"])
    mini_test = {s.image_id for s in load_samples(mini)["test"]}
    assert mini_test and not mini_test & ids["train"]


def _split(n: int) -> SplitFeatures:
    samples = [CaptionSample(f"x:{i}", f"/img/{i}.png", [f"a thing number {i}."], "test") for i in range(n)]
    return SplitFeatures(samples, torch.zeros(n, 4, 8), [(i, s.captions[0]) for i, s in enumerate(samples)])


def test_eval_reports_the_most_repeated_caption_and_its_count():
    captions = [
        "a bathroom with a sink.",
        "a dog in snow.",
        "a bathroom with a sink.",
        "a plane.",
        "a bathroom with a sink.",
    ]
    r = score_captions(_split(5), captions, captions[::-1], [1, 2, 3, 4, 0], use_java=False)
    assert r["most_repeated_caption"] == "a bathroom with a sink." and r["most_repeated_count"] == 3
    assert r["distinct_share"] == pytest.approx(3 / 5)
    table = format_table({"model": r})
    assert '"a bathroom with a sink." (3 of 5)' in table
    r["most_repeated_caption"] = "a sink | a toilet"  # a pipe in a caption must not add a column
    table = format_table({"model": r})
    assert all(line.count(" | ") == table.splitlines()[0].count(" | ") for line in table.splitlines())


def test_a_collapsed_captioner_shows_one_caption_for_every_image(tiny_clip_dir, tiny_gpt2_dir):
    """The blind LM cannot see the image: it writes one caption for all, and the table says which and how often."""
    from vlmlab.model.vlm import build_vlm

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
    split = _split(4)
    split.features = torch.randn(4, 16, 32)
    r = evaluate_split(build_vlm(cfg).eval(), split, batch_size=3, use_java=False)
    assert r["most_repeated_count"] == 4 and r["most_repeated_caption"] == r["examples"][0]["caption"]
    assert "(4 of 4)" in format_table({"blind": r})


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama-architecture LM (SmolLM2's architecture) with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(smollm2_tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_siglip_dir(tmp_path_factory):
    """A 2-layer random SigLIP vision tower (32 px, 8 px patches -> 16 tokens of width 32)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-siglip")
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    SiglipVisionModel(config).save_pretrained(out)
    return out


def test_the_hub_gpu_recipe_names_hub_models_and_trains_two_steps_with_tiny_stand_ins(
    tmp_path, tiny_siglip_dir, tiny_llama_dir, monkeypatch
):
    from vlmlab.run import load_run
    from vlmlab.train.loop import train

    path = REPO / "recipes" / "hub-gpu.yaml"
    shipped = load_config(path)
    assert shipped.vision.name.startswith("hf:") and "siglip" in shipped.vision.name.lower()
    assert shipped.lm.name.startswith("HuggingFaceTB/SmolLM2-") and shipped.lm.name.endswith("-Instruct")
    assert shipped.train.mixed_precision == "auto" and shipped.data.datasets[0].startswith("karpathy:")

    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        path,
        [
            f"vision.name=hf:{tiny_siglip_dir}",
            f"lm.name={tiny_llama_dir}",
            f"data.datasets=[synthetic:{tmp_path / 'world'}]",
            "data.synthetic_images=24",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.save_every=2",
            "train.log_every=1",
            "train.feature_batch_size=8",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    run = train(cfg)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model = load_run(run)
    assert model.cfg.lm.chat_format and model.num_visual_tokens == 16  # one visual token per SigLIP patch
    lora = [n for n, _ in model.lm.named_parameters() if "lora_A" in n]
    targets = shipped.lm.lora.target_modules
    assert {t for t in targets for n in lora if f".{t}.lora_A" in n} == set(targets)  # attention and MLP
    images = sorted((tmp_path / "world" / "images").glob("*.png"))[:2]
    assert len(model.caption([str(p) for p in images], max_new_tokens=3)) == 2
