"""A contact sheet: test images in a grid, each with a reference caption and what each captioner wrote.

Reading a table of scores says *how much*; looking at twenty pictures with their captions says
*what*: whether "a dog on the grass" is really a dog, and whether the caption under a swapped image
is a caption of the other picture or the same sentence again.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from .data.formats import load_image


def contact_sheet(
    cells: list[dict],
    out_png: str | Path,
    columns: int = 4,
    title: str | None = None,
    thumb_px: int = 256,
    wrap: int = 44,
) -> Path:
    """Draws `cells` ({"image": path, "lines": [(label, text), ...]}) as a grid of images with captions below.

    The first line is drawn in grey (the reference), the others in black; every line is labelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cells:
        raise ValueError("a contact sheet needs at least one image")
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    wrapped = [
        [(label, textwrap.wrap(f"{label}: {text}", wrap) or [f"{label}:"]) for label, text in cell["lines"]]
        for cell in cells
    ]
    text_lines = max(sum(len(w) for _, w in cell) for cell in wrapped)
    text_h = 0.17 * text_lines + 0.15  # inches below each picture
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, (3.4 + text_h) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, cell, lines in zip(axes.flat, cells, wrapped):
        image = load_image(cell["image"])
        image.thumbnail((thumb_px, thumb_px))
        ax.imshow(image)
        ax.set_title(Path(cell["image"]).name, fontsize=7, color="0.4")
        y = -0.03
        for i, (_, chunk) in enumerate(lines):
            ax.text(0.0, y, "\n".join(chunk), transform=ax.transAxes, va="top", ha="left", fontsize=7.5,
                    color="0.45" if i == 0 else "black", fontweight="bold" if i == 1 else "normal")  # fmt: skip
            y -= (0.17 * len(chunk) + 0.03) / 3.1  # inches -> axes fraction (the picture is ~3.1 in tall)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
