"""Broken files and odd inputs on every reader: handled (converted, or skipped and logged) or refused naming the file.

Property-based (hypothesis) on each reader, plus one end-to-end pass of every fault the data path is meant to take.
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import png_header_only
from vlmlab.data.formats import ImageTooLarge, SkipReport, load_captions, load_image

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------- Flickr8k

caption_text = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=20)
good_line = st.tuples(st.sampled_from(["a.jpg", "b.jpg", "c d.jpg"]), st.integers(0, 4), caption_text).map(
    lambda t: ("good", t[0], f"{t[0]}#{t[1]}\t{t[2]}", t[2])
)
blank_line = st.sampled_from(["", "   "]).map(lambda s: ("blank", None, s, None))
bad_line = st.sampled_from(["no tab here", "a.jpg#0 no tab", "a.jpg\tno hash", "#0\tno name"]).map(
    lambda s: ("bad", None, s, None)
)


def _flickr_root(tmp_path, token_bytes: bytes):
    root = tmp_path / "flickr"
    (root / "Flicker8k_Dataset").mkdir(parents=True, exist_ok=True)
    (root / "Flickr8k.token.txt").write_bytes(token_bytes)
    return root


@SETTINGS
@given(lines=st.lists(st.one_of(good_line, good_line, blank_line, bad_line), max_size=12))
def test_flickr8k_reader_keeps_every_caption_or_names_the_bad_line(tmp_path_factory, lines):
    root = _flickr_root(tmp_path_factory.mktemp("f"), "\n".join(text for _, _, text, _ in lines).encode())
    token_file = root / "Flickr8k.token.txt"
    bad = [i for i, (kind, *_) in enumerate(lines, 1) if kind == "bad"]
    report = SkipReport()
    if bad:
        with pytest.raises(ValueError, match=f"{token_file}:{bad[0]}:"):
            load_captions(f"flickr8k:{root}", skipped=report)
        return
    got = {
        s.image_path.rsplit("/", 1)[1]: s.captions
        for ss in load_captions(f"flickr8k:{root}", skipped=report).values()
        for s in ss
    }
    expected: dict[str, list[str]] = {}
    for kind, name, _, caption in lines:
        if kind == "good" and caption.strip():
            expected.setdefault(name, []).append(caption.strip())
    assert got == expected
    empty = sum(1 for kind, _, _, c in lines if kind == "good" and not c.strip())
    assert report.counts().get("empty captions", 0) == empty  # every dropped line is accounted for


@SETTINGS
@given(data=st.binary(max_size=200))
def test_flickr8k_reader_on_arbitrary_bytes_reads_or_names_the_file(tmp_path_factory, data):
    root = _flickr_root(tmp_path_factory.mktemp("f"), data)
    try:
        load_captions(f"flickr8k:{root}", skipped=SkipReport())
    except ValueError as e:
        assert str(root / "Flickr8k.token.txt") in str(e)


def test_flickr8k_non_utf8_names_the_line(tmp_path):
    root = _flickr_root(tmp_path, b"a.jpg#0\tfine\n" + b"b.jpg#0\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt:2: not UTF-8"):
        load_captions(f"flickr8k:{root}")


# ---------------------------------------------------------------------------------------------- COCO


def _coco_root(tmp_path, doc) -> "Path":  # noqa: F821
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    text = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    (root / "annotations" / "captions_val2017.json").write_bytes(text)
    return root


coco_image = st.fixed_dictionaries({"id": st.integers(0, 5), "file_name": st.sampled_from(["x.jpg", "y.jpg", "z.jpg"])})
coco_annotation = st.fixed_dictionaries(
    {"image_id": st.integers(0, 7), "caption": st.one_of(caption_text, st.none(), st.integers())}
)


@SETTINGS
@given(images=st.lists(coco_image, max_size=6), annotations=st.lists(coco_annotation, max_size=10))
def test_coco_reader_model_based(tmp_path_factory, images, annotations):
    root = _coco_root(tmp_path_factory.mktemp("c"), {"images": images, "annotations": annotations})
    files: dict[int, set] = {}
    for im in images:
        files.setdefault(im["id"], set()).add(im["file_name"])
    ids_of: dict[str, set] = {}
    for im in images:
        ids_of.setdefault(im["file_name"], set()).add(im["id"])
    report = SkipReport()
    # one id with two files is ambiguous; one file under two ids would be two samples of one picture: both refused
    if any(len(f) > 1 for f in files.values()) or any(len(ids) > 1 for ids in ids_of.values()):
        message = r"captions_val2017.json: images\[\d+\]: (id \d+ is listed with two files|file '.\.jpg' is listed under two ids)"
        with pytest.raises(ValueError, match=message):
            load_captions(f"coco:{root}", skipped=report)
        return
    got = {s.image_id: s.captions for ss in load_captions(f"coco:{root}", skipped=report).values() for s in ss}
    expected: dict[str, list[str]] = {}
    unlisted = empty = non_text = 0
    for ann in annotations:
        if ann["image_id"] not in files:
            unlisted += 1
        elif isinstance(ann["caption"], str) and ann["caption"].strip():
            expected.setdefault(f"coco:{ann['image_id']}", []).append(ann["caption"].strip())
        elif isinstance(ann["caption"], str):
            empty += 1
        else:
            non_text += 1  # a number or null is reported as what it is, not as an "empty" caption
    assert got == expected
    assert report.counts().get("captions of unlisted images", 0) == unlisted
    assert report.counts().get("empty captions", 0) == empty
    assert report.counts().get("non-text captions", 0) == non_text


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
coco_like = st.fixed_dictionaries({"images": json_values, "annotations": json_values})


@SETTINGS
@given(doc=st.one_of(json_values, coco_like, st.binary(max_size=60)))
def test_coco_reader_on_arbitrary_json_reads_or_names_the_file(tmp_path_factory, doc):
    root = _coco_root(tmp_path_factory.mktemp("c"), doc)
    try:
        load_captions(f"coco:{root}", skipped=SkipReport())
    except ValueError as e:
        assert "captions_val2017.json" in str(e)


@SETTINGS
@given(
    doc=st.one_of(
        json_values, st.fixed_dictionaries({"images": st.lists(json_values, max_size=3)}), st.binary(max_size=60)
    )
)
def test_karpathy_reader_on_arbitrary_json_reads_or_names_the_file(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("k") / "dataset_x.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    try:
        load_captions(f"karpathy:{path}", skipped=SkipReport())
    except ValueError as e:
        assert str(path) in str(e)


# ---------------------------------------------------------------------------------------------- images

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {
    "png": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "jpeg": ("L", "RGB", "CMYK"),
    "gif": ("L", "P"),
    "bmp": ("1", "L", "P", "RGB"),
    "tiff": MODES,
    "webp": ("RGB", "RGBA"),
}


@st.composite
def image_files(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    return fmt, mode, (w, h), seed


def _make(mode, size, seed):
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray(rng.integers(0, 65535, size[::-1]).astype(dtype))
        assert img.mode == mode
        return img
    base = Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), "RGBA")
    return base.convert(mode)


@SETTINGS
@given(spec=image_files(), cut=st.one_of(st.none(), st.floats(0, 0.99)))
def test_load_image_gives_rgb_of_the_same_size_or_raises(tmp_path_factory, spec, cut):
    fmt, mode, size, seed = spec
    path = tmp_path_factory.mktemp("i") / f"img.{fmt}"
    _make(mode, size, seed).save(path, format=fmt.upper())
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    try:
        img = load_image(path)
    except Exception:  # noqa: BLE001 - a truncated file may raise any decoder error; the cache records which
        assert cut is not None, f"an intact {fmt} file in mode {mode} did not load"
        return
    assert img.mode == "RGB" and img.size == size


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    for w, h in ((100_000, 100_000), (8_000, 8_000)):  # above PIL's own hard limit, and above ours only
        with pytest.raises(ImageTooLarge, match=f"{w}x{h}|pixels"):
            load_image(png_header_only(tmp_path / f"bomb{w}.png", w, h))


# ---------------------------------------------------------------------------------------------- end to end


def test_every_listed_fault_through_the_data_path(tmp_path, tiny_clip_dir):
    """One COCO root holding each fault the data path must take: kept (converted) or skipped, logged, counted."""
    from vlmlab.config import load_config
    from vlmlab.data.features import FeatureCache
    from vlmlab.data.pairs import SKIP_LOG, load_split_features
    from vlmlab.model.vision import build_vision_encoder

    images = tmp_path / "coco" / "val2017"
    images.mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    rgb.save(images / "good.jpg", quality=95)
    data = (images / "good.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "zero.jpg").write_bytes(b"")
    rgb.convert("RGBA").save(images / "alpha.png")
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(images / "16bit.png")
    rgb.convert("P").save(images / "palette.png")
    rgb.convert("L").save(images / "grey.jpg")
    rgb.convert("CMYK").save(images / "cmyk.jpg")
    png_header_only(images / "bomb.png", 8000, 8000)
    names = [
        "good.jpg",
        "truncated.jpg",
        "zero.jpg",
        "alpha.png",
        "16bit.png",
        "palette.png",
        "grey.jpg",
        "cmyk.jpg",
        "bomb.png",
        "missing.jpg",
    ]
    doc = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)] + [{"id": 0, "file_name": "good.jpg"}],
        "annotations": [{"image_id": i, "caption": f"picture {n}"} for i, n in enumerate(names)]
        + [{"image_id": 0, "caption": "  "}, {"image_id": 77, "caption": "an unknown image"}],
    }
    _coco_root(tmp_path, doc)
    cfg = load_config(None, [f"data.datasets=[coco:{tmp_path / 'coco'}]", f"vision.name=hf:{tiny_clip_dir}"])
    cache = FeatureCache(tmp_path / "cache", build_vision_encoder(cfg.vision.name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_split_features(cfg, cache, log_dir=tmp_path / "run")
    kept = sorted(s.image_path.rsplit("/", 1)[1] for split in splits.values() for s in split.samples)
    assert kept == sorted(["good.jpg", "alpha.png", "16bit.png", "palette.png", "grey.jpg", "cmyk.jpg"])
    assert sum(len(split.pairs) for split in splits.values()) == 6  # the blank caption is not a pair

    lines = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(lines) == 1, lines  # one summary line
    assert (
        "skipped 1 captions of unlisted images, 1 empty captions, 1 missing images, 3 unreadable images; "
        f"each listed in {tmp_path / 'run' / SKIP_LOG}"
    ) in lines[0]
    log = (tmp_path / "run" / SKIP_LOG).read_text()
    for name in ("truncated.jpg", "zero.jpg", "bomb.png", "missing.jpg", "annotations[10]", "annotations[11]"):
        assert name in log, name
    assert "8000x8000 pixels exceeds" in log


# ---------------------------------------------------------------------------------------------- issue 13, probe 7


def test_a_bom_in_flickr8k_files_loses_nothing(tmp_path):
    root = _flickr_root(tmp_path, b"\xef\xbb\xbfa.jpg#0\tfirst caption\na.jpg#1\tsecond caption\n")
    (root / "Flickr_8k.trainImages.txt").write_bytes(b"\xef\xbb\xbfa.jpg\n")
    report = SkipReport()
    splits = load_captions(f"flickr8k:{root}", skipped=report)
    assert [(s.image_path.rsplit("/", 1)[1], s.captions) for s in splits["train"]] == [
        ("a.jpg", ["first caption", "second caption"])
    ]
    assert len(report) == 0


def test_a_bom_in_a_coco_file_is_read(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1, "caption": "a cat"}]}
    root = _coco_root(tmp_path, b"\xef\xbb\xbf" + json.dumps(doc).encode())
    got = [s.captions for ss in load_captions(f"coco:{root}").values() for s in ss]
    assert got == [["a cat"]]


def test_two_ids_for_one_file_are_refused_in_karpathy(tmp_path):
    doc = {
        "images": [
            {"split": "train", "filename": "x.jpg", "cocoid": 1, "sentences": [{"raw": "a"}]},
            {"split": "train", "filename": "x.jpg", "cocoid": 2, "sentences": [{"raw": "b"}]},
        ]
    }
    (tmp_path / "dataset_k.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"dataset_k.json: images\[1\]: .*x.jpg is listed under two ids, 'k:1'"):
        load_captions(f"karpathy:{tmp_path / 'dataset_k.json'}")


def test_numeric_captions_are_reported_as_such(tmp_path):
    doc = {"images": [{"split": "train", "filename": "x.jpg", "sentences": [{"raw": 42}, {"raw": "fine"}]}]}
    (tmp_path / "dataset_k.json").write_text(json.dumps(doc))
    report = SkipReport()
    load_captions(f"karpathy:{tmp_path / 'dataset_k.json'}", skipped=report)
    assert report.counts() == {"non-text captions": 1}
    assert "raw 42" in report.entries[0][2]


def test_a_truncated_image_error_names_the_file(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    rgb.save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=rf"{tmp_path / 't.jpg'}: image file is truncated"):
        load_image(tmp_path / "t.jpg")


def _feature_cache(tmp_path, tiny_clip_dir):
    from vlmlab.data.features import FeatureCache
    from vlmlab.model.vision import build_vision_encoder

    return FeatureCache(tmp_path / "cache", build_vision_encoder(f"hf:{tiny_clip_dir}"))


def _pictures(folder, n):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 50 % 256, 90, 20)).save(folder / f"{i}.png")
    return [str(folder / f"{i}.png") for i in range(n)]


def test_a_temp_file_left_by_a_killed_cache_write_is_removed(tmp_path, tiny_clip_dir):
    import subprocess
    import sys

    cache = _feature_cache(tmp_path, tiny_clip_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = cache.dir / f"shard-1-{dead.pid}.tmp"
    orphan.write_bytes(b"half a shard")
    live = cache.dir / f"shard-2-{os.getpid()}.tmp"  # a writer still at work: left alone
    live.write_bytes(b"being written")
    with pytest.warns(UserWarning, match=rf"removed {orphan}"):
        cache.features(_pictures(tmp_path / "img", 2))
    assert not orphan.exists() and live.exists()


def test_a_cut_short_cache_file_is_named_and_rebuilt(tmp_path, tiny_clip_dir):
    paths = _pictures(tmp_path / "img", 3)
    first, _ = _feature_cache(tmp_path, tiny_clip_dir).features(paths)
    (shard,) = (tmp_path / "cache").rglob("shard-*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # a full disk, an interrupted copy
    with pytest.warns(UserWarning, match=rf"feature cache file {shard} is damaged \(\d+ bytes, its header says \d+\)"):
        again, kept = _feature_cache(tmp_path, tiny_clip_dir).features(paths)
    assert kept == [0, 1, 2] and torch.allclose(first.float(), again.float())
    assert shard.with_suffix(".damaged").exists()
