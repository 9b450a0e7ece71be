"""The linear projection into the LLM's embedding space: every connector's last layer."""

from __future__ import annotations

import math

from torch import nn


def scaled_projection(in_dim: int, out_dim: int, lm_embedding_rms: float) -> nn.Linear:
    """A connector's last layer, made so that visual tokens start at the scale of the LLM's word embeddings.

    Its inputs come out of a LayerNorm (unit variance per element), so weights of std
    rms/sqrt(in_dim) give outputs of per-element RMS ~= rms. Visual tokens far louder than text
    tokens swamp the LLM's attention; far quieter ones are ignored at the start of training.
    """
    layer = nn.Linear(in_dim, out_dim)
    nn.init.normal_(layer.weight, std=lm_embedding_rms / math.sqrt(in_dim))
    nn.init.zeros_(layer.bias)
    return layer
