"""Is a Q-Former's attention selective? The numbers that showed a scratch Q-Former acting like mean pooling.

For the last layer's cross-attention (heads averaged, as `vlmlab inspect` draws it), over images:
  attn_entropy            mean entropy (nats) of a query's map over the N image tokens;
  attn_entropy_uniform    log N, the entropy of attending to everything equally (mean pooling);
  attn_max_weight         mean of a map's largest weight (1/N when uniform);
  attn_query_correlation  mean Pearson correlation between two different queries' maps of one image
                          (1: every query reads the same places; a query set that divides the image: low).
Where the objects' boxes are known (the synthetic world) and the tokens form a grid, also:
  attn_object_mass        mean share of a query's attention on grid cells that hold an object;
  attn_object_mass_uniform  the share those cells are of the grid (what attending everywhere gives);
  attn_objects_covered    scenes with two or more objects (absent without them): the share of the objects that are some query's
                          favourite (the object its map puts most weight on). 1/objects when every query reads
                          the same object; 1 when the queries divide the objects among them;
  attn_objects_covered_alike  the mean of 1/objects over those scenes: the value when all queries read one object.
"""

from __future__ import annotations

import math

import torch


def object_cells(box, grid: tuple[int, int]) -> torch.Tensor:
    """[h*w] bool, row-major: the grid cells whose centre lies inside box (x0, y0, x1, y1 as fractions of the
    image); a box smaller than a cell gets the cell its centre falls in."""
    h, w = grid
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    x0, y0, x1, y1 = box
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    if not inside.any():
        row = min(h - 1, int((y0 + y1) / 2 * h))
        col = min(w - 1, int((x0 + x1) / 2 * w))
        inside[row, col] = True
    return inside.flatten()


@torch.no_grad()
def attention_stats(
    model,
    image_tokens: torch.Tensor,
    batch_size: int = 64,
    boxes: list[list] | None = None,
    grid: tuple[int, int] | None = None,
) -> dict[str, float]:
    """model: anything with a Q-Former `.connector` (a VLM, a stage-1 model); image_tokens [M, N, D].
    boxes: per image, its objects' boxes (fractions of the image); grid: (h, w) of the N tokens, row-major."""
    connector = getattr(model, "connector", None)
    if connector is None or not hasattr(connector, "queries"):
        raise ValueError("attention statistics need a Q-Former connector (connector.type qformer)")
    was_training = connector.training
    connector.eval()
    device = connector.queries.device
    entropy, max_weight, correlation, count = 0.0, 0.0, 0.0, 0
    num_tokens = image_tokens.shape[1]
    if boxes is not None and len(boxes) != len(image_tokens):
        raise ValueError(f"{len(boxes)} images' boxes for {len(image_tokens)} images")
    by_object = boxes is not None and grid is not None and grid[0] * grid[1] == num_tokens
    object_mass, uniform_mass, covered, alike, scenes = 0.0, 0.0, 0.0, 0.0, 0
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
        if by_object:
            for i, maps_i in enumerate(p):  # [Q, N]
                cells = torch.stack([object_cells(b, grid) for b in boxes[start + i]]).to(p.device)  # [K, N]
                anywhere = cells.any(0)
                object_mass += maps_i[:, anywhere].sum(-1).mean().item()
                uniform_mass += anywhere.float().mean().item()
                if len(cells) >= 2:
                    favourite = (maps_i @ cells.float().T).argmax(-1)  # [Q]: the object each query reads most
                    covered += len(favourite.unique()) / len(cells)
                    alike += 1 / len(cells)
                    scenes += 1
        count += len(batch)
    connector.train(was_training)
    stats = {
        "attn_entropy": entropy / count,
        "attn_entropy_uniform": math.log(num_tokens),
        "attn_max_weight": max_weight / count,
        "attn_query_correlation": correlation / count if connector.num_queries > 1 else float("nan"),
    }
    if by_object:
        stats["attn_object_mass"] = object_mass / count
        stats["attn_object_mass_uniform"] = uniform_mass / count
    if by_object and scenes:
        stats["attn_objects_covered"] = covered / scenes
        stats["attn_objects_covered_alike"] = alike / scenes
    return stats
