"""The composed model on tiny real-architecture parts: what is trained, what the loss sees."""

import pytest
import torch

from vlmlab.config import load_config
from vlmlab.model.vlm import build_vlm


@pytest.fixture(scope="module")
def tiny_vlm(tiny_clip_dir, tiny_gpt2_dir):
    cfg = load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            "connector.width=32",
            "connector.heads=2",
            "connector.num_queries=4",
            "lm.lora.dropout=0.0",
        ],
    )
    return build_vlm(cfg)


def test_only_connector_and_lora_train(tiny_vlm):
    trainable = [n for n, p in tiny_vlm.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("connector.") or "lora_" in n for n in trainable)
    tiny_vlm.train()
    assert not tiny_vlm.vision.training  # frozen BatchNorm/dropout in the encoder stay in eval mode
    rows = {name: (total, trainable) for name, total, trainable in tiny_vlm.parameter_table()}
    assert rows["vision encoder"][1] == 0 and rows["language model"][1] == 0
    assert rows["connector"][0] == rows["connector"][1] > 0 and rows["LoRA adapters"][1] > 0


def test_padding_does_not_change_the_loss(tiny_vlm):
    """A caption's loss is the same alone or batched with a longer caption (padding is invisible)."""
    tiny_vlm.eval()
    image = torch.randn(2, 16, 32)
    short, long = "a red circle.", "a large blue square at the top left of a white picture."
    sums, counts = tiny_vlm(image, tiny_vlm.text_batch([short, long]), reduction="sum_per_sample")
    alone, alone_count = tiny_vlm(image[:1], tiny_vlm.text_batch([short]), reduction="sum_per_sample")
    assert counts[0] == alone_count[0]
    assert torch.allclose(sums[0], alone[0], atol=1e-4)
    mean = tiny_vlm(image, tiny_vlm.text_batch([short, long]))
    assert torch.allclose(mean, sums.sum() / counts.sum(), atol=1e-5)


def test_loss_depends_on_the_image_and_gradients_reach_the_connector(tiny_vlm):
    tiny_vlm.train()
    a, b = torch.randn(1, 16, 32), torch.randn(1, 16, 32) * 3
    text = tiny_vlm.text_batch(["a red circle."])
    assert not torch.allclose(tiny_vlm(a, text), tiny_vlm(b, text))
    tiny_vlm.zero_grad()
    tiny_vlm(a, text).backward()
    assert tiny_vlm.connector.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vlm.vision.parameters())


def test_generation_returns_one_string_per_image(tiny_vlm):
    out = tiny_vlm.generate_from_tokens(torch.randn(3, 16, 32), max_new_tokens=4)
    assert len(out) == 3 and all(isinstance(c, str) for c in out)


def test_generation_layout_puts_padding_before_the_visual_tokens(tiny_vlm):
    """Left padding for prompts of different lengths: each row reads [pad...][visual][prompt]."""
    from vlmlab.model.sequence import build_generation_batch

    text = build_generation_batch([[11, 12, 13], [14]], pad_id=0)
    visual = torch.randn(2, 4, tiny_vlm.connector.projection.out_features)
    embeds, mask, labels = tiny_vlm._embed(visual, text, visual_first_pad=True)
    assert mask.tolist() == [[1] * 7, [0, 0] + [1] * 5]
    assert torch.equal(embeds[1, 2:6], visual[1])  # visual tokens right after the padding
    assert torch.equal(embeds[0, :4], visual[0])
    word = tiny_vlm.lm.get_base_model().get_input_embeddings()
    assert torch.allclose(embeds[1, 6], word(torch.tensor(14)))  # the prompt ends the row
    assert (labels == -100).all()


@pytest.mark.parametrize("kind, visual", [("meanpool", 4), ("mlp", 16), ("none", 0)])
def test_every_connector_type_trains_and_captions(tiny_clip_dir, tiny_gpt2_dir, kind, visual):
    """Each ablation arm plugs into the same VLM: a loss with gradients on what trains, and a caption."""
    cfg = load_config(
        None,
        [
            f"vision.name=hf:{tiny_clip_dir}",
            f"lm.name={tiny_gpt2_dir}",
            f"connector.type={kind}",
            "connector.width=32",
            "connector.num_queries=4",
            "generate.max_new_tokens=3",
        ],
    )
    model = build_vlm(cfg)
    image = torch.randn(2, 16, 32)
    tokens = model.visual_tokens(image)
    assert (tokens is None) if visual == 0 else tokens.shape[1] == visual
    loss = model(image, model.text_batch(["a red square.", "a blue circle."]))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert len(model.generate_from_tokens(image)) == 2


def test_remembered_images_are_encoded_once_and_answer_as_before(tiny_vlm, tmp_path, monkeypatch):
    """An evaluation asks many questions of one photo: with remember_images each photo is read and encoded once,
    and the answers and yes/no scores are those of encoding it every time."""
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(3):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    asked = [paths[0], paths[1], paths[0], None, paths[2], paths[0]]  # repeats, and a question without a photo
    conversations = [[{"role": "user", "content": "<image>\nIs there a cat?"}]] * len(asked)
    words = [["yes", "Yes"], ["no", "No"]]
    tiny_vlm.eval()
    tiny_vlm.image_token_memo = None
    answers, scores = tiny_vlm.chat_batch(asked, conversations), tiny_vlm.reply_logprobs(asked, conversations, words)

    encoded = []
    encode = tiny_vlm.encode_images
    monkeypatch.setattr(tiny_vlm, "encode_images", lambda images: encoded.append(len(images)) or encode(images))
    tiny_vlm.remember_images()
    try:
        again = tiny_vlm.chat_batch(asked, conversations)
        again_scores = tiny_vlm.reply_logprobs(asked, conversations, words)
    finally:
        tiny_vlm.image_token_memo = None
    assert encoded == [1, 1, 1]  # three photos, each once, alone; the second pass read none
    assert again == answers
    assert torch.equal(again_scores, scores)
