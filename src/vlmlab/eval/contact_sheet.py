"""A contact sheet: test images in a grid, each with a reference caption and what each captioner wrote.

Reading a table of scores says *how much*; looking at twenty pictures with their captions says
*what*: whether "a dog on the grass" is really a dog, and whether the caption under a swapped image
is a caption of the other picture or the same sentence again.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..config import write_atomic
from ..data.formats import load_image


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
    from matplotlib.transforms import offset_copy

    if not cells:
        raise ValueError("a contact sheet needs at least one image")
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    wrapped = [
        [textwrap.wrap(f"{label}: {text}", wrap) or [f"{label}:"] for label, text in cell["lines"]] for cell in cells
    ]
    line_h = 0.14  # inches per printed line at fontsize 7.5
    text_h = 1.3 * max(line_h * sum(len(w) for w in cell) + 2 * len(cell) / 72 for cell in wrapped) + 0.15
    image_h = 2.8
    height = (image_h + text_h + 0.3) * rows + (0.5 if title else 0.1)
    fig = plt.figure(figsize=(3.6 * columns, height))
    grid = fig.add_gridspec(
        2 * rows,
        columns,
        height_ratios=[image_h, text_h] * rows,
        hspace=0.1,
        wspace=0.06,
        top=1 - (0.5 if title else 0.1) / height,
        bottom=0.0,
        left=0.01,
        right=0.99,
    )
    for n, (cell, lines) in enumerate(zip(cells, wrapped)):
        r, c = divmod(n, columns)
        picture, caption = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
        picture.axis("off")
        caption.axis("off")
        image = load_image(cell["image"])
        image.thumbnail((thumb_px, thumb_px))
        picture.imshow(image)
        picture.set_title(Path(cell["image"]).name, fontsize=7, color="0.4")
        printed = 0  # lines so far: each label starts below the last, offset in points from the top
        for i, chunk in enumerate(lines):
            where = offset_copy(caption.transAxes, fig=fig, y=-printed * line_h * 72 - 2 * i, units="points")
            caption.text(
                0.0,
                1.0,
                "\n".join(chunk),
                transform=where,
                va="top",
                ha="left",
                fontsize=7.5,
                linespacing=1.15,
                color="0.45" if i == 0 else "black",
                fontweight="bold" if i == 1 else "normal",
            )
            printed += len(chunk)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    out_png = Path(out_png)
    write_atomic(out_png, lambda path: fig.savefig(path, dpi=90, bbox_inches="tight"))
    plt.close(fig)
    return out_png
