"""`vlmlab inspect`: per-query cross-attention maps over the image grid, and nearest vocabulary tokens."""

import json

import numpy as np
import torch
from PIL import Image

from vlmlab.analysis.inspect import inspect_image, nearest_vocabulary
from vlmlab.cli import main as cli_main
from vlmlab.run import load_run
from vlmlab.train.loop import train


def test_attention_maps_and_nearest_tokens(tmp_path, tiny_config, monkeypatch, capsys):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    run = train(tiny_config(tmp_path, "train.max_steps=3", "connector.depth=2"))
    model = load_run(run)
    images = sorted((tmp_path / "world" / "images").glob("*.png"))
    a, b = inspect_image(model, images[0], top_k=4), inspect_image(model, images[1], top_k=4)
    assert a.attention.shape == (2, 4, 4, 4)  # layers, queries, the tiny CLIP's 4x4 patch grid
    original = np.asarray(Image.open(images[0]).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    shown = np.asarray(a.image, dtype=np.float32).mean(axis=(0, 1))
    assert np.abs(original - shown).max() < 12, (original, shown)  # drawn in its own colours, not re-stretched
    assert np.allclose(a.attention.sum(axis=(2, 3)), 1.0, atol=1e-5)  # each query's attention is a distribution
    assert not np.allclose(a.attention, b.attention)  # where the queries look depends on the image
    assert len(a.nearest) == 4 and all(len(row) == 4 for row in a.nearest)
    assert all(row[i][1] >= row[i + 1][1] for row in a.nearest for i in range(3))  # nearest first

    # nearest_vocabulary against a brute-force search: a word's own embedding finds itself first
    table = model.lm.get_input_embeddings().weight
    ids = [model.tokenizer.encode(" red")[0], model.tokenizer.encode(" circle")[0]]
    found = nearest_vocabulary(model, table[ids].detach(), top_k=1)
    assert [row[0][0] for row in found] == [" red", " circle"]

    assert cli_main(["inspect", str(run), str(images[0]), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "visual token  0:" in out and "heat maps:" in out
    png = run / "inspect" / f"{images[0].stem}.png"
    assert png.stat().st_size > 5000
    record = json.loads((run / "inspect" / f"{images[0].stem}.json").read_text())
    assert np.array(record["attention"]).shape == (2, 4, 4, 4)


def test_connectors_without_queries_give_tokens_only(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    run = train(tiny_config(tmp_path, "train.max_steps=1", "connector.type=linear"))
    image = sorted((tmp_path / "world" / "images").glob("*.png"))[0]
    result = inspect_image(load_run(run), image)
    assert result.attention is None and len(result.nearest) == 16  # one visual token per image patch
    with torch.no_grad():
        assert isinstance(result.caption, str)
