"""Is a Q-Former's attention selective? The numbers that showed a scratch Q-Former acting like mean pooling.

For the last layer's cross-attention (heads averaged, as `vlmlab inspect` draws it), over images:
  attn_entropy            mean entropy (nats) of a query's map over the N image tokens;
  attn_entropy_uniform    log N, the entropy of attending to everything equally (mean pooling);
  attn_max_weight         mean of a map's largest weight (1/N when uniform);
  attn_query_correlation  mean Pearson correlation between two different queries' maps of one image
                          (1: every query reads the same places; a query set that divides the image: low).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def attention_stats(model, image_tokens: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """model: anything with a Q-Former `.connector` (a VLM, a stage-1 model); image_tokens [M, N, D]."""
    connector = getattr(model, "connector", None)
    if connector is None or not hasattr(connector, "queries"):
        raise ValueError("attention statistics need a Q-Former connector (connector.type qformer)")
    was_training = connector.training
    connector.eval()
    device = connector.queries.device
    entropy, max_weight, correlation, count = 0.0, 0.0, 0.0, 0
    num_tokens = image_tokens.shape[1]
    for start in range(0, len(image_tokens), batch_size):
        batch = image_tokens[start : start + batch_size].to(device, torch.float32)
        _, maps = connector(batch, return_attention=True)
        p = maps[-1].float()  # [B, Q, N]
        entropy += -(p * p.clamp_min(1e-12).log()).sum(-1).mean(-1).sum().item()
        max_weight += p.max(-1).values.mean(-1).sum().item()
        q = p.shape[1]
        if q > 1:
            centred = p - p.mean(-1, keepdim=True)
            unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            corr = unit @ unit.transpose(1, 2)  # [B, Q, Q]
            off_diagonal = (corr.sum((1, 2)) - corr.diagonal(dim1=1, dim2=2).sum(-1)) / (q * (q - 1))
            correlation += off_diagonal.sum().item()
        count += len(batch)
    connector.train(was_training)
    return {
        "attn_entropy": entropy / count,
        "attn_entropy_uniform": math.log(num_tokens),
        "attn_max_weight": max_weight / count,
        "attn_query_correlation": correlation / count if connector.num_queries > 1 else float("nan"),
    }
