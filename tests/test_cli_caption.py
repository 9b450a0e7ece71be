"""`vlmlab caption` over many inputs: each bad image is named on stderr, the good ones are still captioned,
the exit code says whether any failed, and the plain output stays one line per image (issue 13, probe 6)."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import png_header_only
from vlmlab.cli import main as cli_main
from vlmlab.model.vlm import VLM
from vlmlab.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("caption")
    old = os.environ.get("VLMLAB_CACHE")
    os.environ["VLMLAB_CACHE"] = str(root / "cache")
    cfg = tiny_config(root, "train.max_steps=2", "train.eval_every=2")
    run_dir = train(cfg)
    images = [str(p) for p in sorted((root / "world" / "images").glob("*.png"))[:3]]
    yield run_dir, images
    if old is None:
        os.environ.pop("VLMLAB_CACHE", None)
    else:
        os.environ["VLMLAB_CACHE"] = old


def _bad_inputs(folder):
    """name -> path of each kind of input that cannot be captioned."""
    folder.mkdir()
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    bad = {
        "directory": folder / "a-folder.jpg",
        "text": folder / "notes.jpg",
        "empty": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
        "too large": png_header_only(folder / "huge.png", 8_000, 8_000),
        "missing": folder / "missing.jpg",
    }
    bad["directory"].mkdir()
    bad["text"].write_text("not an image\n")
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return {k: str(v) for k, v in bad.items()}


@pytest.mark.parametrize("as_json", [False, True])
def test_bad_images_are_named_and_the_good_ones_still_captioned(run, tmp_path, capsys, as_json):
    run_dir, good = run
    bad = _bad_inputs(tmp_path / "bad")
    # good and bad interleaved, the bad ones in the same batch as good ones
    inputs = [good[0], *list(bad.values())[:3], good[1], *list(bad.values())[3:], good[2]]
    code = cli_main(["caption", str(run_dir), *inputs, *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    if as_json:
        assert [json.loads(line)["image"] for line in lines] == good
    else:
        assert [line.split("\t")[0] for line in lines] == good
    for kind, path in bad.items():
        assert any(path in line for line in err.splitlines()), f"{kind} image {path} not named on stderr:\n{err}"
    truncated = next(line for line in err.splitlines() if bad["truncated"] in line)
    assert "truncated" in truncated.lower()  # the decoder's reason, with the file's name
    assert f"{len(bad)} of {len(inputs)} images failed" in err


def test_all_good_exits_zero(run, capsys):
    run_dir, good = run
    assert cli_main(["caption", str(run_dir), *good]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(good)


def test_plain_output_is_one_line_per_image_even_when_a_caption_holds_a_newline(run, capsys, monkeypatch):
    run_dir, good = run
    real = VLM.caption

    def multiline(self, images, **kwargs):  # a model may write any token, newline and tab included
        return [f"{c}\nsecond line\tand a tab \\ backslash" for c in real(self, images, **kwargs)]

    monkeypatch.setattr(VLM, "caption", multiline)
    assert cli_main(["caption", str(run_dir), *good]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert len(plain) == len(good)
    path, caption = plain[0].split("\t")
    assert path == good[0] and caption.endswith("\\nsecond line\\tand a tab \\\\ backslash")
    assert cli_main(["caption", str(run_dir), *good, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == good
    assert records[0]["caption"].endswith("\nsecond line\tand a tab \\ backslash")  # exact in JSON


def test_an_unknown_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli_main(["caption", str(tmp_path / "no-run"), "x.png"]) == 2
    assert "Traceback" not in capsys.readouterr().err
