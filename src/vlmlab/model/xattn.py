"""Cross-attention fusion (the Flamingo / BLIP family): the image enters the LLM's layers, not its prompt.

A Q-Former (the resampler) reads the encoder's tokens into Q vectors, the *memory*. Before every k-th decoder
layer of the frozen LLM a gated cross-attention block lets each text position read that memory:

    x <- x + tanh(a) * CrossAttn(LN(x), LN(memory))
    x <- x + tanh(b) * FFN(LN(x))

with the gates a and b initialised at zero, as in Flamingo, so that before training the model is exactly the
LLM (+ LoRA) and the image's influence grows only as far as training opens the gates. No visual tokens go into
the prefix: the sequence is the text alone, at the text's own positions.

The blocks belong to the connector (saved, resumed and exported with it, counted in its parameters); forward
pre-hooks on the chosen decoder layers apply them to the layer's input, reading the memory that
`VLM._embed` attaches for the batch it builds (`attach`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .qformer import QFormerConnector


class GatedCrossAttention(nn.Module):
    """One tanh-gated cross-attention + feed-forward block at the LLM's width (attention inside at `width`)."""

    def __init__(self, dim: int, width: int, heads: int, ffn_width: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"cross-attention width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.memory_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, width, bias=False)
        self.key_value = nn.Linear(dim, 2 * width, bias=False)
        self.out = nn.Linear(width, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_width), nn.GELU(), nn.Linear(ffn_width, dim))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D] text states, memory [B, Q, D], present [B] (1: the row has an image, 0: it reads nothing)."""
        b, t, _ = x.shape
        q = self.query(self.norm(x)).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.key_value(self.memory_norm(memory)).chunk(2, dim=-1)
        k = k.reshape(b, memory.shape[1], self.heads, -1).transpose(1, 2)
        v = v.reshape(b, memory.shape[1], self.heads, -1).transpose(1, 2)
        read = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        gate = present[:, None, None] if present is not None else 1.0
        x = x + gate * torch.tanh(self.attn_gate) * self.out(read)
        return x + gate * torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x))


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: `layers` (Llama, SmolLM2) or `h` (GPT-2)."""
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(f"{type(decoder).__name__}: no decoder layer list (`layers` or `h`) to put cross-attention in")


class CrossAttentionConnector(nn.Module):
    """connector.type xattn: a Q-Former resampler whose outputs the LLM reads through gated cross-attention
    before decoder layers 0, k, 2k, ... (k = connector.xattn_every); no prefix tokens."""

    fuses_inside = True  # VLM._embed attaches the memory instead of splicing visual tokens into the prompt
    num_visual_tokens = 0

    def __init__(self, resampler: QFormerConnector, lm_dim: int, num_lm_layers: int, every: int = 6, ffn_mult: int = 4):
        """resampler: the Q-Former whose outputs (at the LLM's width) the blocks read, at its width and heads."""
        super().__init__()
        if every < 1:
            raise ValueError(f"connector.xattn_every must be >= 1, got {every}")
        self.resampler = resampler
        width, heads = resampler.queries.shape[-1], resampler.layers[0].cross_attn.num_heads
        self.layer_ids = list(range(0, num_lm_layers, every))
        self.blocks = nn.ModuleList(GatedCrossAttention(lm_dim, width, heads, width * ffn_mult) for _ in self.layer_ids)
        self.memory: torch.Tensor | None = None
        self.present: torch.Tensor | None = None
        self._hooks: list = []

    # the Q-Former's face, so attention statistics, maps and stage-1 checks read the resampler
    @property
    def queries(self) -> nn.Parameter:
        return self.resampler.queries

    @property
    def num_queries(self) -> int:
        return self.resampler.num_queries

    def forward(self, image_tokens: torch.Tensor, return_attention: bool = False):
        """image_tokens [B, N, D_image] -> the memory [B, Q, D_lm] the cross-attention reads (and the Q-Former's
        per-layer attention maps)."""
        return self.resampler(image_tokens, return_attention=return_attention)

    def attach(self, memory: torch.Tensor | None, present: torch.Tensor | None = None) -> None:
        """The memory the next LLM passes read (None: they read nothing and the LLM runs as it is); present [B]
        marks the rows that have an image."""
        self.memory = memory
        self.present = None if present is None or memory is None else present.to(memory.device, memory.dtype)

    def install(self, layers: nn.ModuleList) -> None:
        """Puts block i before decoder layer layer_ids[i] (a forward pre-hook: the layer's own weights untouched)."""
        for handle in self._hooks:
            handle.remove()
        if self.layer_ids and self.layer_ids[-1] >= len(layers):
            raise ValueError(f"cross-attention before layer {self.layer_ids[-1]}, but the LLM has {len(layers)}")
        self._hooks = [
            layers[i].register_forward_pre_hook(self._hook(block), with_kwargs=True)
            for i, block in zip(self.layer_ids, self.blocks)
        ]

    def _hook(self, block: GatedCrossAttention):
        def apply(_module, args, kwargs):
            if self.memory is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            memory, present = self.memory, self.present
            if hidden.shape[0] != memory.shape[0]:  # beam search repeats each row num_beams times
                if hidden.shape[0] % memory.shape[0]:
                    raise ValueError(f"cross-attention memory for {memory.shape[0]} rows, text has {hidden.shape[0]}")
                repeat = hidden.shape[0] // memory.shape[0]
                memory = memory.repeat_interleave(repeat, dim=0)
                present = None if present is None else present.repeat_interleave(repeat, dim=0)
            fused = block(hidden, memory.to(hidden.dtype), None if present is None else present.to(hidden.dtype))
            if args:
                return (fused, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fused}

        return apply
