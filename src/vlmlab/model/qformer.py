"""The BLIP-2 Q-Former as a connector: learned queries read the image through cross-attention.

Q learnable query vectors attend to each other (self-attention), read the image (cross-attention to
the image tokens), pass an FFN, repeated for `depth` layers; a linear projection then maps them to
the LLM's width. The number of visual tokens is Q, whatever the image resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from .projection import scaled_projection


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

    def forward_with_text(
        self, queries: torch.Tensor, text: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, text_side: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP-2 stage 1: queries [B, Q, W] and text [B, T, W] share this layer's self-attention under `mask`
        ([B*heads, Q+T, Q+T], True = may not attend); only the queries read the image; the text passes its
        own norm + FFN (`text_side`, a TextFFN kept outside the connector so that its names stay those of
        finished runs, and dropped at stage 2)."""
        num_queries = queries.shape[1]
        both = torch.cat([queries, text], dim=1)
        x = self.norm_self(both)
        both = both + self.self_attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        queries, text = both[:, :num_queries], both[:, num_queries:]
        x = self.norm_cross(queries)
        queries = queries + self.cross_attn(x, image, image, need_weights=False)[0]
        queries = queries + self.ffn(self.norm_ffn(queries))
        return queries, text + text_side(text)


class TextFFN(nn.Module):
    """The text positions' own FFN in a Q-Former layer (BLIP-2 gives text and queries separate FFNs: the
    queries' FFN then learns only from what the queries carry, which is all that stage 2 uses)."""

    def __init__(self, width: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width), nn.Dropout(dropout)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.norm(text))


# The three attention patterns of BLIP-2 stage 1 over [queries][text] (LAVIS blip2_qformer.py):
#   itc: queries see queries, text sees text (two unimodal encoders sharing weights);
#   itm: everything sees everything (the matching head reads queries that have seen the text);
#   itg: queries see queries only, text token t sees every query and the text tokens <= t.
STAGE1_MASKS = ("itc", "itm", "itg")


def stage1_mask(mode: str, num_queries: int, text_padding: torch.Tensor) -> torch.Tensor:
    """-> [B, Q+T, Q+T] bool, True where a position (row) may NOT attend to another (column).

    text_padding [B, T] is True at padded text positions: nobody attends to them (a padded row still sees
    something: the first text token or the queries, so no row is fully masked)."""
    if mode not in STAGE1_MASKS:
        raise ValueError(f"unknown stage-1 mask {mode!r}; allowed: {STAGE1_MASKS}")
    batch, text_len = text_padding.shape
    total = num_queries + text_len
    blocked = torch.zeros(total, total, dtype=torch.bool, device=text_padding.device)
    q, t = slice(0, num_queries), slice(num_queries, total)
    if mode in ("itc", "itg"):
        blocked[q, t] = True  # queries never see the text
    if mode == "itc":
        blocked[t, q] = True  # nor the text the queries
    if mode == "itg":
        blocked[t, t] = torch.triu(torch.ones(text_len, text_len, dtype=torch.bool, device=blocked.device), 1)
    pad = torch.cat([torch.zeros(batch, num_queries, dtype=torch.bool, device=blocked.device), text_padding], 1)
    return blocked.unsqueeze(0) | pad.unsqueeze(1)


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

    def encode_with_text(
        self,
        image_tokens: torch.Tensor,
        text: torch.Tensor,
        text_padding: torch.Tensor,
        mode: str,
        text_sides: nn.ModuleList,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: image tokens [B, N, D] and embedded text [B, T, W] through the layers under one of the
        STAGE1_MASKS -> (query states [B, Q, W], text states [B, T, W]), both after out_norm (no projection:
        stage 1 never talks to the LLM)."""
        image = self.image_in(self.image_norm(image_tokens)) + self.image_pos
        queries = self.queries.expand(image.shape[0], -1, -1)
        heads = self.layers[0].self_attn.num_heads
        mask = stage1_mask(mode, self.num_queries, text_padding).repeat_interleave(heads, dim=0)
        for layer, text_side in zip(self.layers, text_sides):
            queries, text = layer.forward_with_text(queries, text, image, mask, text_side)
        return self.out_norm(queries), self.out_norm(text)
