"""SmallCap-style runs (data.retrieved_captions): what is retrieved, how it enters the prompt, what is
supervised, and the evaluation that swaps the image and the retrieved text each on its own."""

import json

import pytest
import torch

from helpers import supervised_text
from vlmlab.config import ConfigError, load_config
from vlmlab.data.formats import CaptionSample
from vlmlab.data.pairs import SplitFeatures
from vlmlab.data.retrieval_prompt import CaptionDatastore, retrieval_messages, with_retrieved_captions
from vlmlab.model.conversation import encode_conversation


def _split(ids, directions, split="train"):
    """Images whose pooled feature points along a given direction; captions name the image."""
    features = torch.stack([torch.tensor(d, dtype=torch.float).repeat(3, 1) for d in directions])  # [M, 3, D]
    samples = [CaptionSample(i, f"/{i}.jpg", [f"caption of {i}", f"other caption of {i}"], split) for i in ids]
    pairs = [(row, c) for row, s in enumerate(samples) for c in s.captions]
    return SplitFeatures(samples, features.half(), pairs)


def test_retrieval_takes_the_nearest_training_images_first_caption_and_never_the_image_itself():
    train = _split(["a", "b", "c", "d"], [[1, 0, 0], [0.9, 0.1, 0], [0.5, 1, 0], [0, 0.2, 1]])
    store = CaptionDatastore(train)
    assert store.retrieve(train, 2) == [
        ["caption of b", "caption of c"],  # a: b is nearest, a itself is left out
        ["caption of a", "caption of c"],
        ["caption of b", "caption of a"],
        ["caption of c", "caption of b"],
    ]
    test = _split(["x"], [[1, 0.05, 0]], split="test")
    assert store.retrieve(test, 3) == [["caption of a", "caption of b", "caption of c"]]
    with pytest.raises(ValueError, match="datastore holds 4 images"):
        store.retrieve(test, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        store.retrieve(test, 0)


def test_only_the_caption_is_supervised_with_the_retrieved_text_in_the_user_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    split = _split(["a", "b"], [[1, 0], [0, 1]])
    paired = with_retrieved_captions(split, [["a dog runs.", "a cat sits."], ["two boats."]])
    assert len(paired.pairs) == 4 and paired.pairs[0][0] == 0
    messages = paired.pairs[0][1]
    assert messages == retrieval_messages(["a dog runs.", "a cat sits."], "caption of a")
    enc = encode_conversation(tok, "chatml", messages, end)
    assert supervised_text(tok, enc) == "caption of a<|im_end|>"
    prompt = tok.decode(enc.ids[enc.image_position :])
    assert "- a dog runs.\n- a cat sits." in prompt and "caption of a" in prompt.split("assistant")[-1]
    with pytest.raises(ValueError, match="1 retrieved lists for 2 images"):
        with_retrieved_captions(split, [["x"]])


@pytest.mark.parametrize(
    "setting, message",
    [
        (["data.retrieved_captions=-1"], "data.retrieved_captions"),
        (["data.retrieved_captions=2", "train.stage=instruct", "data.tasks=x"], "works in the caption stage"),
        (["data.retrieved_captions=2", "vision.unfreeze_last=1"], "vision.unfreeze_last must be 0"),
    ],
)
def test_impossible_retrieval_settings_fail_at_load(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, setting)


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_cache")
def test_a_retrieval_run_trains_and_its_eval_swaps_image_and_text_separately(tmp_path, tiny_config):
    from vlmlab.analysis.baselines import train_baselines
    from vlmlab.eval.captioning import evaluate_run
    from vlmlab.train.loop import train

    cfg = tiny_config(
        tmp_path,
        "data.retrieved_captions=2",
        "data.conversation_format=gpt2",
        "train.max_steps=20",
        "train.eval_every=20",
    )
    run = train(cfg)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < val[0]  # the caption loss falls with the retrieved text in the prompt
    baselines = train_baselines(run, train_missing=False)  # none trained: each row is a note instead
    result = evaluate_run(run, split="test", baselines=baselines, retrieval_k=3, contact_images=2)
    main = f"model ({run.name})"
    rows = result["rows"]
    assert list(rows)[:4] == [
        main,
        f"{main}, swapped image",
        f"{main}, swapped retrieved captions",
        f"{main}, no image",
    ]
    assert "retrieval k-NN (k=3)" in rows
    m = rows[main]
    assert m["generation"]["retrieved_captions"] == 2
    assert m["retrieved_text_gain"] == pytest.approx(m["nll_swapped_text"] - m["nll_true"])
    assert 0 <= m["text_swap_changed_share"] <= 1 and 0 <= m["swap_changed_share"] <= 1
    # each test image's retrieved captions are the first captions of its 2 nearest training images
    assert all(len(e["retrieved"]) == 2 for e in m["examples"])
    table = (run / "eval.md").read_text()
    assert "text gain (nats/tok)" in table and "swapped retrieved captions" in table


@pytest.mark.usefixtures("isolated_cache")
def test_captioning_a_new_photo_retrieves_from_the_runs_training_split(tmp_path, tiny_config):
    from vlmlab.data.features import FeatureCache
    from vlmlab.data.pairs import load_split_features
    from vlmlab.model.language_model import cache_dir
    from vlmlab.model.vlm import build_vlm

    cfg = tiny_config(tmp_path, "data.retrieved_captions=2")
    model = build_vlm(cfg)
    splits = load_split_features(cfg, FeatureCache(cache_dir() / "features", model.vision), splits=("train", "test"))
    tokens = splits["test"].features.float()
    asked, chat = [], model.chat_from_tokens  # a spy: the real method runs, the conversations are recorded
    model.chat_from_tokens = lambda t, conversations, **kw: asked.append(conversations) or chat(t, conversations, **kw)
    captions = model.generate_from_tokens(tokens, max_new_tokens=6)  # vlmlab caption / serve / lmms-eval go here
    # the prompt holds the first captions of the 2 nearest training images, as in training
    retrieved = CaptionDatastore(splits["train"]).retrieve(splits["test"], 2)
    assert asked == [[retrieval_messages(r) for r in retrieved]] and len(captions) == len(tokens)
    assert all(len(r) == 2 and r[0] != r[1] for r in retrieved) and model.caption_datastore is not None
    with pytest.raises(ValueError, match="cannot caption without one"):
        model.generate_from_tokens(None, batch_size=1)

    model.caption_datastore = None
    model.cfg.data.datasets = [f"coco:{tmp_path / 'no-such-folder'}"]  # the run's data is not on this machine
    with pytest.raises(ValueError, match="needs its training data"):  # not a silent plain-prompt caption
        model.generate_from_tokens(tokens)
