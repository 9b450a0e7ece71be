"""The connector: where visual tokens are made.

Image tokens from the frozen encoder ([B, N, D_image]) go in; a few *visual tokens* in the LLM's
embedding space ([B, Q, D_lm]) come out, ready to be placed before the prompt.

The BLIP-2 design (`QFormerConnector`): Q learnable query vectors attend to each other
(self-attention), read the image (cross-attention to the image tokens), pass an FFN, repeated for
`depth` layers; a linear projection then maps them to the LLM's width. The number of visual tokens
is Q, whatever the image resolution.

The other arms of the ablation: `MeanPoolConnector` (no spatial detail), `PerTokenConnector`
(LLaVA's linear / MLP projector: no compression), and `none` (no visual tokens: the blind LM).
"""

from __future__ import annotations

import torch
from torch import nn

from .projection import scaled_projection
from .qformer import QFormerConnector


class MeanPoolConnector(nn.Module):
    """The "no Q-Former" arm: average the image tokens into one vector, then an MLP to Q visual tokens.

    Pooling throws away where things are; the MLP (ClipCap-style prefix) keeps the number of visual
    tokens equal to the Q-Former's, so an ablation changes one thing: spatial detail.
    """

    def __init__(
        self, image_dim: int, lm_dim: int, num_tokens: int = 16, width: int = 256, lm_embedding_rms: float = 1.0
    ):
        super().__init__()
        self.num_visual_tokens, self.lm_dim = num_tokens, lm_dim
        self.mlp = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, width), nn.GELU(), nn.LayerNorm(width))
        self.projection = scaled_projection(width, num_tokens * lm_dim, lm_embedding_rms)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        pooled = image_tokens.mean(dim=1)  # [B, D_image]: one vector per image
        return self.projection(self.mlp(pooled)).view(-1, self.num_visual_tokens, self.lm_dim)


class PerTokenConnector(nn.Module):
    """LLaVA style: every image token becomes one visual token (N in, N out), through a linear map
    (LLaVA-1, depth 1) or a 2-layer GELU MLP (LLaVA-1.5, depth 2). Nothing is compressed."""

    def __init__(
        self, image_dim: int, lm_dim: int, num_image_tokens: int, depth: int = 1, lm_embedding_rms: float = 1.0
    ):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"a per-token projector has depth 1 (linear) or 2 (mlp), got {depth}")
        self.num_visual_tokens = num_image_tokens
        layers: list[nn.Module] = [nn.LayerNorm(image_dim)]
        if depth == 2:  # the LayerNorm after GELU only fixes the starting scale of the last layer's inputs
            layers += [nn.Linear(image_dim, lm_dim), nn.GELU(), nn.LayerNorm(lm_dim)]
        self.mlp = nn.Sequential(*layers)
        self.projection = scaled_projection(lm_dim if depth == 2 else image_dim, lm_dim, lm_embedding_rms)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if image_tokens.shape[1] != self.num_visual_tokens:
            raise ValueError(f"expected {self.num_visual_tokens} image tokens, got {image_tokens.shape[1]}")
        return self.projection(self.mlp(image_tokens))


CONNECTOR_TYPES = ("qformer", "meanpool", "linear", "mlp", "none")


def build_connector(
    cfg, image_dim: int, num_image_tokens: int, lm_dim: int, lm_embedding_rms: float
) -> nn.Module | None:
    """Connector by name from a ConnectorConfig.

    qformer: Q learned queries read the image (BLIP-2); meanpool: one pooled vector -> Q tokens;
    linear / mlp: one visual token per image token (LLaVA-1 / LLaVA-1.5); none: no visual tokens at
    all, the blind language-model baseline that shows what the text prior alone can write.
    """
    if cfg.type == "none":
        return None
    if cfg.type == "meanpool":
        return MeanPoolConnector(image_dim, lm_dim, cfg.num_queries, cfg.width, lm_embedding_rms)
    if cfg.type in ("linear", "mlp"):
        depth = 1 if cfg.type == "linear" else 2
        return PerTokenConnector(image_dim, lm_dim, num_image_tokens, depth, lm_embedding_rms)
    if cfg.type == "qformer":
        return QFormerConnector(
            image_dim,
            lm_dim,
            num_image_tokens,
            num_queries=cfg.num_queries,
            depth=cfg.depth,
            width=cfg.width,
            heads=cfg.heads,
            ffn_mult=cfg.ffn_mult,
            dropout=cfg.dropout,
            lm_embedding_rms=lm_embedding_rms,
        )
    raise ValueError(f"unknown connector.type {cfg.type!r}; allowed: {list(CONNECTOR_TYPES)}")
