"""The contact sheet: a grid a person can look at, one cell per image, every caption labelled."""

import numpy as np
import pytest
from PIL import Image

from vlmlab.eval.contact_sheet import contact_sheet


def _cells(tmp_path, n):
    cells = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (120 + 40 * i, 90), (40 * i, 120, 200)).save(path)
        cells.append(
            {
                "image": str(path),
                "lines": [
                    ("reference", "a blue square " * (i + 1)),
                    ("model", "a square"),
                    ("model, swapped image", ""),
                ],
            }
        )
    return cells


def test_grid_size_follows_the_number_of_images(tmp_path):
    small = Image.open(contact_sheet(_cells(tmp_path, 2), tmp_path / "two.png", columns=4))
    big = Image.open(contact_sheet(_cells(tmp_path, 6), tmp_path / "six.png", columns=4, title="six"))
    assert big.width > small.width  # 4 columns instead of 2
    assert big.height > 1.5 * small.height  # 2 rows instead of 1
    # the picture itself is drawn: the sheet holds the images' blue, not only white and text
    r, g, b = np.asarray(big.convert("RGB")).astype(int).transpose(2, 0, 1)
    assert ((b > 180) & (r < 100) & (g < 150)).sum() > 1000


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([], tmp_path / "none.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        contact_sheet([{"image": str(tmp_path / "missing.png"), "lines": [("model", "x")]}], tmp_path / "x.png")
