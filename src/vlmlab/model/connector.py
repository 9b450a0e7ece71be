"""The connector: where visual tokens are made.

Image tokens from the frozen encoder ([B, N, D_image]) go in; a few *visual tokens* in the LLM's
embedding space ([B, Q, D_lm]) come out, ready to be placed before the prompt.

The BLIP-2 design (`QFormerConnector`): Q learnable query vectors attend to each other
(self-attention), read the image (cross-attention to the image tokens), pass an FFN, repeated for
`depth` layers; a linear projection then maps them to the LLM's width. The number of visual tokens
is Q, whatever the image resolution.

The other arms of the ablation: `MeanPoolConnector` (no spatial detail), `PerTokenConnector`
(LLaVA's linear / MLP projector: no compression), `xattn` (xattn.py: no visual tokens in the prompt, the
LLM reads a Q-Former's outputs through gated cross-attention layers) and `none` (no visual tokens: the
blind LM).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CONNECTOR_TYPES
from .projection import scaled_projection
from .qformer import QFormerConnector
from .xattn import CrossAttentionConnector


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


def check_merge(grid: tuple[int, int] | None, num_image_tokens: int, k: int) -> None:
    """A k x k merge needs the tokens to form a grid whose sides k divides."""
    if grid is None or grid[0] * grid[1] != num_image_tokens or grid[0] % k or grid[1] % k:
        raise ValueError(
            f"connector.merge {k} needs the encoder's token grid divisible by {k}; it is {grid} for "
            f"{num_image_tokens} tokens (EfficientNet: vision.image_size 256 gives 8x8)"
        )


def merge_grid(image_tokens: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Space-to-depth (nanoVLM's pixel shuffle): each k x k block of the token grid becomes one token holding
    the block's k*k vectors side by side, in row-major order: [B, h*w, D] -> [B, (h/k)*(w/k), k*k*D].

    Nothing is averaged away, only regrouped: k=2 on EfficientNet's 8x8 grid at 256 px gives 16 tokens, a
    third of the 49 at 224 px, and the LLM's cost per training token is the same (4.3 ms here), so a step
    costs about what its sequence length does."""
    b, n, d = image_tokens.shape
    check_merge(grid, n, k)
    h, w = grid
    blocks = image_tokens.view(b, h // k, k, w // k, k, d).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, (h // k) * (w // k), k * k * d)


class PerTokenConnector(nn.Module):
    """LLaVA style: every image token becomes one visual token (N in, N out), through a linear map
    (LLaVA-1, depth 1) or a 2-layer GELU MLP (LLaVA-1.5, depth 2). Nothing is compressed.

    With `merge` k > 1 it reads k x k blocks of the grid as one token (`merge_grid`): N / k^2 visual tokens,
    each made from all of its block's vectors, so fewer tokens without pooling anything away."""

    def __init__(
        self,
        image_dim: int,
        lm_dim: int,
        num_image_tokens: int,
        depth: int = 1,
        lm_embedding_rms: float = 1.0,
        merge: int = 1,
        grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"a per-token projector has depth 1 (linear) or 2 (mlp), got {depth}")
        self.num_image_tokens, self.merge, self.grid = num_image_tokens, merge, grid
        if merge > 1:
            check_merge(grid, num_image_tokens, merge)
            image_dim *= merge * merge
        self.num_visual_tokens = num_image_tokens // (merge * merge)
        layers: list[nn.Module] = [nn.LayerNorm(image_dim)]
        if depth == 2:  # the LayerNorm after GELU only fixes the starting scale of the last layer's inputs
            layers += [nn.Linear(image_dim, lm_dim), nn.GELU(), nn.LayerNorm(lm_dim)]
        self.mlp = nn.Sequential(*layers)
        self.projection = scaled_projection(lm_dim if depth == 2 else image_dim, lm_dim, lm_embedding_rms)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if image_tokens.shape[1] != self.num_image_tokens:
            raise ValueError(f"expected {self.num_image_tokens} image tokens, got {image_tokens.shape[1]}")
        if self.merge > 1:
            image_tokens = merge_grid(image_tokens, self.grid, self.merge)
        return self.projection(self.mlp(image_tokens))


def build_connector(
    cfg,
    image_dim: int,
    num_image_tokens: int,
    lm_dim: int,
    lm_embedding_rms: float,
    grid: tuple[int, int] | None = None,
    num_lm_layers: int | None = None,
) -> nn.Module | None:
    """Connector by name from a ConnectorConfig.

    qformer: Q learned queries read the image (BLIP-2); meanpool: one pooled vector -> Q tokens;
    linear / mlp: one visual token per image token (LLaVA-1 / LLaVA-1.5); xattn: a Q-Former read by gated
    cross-attention before every k-th of the LLM's `num_lm_layers` layers (Flamingo); none: no visual tokens
    at all, the blind language-model baseline that shows what the text prior alone can write.
    """
    if cfg.type == "none":
        return None
    if cfg.type == "meanpool":
        return MeanPoolConnector(image_dim, lm_dim, cfg.num_queries, cfg.width, lm_embedding_rms)
    if cfg.type in ("linear", "mlp"):
        depth = 1 if cfg.type == "linear" else 2
        return PerTokenConnector(image_dim, lm_dim, num_image_tokens, depth, lm_embedding_rms, cfg.merge, grid)
    if cfg.type in ("qformer", "xattn"):
        qformer = QFormerConnector(
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
        if cfg.type == "qformer":
            return qformer
        if num_lm_layers is None:
            raise ValueError("connector.type xattn needs the LLM's layer count (num_lm_layers)")
        return CrossAttentionConnector(qformer, lm_dim, num_lm_layers, cfg.xattn_every, cfg.ffn_mult)
    raise ValueError(f"unknown connector.type {cfg.type!r}; allowed: {list(CONNECTOR_TYPES)}")
