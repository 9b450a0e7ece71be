"""Conversations as token ids and labels, right by construction (the multi-turn sibling of sequence.py).

Each piece of a chat format (chat_format.py) is tokenised on its own and its ids are labelled by the
piece's kind: assistant replies and their end token are supervised, everything else is IGNORE_INDEX.
Supervision therefore comes from lengths, never from looking for token ids (a GPT-2 pad token equal to
its end token cannot mask the end token, and a user turn that quotes "<|im_end|>" cannot be supervised).

The image is a slot, not a token: `image_position` is the index in the text ids where the visual tokens
are spliced in (vlm.py), inside the user turn where the `<image>` placeholder was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chat_format import build_pieces
from .sequence import IGNORE_INDEX, TextBatch


@dataclass
class EncodedConversation:
    ids: list[int]
    labels: list[int]
    image_position: int | None  # where the visual tokens go; None: no image in this conversation
    truncated: bool = False


def encode_conversation(
    tokenizer,
    fmt: str,
    messages: list[dict],
    end_id: int,
    max_tokens: int | None = None,
    generation: bool = False,
    image: bool = True,
) -> EncodedConversation:
    """Token ids, labels and the image slot of one conversation; cut to `max_tokens` text tokens.

    A cut that falls inside an answer keeps the answer's first tokens supervised and no end token: the
    model is never taught that an answer ends where the budget did.
    """
    ids: list[int] = []
    labels: list[int] = []
    image_position = None
    for piece in build_pieces(fmt, messages, generation=generation, image=image):
        if piece.image:
            image_position = len(ids)
            continue
        piece_ids = [end_id] if piece.end else tokenizer(piece.text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if piece.supervised else [IGNORE_INDEX] * len(piece_ids)
    truncated = max_tokens is not None and len(ids) > max_tokens
    if truncated:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        if image_position is not None and image_position > max_tokens:
            image_position = max_tokens
    return EncodedConversation(ids, labels, image_position, truncated)


def conversation_batch(encoded: list[EncodedConversation], pad_id: int, left_pad: bool = False) -> TextBatch:
    """Pads a batch (right for training, left for generation) and records each row's image slot."""
    width = max(len(e.ids) for e in encoded)
    batch = len(encoded)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(batch, dtype=torch.long)
    present = torch.tensor([e.image_position is not None for e in encoded])
    for i, e in enumerate(encoded):
        start = width - len(e.ids) if left_pad else 0
        if e.ids:
            input_ids[i, start : start + len(e.ids)] = torch.tensor(e.ids)
            attention_mask[i, start : start + len(e.ids)] = 1
            labels[i, start : start + len(e.ids)] = torch.tensor(e.labels)
        positions[i] = start + (e.image_position if e.image_position is not None else 0)
    return TextBatch(input_ids, attention_mask, labels, image_positions=positions, image_present=present)
