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

import math

import torch
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


class QFormerLayer(nn.Module):
    """Pre-norm block: queries talk to each other, then look at the image, then think (FFN)."""

    def __init__(self, width: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width),
            nn.GELU(),
            nn.Linear(ffn_mult * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, queries: torch.Tensor, image: torch.Tensor, need_weights: bool = False):
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.norm_cross(queries)
        read, weights = self.cross_attn(x, image, image, need_weights=need_weights)  # weights: [B, Q, N]
        queries = queries + read
        queries = queries + self.ffn(self.norm_ffn(queries))
        return queries, weights


class QFormerConnector(nn.Module):
    """Learnable queries + cross-attention to image tokens, then a linear projection to the LLM width."""

    def __init__(
        self,
        image_dim: int,
        lm_dim: int,
        num_image_tokens: int,
        num_queries: int = 16,
        depth: int = 2,
        width: int = 256,
        heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        lm_embedding_rms: float = 1.0,
    ):
        super().__init__()
        if num_queries < 1 or depth < 1 or width % heads != 0:
            raise ValueError(f"bad Q-Former shape: queries={num_queries} depth={depth} width={width} heads={heads}")
        self.num_queries = num_queries
        self.image_norm = nn.LayerNorm(image_dim)  # encoder features have arbitrary scale (ReLU6 maps, ViT states)
        self.image_in = nn.Linear(image_dim, width)
        # Cross-attention sees the image tokens as a set; a learned position per token lets a query
        # tell "top left" from "bottom right" (a ViT's features carry this already, a CNN's barely).
        self.image_pos = nn.Parameter(torch.randn(1, num_image_tokens, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.layers = nn.ModuleList(QFormerLayer(width, heads, ffn_mult, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        # the "linear projection" into the LLM's embedding space
        self.projection = scaled_projection(width, lm_dim, lm_embedding_rms)

    @property
    def num_visual_tokens(self) -> int:
        return self.num_queries

    def forward(self, image_tokens: torch.Tensor, return_attention: bool = False):
        """image_tokens [B, N, D_image] -> visual tokens [B, Q, D_lm] (and per-layer cross-attention [B, Q, N])."""
        if image_tokens.shape[1] != self.image_pos.shape[1]:
            raise ValueError(f"expected {self.image_pos.shape[1]} image tokens, got {image_tokens.shape[1]}")
        image = self.image_in(self.image_norm(image_tokens)) + self.image_pos
        queries = self.queries.expand(image.shape[0], -1, -1)
        attention = []
        for layer in self.layers:
            queries, weights = layer(queries, image, need_weights=return_attention)
            attention.append(weights)
        visual_tokens = self.projection(self.out_norm(queries))
        return (visual_tokens, attention) if return_attention else visual_tokens


class MeanPoolConnector(nn.Module):
    """The "no Q-Former" arm: average the image tokens into one vector, then an MLP to Q visual tokens.

    Pooling throws away where things are; the MLP (ClipCap-style prefix) keeps the number of visual
    tokens equal to the Q-Former's, so an ablation changes one thing: spatial detail.
    """

    def __init__(self, image_dim: int, lm_dim: int, num_tokens: int = 16, width: int = 256, lm_embedding_rms: float = 1.0):
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

    def __init__(self, image_dim: int, lm_dim: int, num_image_tokens: int, depth: int = 1, lm_embedding_rms: float = 1.0):
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


def build_connector(cfg, image_dim: int, num_image_tokens: int, lm_dim: int, lm_embedding_rms: float) -> nn.Module | None:
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
