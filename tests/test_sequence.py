"""Label construction: the rules that keep a captioner from learning to emit only end-of-text."""

import pytest

from vlmlab.model.language_model import choose_end_token
from vlmlab.model.sequence import (
    IGNORE_INDEX,
    build_generation_batch,
    build_training_batch,
    caption_token_ids,
    decode_caption,
    prompt_token_ids,
)

CAPTIONS = ["a dog runs on the beach.", "two red circles."]


def _batch(tokenizer, chat_format):
    specials = choose_end_token(tokenizer, chat_format)
    prompt = prompt_token_ids(tokenizer, "A picture of", chat_format)
    caps = [caption_token_ids(tokenizer, c, chat_format, 32) for c in CAPTIONS]
    return specials, prompt, caps, build_training_batch(prompt, caps, specials.end_id, specials.pad_id)


def test_gpt2_pad_equals_eos_and_first_eos_is_still_supervised(gpt2_tokenizer):
    specials, prompt, caps, batch = _batch(gpt2_tokenizer, chat_format=False)
    assert specials.end_id == specials.pad_id == 50256  # the GPT-2 trap: pad and end are one token
    for i, cap in enumerate(caps):
        end = len(prompt) + len(cap)  # position of this caption's END
        assert batch.input_ids[i, end] == 50256
        assert batch.labels[i, end] == 50256, "the caption's END must be supervised even though pad == END"
        # the prompt is never supervised; the caption tokens are, exactly
        assert (batch.labels[i, : len(prompt)] == IGNORE_INDEX).all()
        assert batch.labels[i, len(prompt) : end].tolist() == cap
        # padding after the END is neither attended nor supervised
        assert (batch.labels[i, end + 1 :] == IGNORE_INDEX).all()
        assert batch.attention_mask[i, : end + 1].all() and not batch.attention_mask[i, end + 1 :].any()
    # exactly one supervised END per row, however much padding follows
    assert ((batch.labels == 50256).sum(dim=1) == 1).all()
    # the shorter caption really is padded, so the test above exercised padding
    assert (batch.attention_mask == 0).any()


def test_gpt2_caption_text_round_trips(gpt2_tokenizer):
    specials, prompt, caps, batch = _batch(gpt2_tokenizer, chat_format=False)
    for i, caption in enumerate(CAPTIONS):
        supervised = batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist()
        assert decode_caption(gpt2_tokenizer, supervised, specials.end_id) == caption


def test_smollm2_end_token_is_chosen_deliberately(smollm2_tokenizer):
    vocab = smollm2_tokenizer.get_vocab()
    assert vocab["<|endoftext|>"] == 0 and vocab["<|im_start|>"] == 1 and vocab["<|im_end|>"] == 2
    plain = choose_end_token(smollm2_tokenizer, chat_format=False)
    chat = choose_end_token(smollm2_tokenizer, chat_format=True)
    assert (plain.end_id, chat.end_id) == (0, 2)
    for specials in (plain, chat):
        assert specials.end_id != 1, "<|im_start|> starts a turn and must never be the caption's end"
    with pytest.raises(ValueError, match="starts a chat turn"):
        choose_end_token(smollm2_tokenizer, chat_format=False, end_token="<|im_start|>")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        choose_end_token(smollm2_tokenizer, chat_format=False, end_token="<eos>")


@pytest.mark.parametrize("chat_format", [False, True])
def test_smollm2_labels(smollm2_tokenizer, chat_format):
    specials, prompt, caps, batch = _batch(smollm2_tokenizer, chat_format)
    for i, cap in enumerate(caps):
        end = len(prompt) + len(cap)
        assert batch.labels[i, end] == specials.end_id
        assert batch.labels[i, len(prompt) : end].tolist() == cap
        assert (batch.labels[i, : len(prompt)] == IGNORE_INDEX).all()
        assert (batch.labels[i, end + 1 :] == IGNORE_INDEX).all()
    if chat_format:
        text = smollm2_tokenizer.decode(prompt)
        assert text.startswith("<|im_start|>user") and text.endswith("<|im_start|>assistant\n")
        assert "system" not in text


def test_generation_batch_is_prompt_only_and_left_padded():
    batch = build_generation_batch([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert (batch.labels == IGNORE_INDEX).all()


def test_caption_truncation_keeps_the_end_token(gpt2_tokenizer):
    long = caption_token_ids(gpt2_tokenizer, "word " * 100, False, max_tokens=8)
    assert len(long) == 8
    batch = build_training_batch([1, 2], [long], end_id=50256, pad_id=50256)
    assert batch.labels[0, -1] == 50256


def test_decode_stops_at_first_end(gpt2_tokenizer):
    ids = gpt2_tokenizer(" a cat", add_special_tokens=False)["input_ids"] + [50256] + [257, 3290]
    assert decode_caption(gpt2_tokenizer, ids, 50256) == "a cat"
    assert decode_caption(gpt2_tokenizer, [50256, 257], 50256) == ""
