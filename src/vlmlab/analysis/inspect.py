"""Inside the Q-Former: where each query looks in the image, and what its visual token "means" to the LLM.

For one image: the cross-attention of every query over the encoder's token grid (per layer, averaged over
heads), drawn as heat maps on the image, and per query the LLM-vocabulary tokens whose input embeddings are
nearest (cosine) to the visual token that query becomes. Connectors without queries (meanpool, linear, mlp)
get the nearest tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import write_atomic
from ..data.formats import load_image
from ..model.language_model import base_causal_lm


@dataclass
class Inspection:
    image: Image.Image  # as the encoder saw it (resized / cropped by its preprocessing)
    caption: str
    attention: np.ndarray | None  # [layers, queries, grid_h, grid_w]; None without a Q-Former
    nearest: list[list[tuple[str, float]]]  # per visual token: (vocabulary token, cosine), nearest first


@torch.no_grad()
def inspect_image(model, image_path: str | Path, top_k: int = 5) -> Inspection:
    if model.blind:
        raise ValueError("this run has no connector (connector.type none): it makes no visual tokens to inspect")
    image = load_image(image_path)
    image_tokens = model.encode_images([image])
    connector = model.connector
    attention = None
    if hasattr(connector, "queries"):  # a Q-Former, or the resampler an xattn connector's layers read
        visual, maps = connector(image_tokens.float(), return_attention=True)
        h, w = model.vision.grid_size
        attention = torch.stack([m[0] for m in maps]).reshape(len(maps), -1, h, w).cpu().numpy()
    else:
        visual = connector(image_tokens.float())
    caption = model.generate_from_tokens(image_tokens)[0]
    return Inspection(_as_seen(model, image), caption, attention, nearest_vocabulary(model, visual[0], top_k))


def nearest_vocabulary(model, visual_tokens: torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Per visual token [Q, D], the top_k vocabulary tokens by cosine similarity of input embeddings."""
    table = base_causal_lm(model.lm).get_input_embeddings().weight.float()
    similarity = F.normalize(visual_tokens.float().to(table.device), dim=-1) @ F.normalize(table, dim=-1).T
    values, ids = similarity.topk(top_k, dim=-1)
    return [
        [(model.tokenizer.decode([i]), round(v, 3)) for i, v in zip(row_ids.tolist(), row_values.tolist())]
        for row_ids, row_values in zip(ids, values)
    ]


def _as_seen(model, image: Image.Image) -> Image.Image:
    """The encoder's input as a picture (undoing its normalisation), so heat maps sit on what it saw."""
    pixels = model.vision.preprocess([image])[0].float()
    mean = torch.tensor(model.vision.mean).view(3, 1, 1)
    std = torch.tensor(model.vision.std).view(3, 1, 1)
    rgb = (pixels * std + mean).clamp(0, 1)  # preprocessing works on [0, 1] pixels
    return Image.fromarray((rgb * 255).round().byte().permute(1, 2, 0).numpy())


def draw_inspection(result: Inspection, out_png: str | Path, title: str = "", layer: int = -1) -> Path:
    """A grid: the image with its caption, then one panel per query (heat map of layer `layer`) titled with
    the query's nearest vocabulary tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.nearest)
    panels = n + 1 if result.attention is not None else 1
    cols = min(panels, 6)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    size = result.image.size
    axes[0, 0].imshow(result.image)
    axes[0, 0].set_title(_wrap(result.caption, 34), fontsize=8)
    if result.attention is not None:
        for q in range(n):
            ax = axes.flat[q + 1]
            heat = result.attention[layer, q]
            heat = np.asarray(
                Image.fromarray((heat / max(heat.max(), 1e-9) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
            )
            ax.imshow(result.image)
            ax.imshow(heat, cmap="inferno", alpha=0.6)
            words = " ".join(repr(t) for t, _ in result.nearest[q][:3])
            ax.set_title(f"query {q}: {_wrap(words, 30)}", fontsize=7)
    else:
        text = "\n".join(
            f"token {q}: " + " ".join(repr(t) for t, _ in toks[:4]) for q, toks in enumerate(result.nearest[:12])
        )
        fig.text(
            0.02, 0.02, "no queries (no cross-attention); nearest vocabulary tokens:\n" + text, fontsize=7, va="bottom"
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_png, lambda path: fig.savefig(path, dpi=90))
    plt.close(fig)
    return out_png


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def inspect_run(
    run_dir: str | Path, image_path: str | Path, out_dir: str | Path | None = None, top_k: int = 5, layer: int = -1
) -> tuple[Path, Inspection]:
    """`vlmlab inspect`: writes RUN_DIR/inspect/<image>.png and .json; returns the picture's path."""
    from ..run import load_run

    model = load_run(run_dir)
    result = inspect_image(model, image_path, top_k)
    out = Path(out_dir or Path(run_dir) / "inspect")
    stem = Path(image_path).stem
    layer_name = "last" if layer == -1 else str(layer)
    png = draw_inspection(
        result,
        out / f"{stem}.png",
        f"{Path(run_dir).name}: cross-attention (layer {layer_name}) and nearest vocabulary tokens per query",
    )
    record = {
        "image": str(image_path),
        "caption": result.caption,
        "nearest_tokens": result.nearest,
        "attention": None if result.attention is None else result.attention.round(4).tolist(),
    }
    write_atomic(out / f"{stem}.json", json.dumps(record))
    return png, result
