"""Token sequences and labels, right by construction.

A training sequence is laid out as

    [visual tokens][prompt][caption][END][pad ...]

and only `caption` and its `END` are supervised. The classic failure this guards against: GPT-2's
pad token *is* its end token, so masking labels with `ids == pad_id` also masks the one END the
model must learn to write, while leaving padding in the labels teaches it to write END everywhere.
Here supervision comes from lengths, never from token identity, so neither can happen.

Visual tokens are prepended later, as embeddings (vlm.py); this module builds the text part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens, 0 on padding
    labels: torch.Tensor  # [B, T], IGNORE_INDEX except on caption tokens and their END
    # Conversations (conversation.py): where each row's visual tokens are spliced into the text, and
    # whether the row has an image at all. None: captions, whose visual tokens come first.
    image_positions: torch.Tensor | None = None  # [B] long
    image_present: torch.Tensor | None = None  # [B] bool


def prompt_token_ids(tokenizer, prompt: str, chat_format: bool) -> list[int]:
    """The prompt that follows the visual tokens: plain text, or one chat turn ending where the assistant speaks."""
    if chat_format:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # SmolLM2's template adds a default system turn; a captioner needs only the user turn.
        start = text.find("<|im_start|>user")
        text = text[start:] if start >= 0 else text
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def caption_token_ids(tokenizer, caption: str, chat_format: bool, max_tokens: int) -> list[int]:
    """Caption tokens, without the end token. A plain-format caption follows the prompt after a space."""
    text = caption.strip() if chat_format else " " + caption.strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens]


def build_training_batch(
    prompt_ids: list[int],
    caption_ids: list[list[int]],
    end_id: int,
    pad_id: int,
) -> TextBatch:
    """Right-padded [prompt][caption][END][pad] with labels on caption + END only."""
    rows = [prompt_ids + ids + [end_id] for ids in caption_ids]
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    start = len(prompt_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, start : len(row)] = torch.tensor(row[start:])  # caption tokens + the END after them
    return TextBatch(input_ids, attention_mask, labels)


def build_generation_batch(prompt_ids: list[list[int]], pad_id: int) -> TextBatch:
    """Left-padded prompts for generation: every row ends exactly where the answer must begin.

    The prompt is all the model sees besides the image: no caption, no END token. Labels are all ignored.
    """
    width = max(len(p) for p in prompt_ids)
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        if ids:
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    return TextBatch(input_ids, attention_mask, labels)


def decode_caption(tokenizer, token_ids: list[int], end_id: int) -> str:
    """Text up to the first END; special tokens dropped."""
    if end_id in token_ids:
        token_ids = token_ids[: token_ids.index(end_id)]
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()
