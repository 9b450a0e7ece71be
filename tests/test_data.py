"""The caption format readers on tiny hand-made fixtures, and on the real mini datasets when present."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmlab.data.formats import CaptionSample, filter_readable, hash_split, load_captions, load_image

SHARED_DATA = Path(__file__).resolve().parents[1] / "../shared/data"


def write_image(path: Path, colour=(200, 40, 40), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def all_samples(splits: dict) -> list[CaptionSample]:
    assert set(splits) == {"train", "val", "test"}
    for samples in splits.values():
        assert [s.image_id for s in samples] == sorted(s.image_id for s in samples)
    return [s for samples in splits.values() for s in samples]


# ---------------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    for i in (1, 2, 3):
        write_image(root / "val2017" / f"{i:012d}.jpg")
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3, 3)],  # image 3 listed twice
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "  A red box.\n"},
            {"id": 11, "image_id": 1, "caption": "A small red thing."},
            {"id": 12, "image_id": 2, "caption": "Another red box."},
            {"id": 13, "image_id": 2, "caption": "   "},  # empty: dropped
            {"id": 14, "image_id": 3, "caption": "A third box."},
            {"id": 15, "image_id": 99, "caption": "No such image."},  # skipped with a warning
        ],
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    return root


def test_coco_root_and_json_path(coco_root):
    for spec in (f"coco:{coco_root}", f"coco:{coco_root}/annotations/captions_val2017.json"):
        with pytest.warns(UserWarning, match="skipped 1 captions"):
            samples = all_samples(load_captions(spec, val_fraction=0, test_fraction=0))
        by_id = {s.image_id: s for s in samples}
        assert sorted(by_id) == ["coco:1", "coco:2", "coco:3"]
        assert by_id["coco:1"].captions == ["A red box.", "A small red thing."]
        assert by_id["coco:2"].captions == ["Another red box."]
        assert all(s.split == "train" for s in samples)
        path = Path(by_id["coco:3"].image_path)
        assert path.is_absolute() and path.is_file() and path.parent.name == "val2017"
        assert by_id["coco:3"].meta["file_name"] == "000000000003.jpg"


def test_coco_splits_are_deterministic_by_seed(tmp_path):
    root = tmp_path / "coco"
    n = 60
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(n)],
        "annotations": [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in range(n)],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(data))

    def splits(seed):
        out = load_captions(f"coco:{root}", seed=seed, val_fraction=0.3, test_fraction=0.3)
        return {s.image_id: split for split, samples in out.items() for s in samples}

    assert splits(0) == splits(0)
    assert splits(0) != splits(1)
    assert set(splits(0).values()) == {"train", "val", "test"}


def test_hash_split_fractions():
    keys = [f"k{i}" for i in range(4000)]
    counts = {s: 0 for s in ("train", "val", "test")}
    for k in keys:
        counts[hash_split(3, k, 0.1, 0.2)] += 1
    assert abs(counts["val"] / len(keys) - 0.1) < 0.03
    assert abs(counts["test"] / len(keys) - 0.2) < 0.03
    assert all(hash_split(3, k, 0.0, 0.0) == "train" for k in keys[:100])


# ---------------------------------------------------------------------------------------------- Karpathy


def test_karpathy_reader(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "val2014" / "a.jpg")
    write_image(root / "train2014" / "b.jpg")
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "cocoid": 42,
                "imgid": 0,
                "split": "restval",
                "sentids": [0, 1],
                "sentences": [{"raw": " A cat. ", "tokens": ["a", "cat"]}, {"raw": "A kitten."}],
            },
            {
                "filepath": "train2014",
                "filename": "b.jpg",
                "cocoid": 7,
                "imgid": 1,
                "split": "test",
                "sentences": [{"raw": "A dog."}, {"raw": ""}],
                "objects": [{"kind": "dog"}],
            },
            {"filepath": "train2014", "filename": "c.jpg", "cocoid": 8, "split": "val", "sentences": [{"raw": " "}]},
        ],
    }
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps(data))

    out = load_captions(f"karpathy:{json_path}@{root}")
    samples = {s.image_id: s for s in all_samples(out)}
    assert sorted(samples) == ["coco:42", "coco:7"]  # c.jpg has no non-empty caption
    assert samples["coco:42"].split == "train"  # restval -> train
    assert samples["coco:42"].captions == ["A cat.", "A kitten."]
    assert samples["coco:42"].image_path == str((root / "val2014" / "a.jpg").absolute())
    assert samples["coco:42"].meta == {}
    assert samples["coco:7"].split == "test"
    assert samples["coco:7"].meta == {"objects": [{"kind": "dog"}]}

    # without @ROOT the images are looked up next to the json
    out = load_captions(f"karpathy:{json_path}")
    assert out["test"][0].image_path == str((tmp_path / "train2014" / "b.jpg").absolute())


def test_karpathy_flickr_style_ids_and_bad_split(tmp_path):
    data = {
        "dataset": "flickr8k",
        "images": [
            {"filename": "1000268201_693b08cb0e.jpg", "imgid": 0, "split": "val", "sentences": [{"raw": "A child."}]}
        ],
    }
    json_path = tmp_path / "dataset_flickr8k.json"
    json_path.write_text(json.dumps(data))
    (sample,) = load_captions(f"karpathy:{json_path}")["val"]
    assert sample.image_id == "flickr8k:1000268201_693b08cb0e"
    assert sample.image_path == str(tmp_path / "1000268201_693b08cb0e.jpg")

    data["images"][0]["split"] = "holdout"
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"dataset_flickr8k\.json.*images\[0\].*'holdout'"):
        load_captions(f"karpathy:{json_path}")


# ---------------------------------------------------------------------------------------------- Flickr8k


def make_flickr(root: Path, image_dir="Flicker8k_Dataset", extra_token_lines=()) -> Path:
    names = ["111_a.jpg", "222_b.jpg", "333_c.jpg", "444_d.jpg", "555_e.jpg"]
    for n in names:
        write_image(root / image_dir / n)
    lines = []
    for n in names:
        lines += [f"{n}#0\tA picture of {n} .", f"{n}#1\t  Another caption .  "]
    lines.insert(3, "444_d.jpg#2\t   ")  # empty caption: dropped
    lines += list(extra_token_lines)
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("111_a.jpg\n222_b.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("333_c.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("444_d.jpg\n\n")  # 555_e.jpg is in no split file
    return root


def test_flickr8k_reader(tmp_path):
    root = make_flickr(tmp_path / "flickr")
    out = load_captions(f"flickr8k:{root}", seed=0)
    samples = {s.image_id: s for s in all_samples(out)}
    assert len(samples) == 5
    assert [s.image_id for s in out["val"] if s.image_id != "flickr8k:555_e"] == ["flickr8k:333_c"]
    assert samples["flickr8k:111_a"].split == "train"
    assert samples["flickr8k:444_d"].split == "test"
    assert samples["flickr8k:444_d"].captions == ["A picture of 444_d.jpg .", "Another caption ."]
    assert Path(samples["flickr8k:222_b"].image_path).is_file()
    # the unlisted image gets a seeded split
    seen = set()
    for seed in range(12):
        out = load_captions(f"flickr8k:{root}", seed=seed, val_fraction=0.3, test_fraction=0.3)
        seen |= {split for split, smps in out.items() for s in smps if s.image_id == "flickr8k:555_e"}
    assert len(seen) > 1


def test_flickr8k_alternative_image_folder(tmp_path):
    root = make_flickr(tmp_path / "flickr", image_dir="Images")
    out = load_captions(f"flickr8k:{root}")
    assert all(Path(s.image_path).parent.name == "Images" for s in all_samples(out))


@pytest.mark.parametrize("bad_line", ["999_z.jpg#0 no tab here", "999_z.jpg\tno hash"])
def test_flickr8k_malformed_line_names_file_and_line(tmp_path, bad_line):
    root = make_flickr(tmp_path / "flickr", extra_token_lines=[bad_line])
    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt:12:"):
        load_captions(f"flickr8k:{root}")


# ---------------------------------------------------------------------------------------------- specs


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="coco, karpathy, flickr8k, synthetic"):
        load_captions(f"imagenet:{tmp_path}")
    with pytest.raises(ValueError, match="FORMAT:PATH"):
        load_captions(str(tmp_path))
    with pytest.raises(ValueError, match="does-not-exist"):
        load_captions(f"coco:{tmp_path}/does-not-exist")
    with pytest.raises(ValueError, match="captions_"):
        load_captions(f"coco:{tmp_path}")  # exists, but is no COCO root


# ---------------------------------------------------------------------------------------------- images


def test_load_image_converts_modes(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "l.png": Image.new("L", (8, 6), 128),
        "p.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.new("RGBA", (8, 6), (10, 20, 30, 0)),  # fully transparent -> white
        "cmyk.jpg": Image.new("CMYK", (8, 6), (0, 255, 255, 0)),
        "i16.png": Image.fromarray(np.full((6, 8), 65535, np.uint16)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (8, 6), name
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (128, 128, 128)


def broken_images(tmp_path):
    good = write_image(tmp_path / "good.jpg", size=(64, 64))
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    noisy.save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    return good, zero, truncated


def test_load_image_raises_on_broken_files(tmp_path):
    _, zero, truncated = broken_images(tmp_path)
    for path in (zero, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(OSError):
            load_image(path)


def test_filter_readable_skips_broken_with_one_warning(tmp_path):
    good, zero, truncated = broken_images(tmp_path)
    paths = [good, zero, truncated, tmp_path / "missing.jpg", tmp_path / "full.jpg"]
    samples = [CaptionSample(f"t:{i}", str(p), ["x"], "train") for i, p in enumerate(paths)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept, bad = filter_readable(samples)
    assert [s.image_id for s in kept] == ["t:0", "t:4"]
    assert bad == [str(zero), str(truncated), str(tmp_path / "missing.jpg")]
    assert len(caught) == 1
    assert f"skipped 3 of 5 images that could not be read (first: {zero})" in str(caught[0].message)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: no warning
        assert filter_readable(kept) == (kept, [])


def test_a_photo_in_two_datasets_counts_once_as_the_first_copy_and_is_reported(tmp_path):
    from vlmlab.config import load_config
    from vlmlab.data.formats import SkipReport
    from vlmlab.data.pairs import load_samples

    def folder(name: str, ids: list[int]) -> Path:
        root = tmp_path / name
        for i in ids:
            write_image(root / "val2017" / f"{i:012d}.jpg")
        data = {
            "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
            "annotations": [{"id": i, "image_id": i, "caption": f"{name} caption of {i}"} for i in ids],
        }
        (root / "annotations").mkdir()
        (root / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
        return root

    big, small = folder("big", [1, 2, 3, 4]), folder("small", [3, 4, 5])
    cfg = load_config(None, [f"data.datasets=[coco:{big}, coco:{small}]"])
    report = SkipReport()
    samples = [s for split in load_samples(cfg, report).values() for s in split]
    assert sorted(s.image_id for s in samples) == ["coco:1", "coco:2", "coco:3", "coco:4", "coco:5"]
    by_id = {s.image_id: s for s in samples}
    assert by_id["coco:3"].captions == ["big caption of 3"] and str(big) in by_id["coco:3"].image_path
    assert by_id["coco:5"].captions == ["small caption of 5"]
    assert report.counts() == {"photos already in an earlier dataset": 2}
    with pytest.warns(UserWarning, match="2 photos are in two datasets"):
        load_samples(cfg)


# ---------------------------------------------------------------------------------------------- real data


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent on this machine")
    return path


def test_real_coco_mini():
    root = require(SHARED_DATA / "coco2017-mini")
    out = load_captions(f"coco:{root}", seed=0)
    samples = all_samples(out)
    assert len(samples) == 279
    assert all(len(s.captions) >= 5 for s in samples)
    assert all(Path(s.image_path).is_file() for s in samples)
    assert len(out["val"]) > 0 and len(out["test"]) > 0 and len(out["train"]) > len(out["val"])
    assert "coco:397133" in {s.image_id for s in samples}
    assert load_image(samples[0].image_path).mode == "RGB"


def test_coco_val_and_its_mini_together_hold_each_photo_once():
    """coco2017-mini's 162 val2017 photos are inside coco2017-val: beside it, the mini adds its other 117."""
    from vlmlab.config import load_config
    from vlmlab.data.formats import SkipReport
    from vlmlab.data.pairs import load_samples

    val, mini = require(SHARED_DATA / "coco2017-val"), require(SHARED_DATA / "coco2017-mini")
    report = SkipReport()
    splits = load_samples(load_config(None, [f"data.datasets=[coco:{val}, coco:{mini}]"]), report)
    ids = [s.image_id for split in splits.values() for s in split]
    assert len(ids) == len(set(ids)) == 2278 + 117
    assert report.counts() == {"photos already in an earlier dataset": 162}


def test_real_flickr8k_mini():
    root = require(SHARED_DATA / "flickr8k-mini")
    out = load_captions(f"flickr8k:{root}")
    assert {k: len(v) for k, v in out.items()} == {"train": 130, "val": 7, "test": 7}
    samples = all_samples(out)
    assert all(len(s.captions) == 5 for s in samples)
    kept, bad = filter_readable(samples[:20])
    assert len(kept) == 20 and bad == []
