"""The LM's context: how many positions a prompt may take, and what happens to one that needs more.

Visual tokens, the prompt and the tokens to generate share the LM's positions (max_position_embeddings;
GPT-2 calls it n_positions). Past them a model with learned positions (GPT-2) fails inside generate with
"index out of range in self", and one with rotary positions (SmolLM2, 8192) reads positions it never
trained on. So a prompt that does not fit is refused, naming the numbers, or, where asked, cut: an
evaluation over a question set cuts (and counts) the one long question instead of losing the whole run.
"""

from __future__ import annotations

from ..data.formats import InputError
from .conversation import EncodedConversation


class PromptTooLong(InputError):
    """A prompt that does not fit the LM's context with its visual tokens and the tokens to generate."""

    def __init__(self, message: str, row: int = 0):
        super().__init__(message)
        self.row = row  # which prompt of a batch


def context_length(lm_config) -> int | None:
    """The positions an LM reads, from its transformers config; None where the config names none."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(lm_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def too_long(tokens: int, visual: int, new_tokens: int, context: int) -> str:
    """Why a prompt of `tokens` text tokens does not fit: the numbers, and what the user can change."""
    need = tokens + visual + new_tokens
    return (
        f"the prompt is {tokens} tokens; with {visual} visual tokens and {new_tokens} tokens to generate it needs "
        f"{need} positions, and the language model reads {context} (its max_position_embeddings): "
        f"shorten it by {need - context} tokens"
    )


def fit_prompt(
    encoded: EncodedConversation, visual: int, new_tokens: int, context: int | None, cut: bool, row: int = 0
) -> EncodedConversation:
    """The prompt as it fits the context: unchanged when it fits; else PromptTooLong, or (cut=True) its middle
    dropped: the tokens before the image (the chat template's start) and the last tokens (the end of the
    question, the answer instructions and the assistant's header) stay, as much of each as fits."""
    if context is None or len(encoded.ids) + visual + new_tokens <= context:
        return encoded
    budget = context - visual - new_tokens
    if not cut or budget < 2:
        raise PromptTooLong(too_long(len(encoded.ids), visual, new_tokens, context), row)
    head = min(encoded.image_position or 0, budget // 2)
    tail = len(encoded.ids) - (budget - head)
    position = None if encoded.image_position is None else min(encoded.image_position, head)
    return EncodedConversation(
        encoded.ids[:head] + encoded.ids[tail:], encoded.labels[:head] + encoded.labels[tail:], position, True
    )
