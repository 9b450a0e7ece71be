"""Readers for the official caption formats, all returning the same CaptionSample records.

A dataset is named by a spec 'FORMAT:PATH' (e.g. 'coco:$VLMLAB_DATA/coco2017-mini'), so configs can
mix datasets and every reader reads the full dataset in its own on-disk layout, unconverted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..config import parse_spec, split_at, write_atomic

SPLITS = ("train", "val", "test")


class InputError(ValueError):
    """An input file (captions, annotations, questions, a prompt) that cannot be used as given: the message
    names the file and the row or key. The command line prints it as one line and exits 2."""


class SkipReport:
    """What the readers and the image decoder left out, and why.

    Nothing is dropped silently: each entry names a file (and a line or record where there is one); the
    caller prints one summary line and writes every entry to a log file (`write`).
    """

    def __init__(self):
        self.entries: list[tuple[str, str, str]] = []  # (kind, where, why)

    def add(self, kind: str, where: str, why: str) -> None:
        self.entries.append((kind, where, why))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, _, _ in self.entries:
            out[kind] = out.get(kind, 0) + 1
        return out

    def summary(self) -> str:
        return "skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items()))

    def write(self, path: str | Path) -> None:
        write_atomic(path, "".join(f"{kind}\t{where}\t{why}\n" for kind, where, why in self.entries))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class CaptionSample:
    image_id: str  # unique within a dataset, e.g. "coco:397133"
    image_path: str  # absolute path to the image file
    captions: list[str]  # stripped, non-empty human captions (all references of this image)
    split: str  # "train" | "val" | "test"
    meta: dict = field(default_factory=dict)  # e.g. synthetic ground truth, coco file_name


def load_captions(
    spec: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    skipped: SkipReport | None = None,
) -> dict[str, list[CaptionSample]]:
    """spec is 'FORMAT:PATH'. Returns {'train': [...], 'val': [...], 'test': [...]}, each sorted by image_id.

    seed / val_fraction / test_fraction only matter where the format has no split of its own (COCO, and
    Flickr8k images that no split file lists). Entries left out (empty captions, captions of unlisted images)
    go to `skipped`; without one, a warning says how many. Broken files raise InputError naming file and line.
    """
    report = SkipReport() if skipped is None else skipped
    before = len(report)
    fmt, _ = parse_spec(spec)
    path = spec.partition(":")[2]
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum to <= 1")
    fractions = (seed, val_fraction, test_fraction)
    if fmt == "coco":
        samples = _read_coco(_existing(path, spec), *fractions, report)
    elif fmt == "karpathy":
        json_path, image_root = split_at(path)
        root = _existing(image_root, spec) if image_root else None
        samples = _read_karpathy(_existing(json_path, spec), root, report)
    elif fmt == "flickr8k":
        samples = _read_flickr8k(_existing(path, spec), *fractions, report)
    else:  # synthetic: generated on first use; its splits are recorded in the json
        from .synthetic import ensure_world

        samples = _read_karpathy(ensure_world(path), None, report)
    if skipped is None and len(report) > before:
        warnings.warn(f"{spec}: {report.summary()} (pass a SkipReport to see each)", stacklevel=2)
    out: dict[str, list[CaptionSample]] = {s: [] for s in SPLITS}
    for s in samples:
        out[s.split].append(s)
    for split in out.values():
        split.sort(key=lambda s: s.image_id)
    return out


class UnreadableImage(OSError):
    """An image file whose pixels cannot be decoded (truncated, corrupt); the message names the file."""


class ImageTooLarge(InputError):
    """More pixels than MAX_IMAGE_PIXELS: a decompression bomb, or a scan nobody meant to caption."""


MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300; the largest COCO/Flickr images are ~0.3 MP


def load_image(path) -> Image.Image:
    """Decodes the whole file (so truncated files raise here, not later) and returns an RGB image.

    The size is checked from the header before any pixel is decoded (decompression-bomb guard).
    """
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{path}: {e}") from e
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLarge(f"{path}: {img.width}x{img.height} pixels exceeds the {MAX_IMAGE_PIXELS:,} pixel limit")
    try:
        img.load()  # a single-frame file is closed once loaded; a multi-frame one keeps its handle open
        if getattr(img, "n_frames", 1) > 1:
            img, animated = img.copy(), img  # first frame only
            animated.close()
    except OSError as e:  # PIL's "image file is truncated (3 bytes not processed)" names no file
        img.close()
        raise UnreadableImage(f"{path}: {e}") from e
    except BaseException:
        img.close()
        raise
    try:
        ImageOps.exif_transpose(img, in_place=True)  # phone photos store their rotation in EXIF
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the pixels
        pass
    return to_rgb(img)


def filter_readable(samples: list[CaptionSample]) -> tuple[list[CaptionSample], list[str]]:
    """Keeps the samples whose image fully decodes; returns (good, bad_paths) and warns once if any failed.

    A full decode is needed: Image.verify() passes zero-length-tail and truncated JPEGs.
    """

    def readable(path: str) -> bool:
        try:
            with Image.open(path) as img:
                img.load()
            return True
        except Exception:  # noqa: BLE001 - any decoder error means "unreadable image"
            return False

    paths = [s.image_path for s in samples]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
        ok = list(pool.map(readable, paths))
    good = [s for s, k in zip(samples, ok) if k]
    bad = [p for p, k in zip(paths, ok) if not k]
    if bad:
        warnings.warn(
            f"skipped {len(bad)} of {len(samples)} images that could not be read (first: {bad[0]})", stacklevel=2
        )
    return good, bad


# ---------------------------------------------------------------------------------------------- helpers


def _existing(path: str, spec: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"dataset spec {spec!r}: path {str(p)!r} does not exist")
    return p


def hash_split(seed: int, key: str, val_fraction: float, test_fraction: float) -> str:
    """A split that depends only on (seed, key): stable across runs, machines and dataset growth."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _abs(path: Path) -> str:
    return os.path.abspath(path)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit greyscale rescaled, transparent pixels put on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16-bit / float greyscale: rescale, then grey
        a = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):  # transparent pixels would turn black: put them on white
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _add(by_id: dict[str, CaptionSample], sample: CaptionSample) -> None:
    """Collapses repeated entries of one image into one sample holding all its captions."""
    if sample.image_id in by_id:
        by_id[sample.image_id].captions.extend(sample.captions)
    else:
        by_id[sample.image_id] = sample


# ---------------------------------------------------------------------------------------------- COCO


def _read_json(path: Path, kind: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))  # a BOM (Windows editors write one) is no error
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); JSON files must be UTF-8") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not a {kind} file (JSON error: {e.msg})") from e


def _fields(record, keys: tuple[str, ...], where: str) -> tuple:
    """The named fields of one JSON record, the first hashable (an id or a split name), or InputError naming it."""
    try:
        values = tuple(record[k] for k in keys)
        hash(values[0])
    except (KeyError, TypeError) as e:
        raise InputError(f"{where} lacks {'/'.join(keys)}") from e
    return values


def _read_coco(
    path: Path, seed: int, val_fraction: float, test_fraction: float, skipped: SkipReport
) -> list[CaptionSample]:
    """COCO captions JSON(s); images in ROOT/<split>/<file_name> where the json is captions_<split>.json."""
    if path.is_dir():
        files = sorted((path / "annotations").glob("captions_*.json"))
        if not files:
            raise InputError(f"{path}: no annotations/captions_*.json found (expected a COCO root)")
    else:
        files = [path]
    by_id: dict[str, CaptionSample] = {}
    for f in files:
        folder = f.stem.removeprefix("captions_")
        image_dir = f.resolve().parent.parent / folder
        data = _read_json(f, "COCO captions")
        try:
            image_list, annotations = data["images"], data["annotations"]
            if not isinstance(image_list, list) or not isinstance(annotations, list):
                raise TypeError("'images' and 'annotations' must be lists")
        except (KeyError, TypeError) as e:
            raise InputError(f"{f}: not a COCO captions file ({type(e).__name__}: {e})") from e
        images: dict = {}
        owner: dict = {}  # file_name -> (id, record) that first listed it
        for i, im in enumerate(image_list):
            image_id, file_name = _fields(im, ("id", "file_name"), f"{f}: images[{i}]")
            if not isinstance(file_name, str) or not file_name:
                raise InputError(f"{f}: images[{i}] has file_name {file_name!r}")
            if images.get(image_id, file_name) != file_name:
                raise InputError(
                    f"{f}: images[{i}]: id {image_id!r} is listed with two files, "
                    f"{images[image_id]!r} and {file_name!r}"
                )
            if owner.setdefault(file_name, (image_id, i))[0] != image_id:  # one picture, two samples: refused
                raise InputError(
                    f"{f}: images[{i}]: file {file_name!r} is listed under two ids, {owner[file_name][0]!r} "
                    f"(images[{owner[file_name][1]}]) and {image_id!r}"
                )
            images[image_id] = file_name  # the same entry listed twice collapses
        captions: dict = {}
        for i, ann in enumerate(annotations):
            image_id, text = _fields(ann, ("image_id", "caption"), f"{f}: annotations[{i}]")
            if image_id not in images:
                skipped.add("captions of unlisted images", f"{f}:annotations[{i}]", f"image_id {image_id!r}")
            elif not isinstance(text, str):
                skipped.add("non-text captions", f"{f}:annotations[{i}]", f"caption {text!r}")
            elif not text.strip():
                skipped.add("empty captions", f"{f}:annotations[{i}]", f"caption {text!r}")
            else:
                captions.setdefault(image_id, []).append(text.strip())
        for image_id, caps in captions.items():
            key = f"coco:{image_id}"
            split = hash_split(seed, key, val_fraction, test_fraction)
            meta = {"file_name": images[image_id], "coco_split": folder}
            _add(by_id, CaptionSample(key, _abs(image_dir / images[image_id]), caps, split, meta))
    return list(by_id.values())


# ---------------------------------------------------------------------------------------------- Karpathy

_KARPATHY_KEYS = {"filename", "filepath", "split", "sentences", "sentids", "imgid", "cocoid"}
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _read_karpathy(path: Path, image_root: Path | None, skipped: SkipReport) -> list[CaptionSample]:
    """Karpathy's split JSON (dataset_coco.json, dataset_flickr8k.json, ...), splits as recorded."""
    data = _read_json(path, "Karpathy split")
    try:
        images = data["images"]
        if not isinstance(images, list):
            raise TypeError("'images' must be a list")
    except (KeyError, TypeError) as e:
        raise InputError(f"{path}: not a Karpathy split file ({type(e).__name__}: {e})") from e
    name = data.get("dataset") or path.stem.removeprefix("dataset_")
    root = image_root if image_root is not None else path.parent
    by_id: dict[str, CaptionSample] = {}
    owner: dict[str, tuple[str, int]] = {}  # image path -> (key, record) that first listed it
    for i, im in enumerate(images):
        raw_split, filename, sentences = _fields(im, ("split", "filename", "sentences"), f"{path}: images[{i}]")
        if not isinstance(filename, str) or not filename or not isinstance(sentences, list):
            raise InputError(f"{path}: images[{i}] needs a file name and a list of sentences")
        if raw_split not in _KARPATHY_SPLITS:
            raise InputError(f"{path}: images[{i}] has split {raw_split!r}, expected one of {sorted(_KARPATHY_SPLITS)}")
        captions = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if isinstance(raw, str) and raw.strip():
                captions.append(raw.strip())
            elif raw is not None and not isinstance(raw, str):
                skipped.add("non-text captions", f"{path}:images[{i}].sentences[{j}]", f"raw {raw!r}")
            else:
                skipped.add("empty captions", f"{path}:images[{i}].sentences[{j}]", f"raw {raw!r}")
        if not captions:
            continue
        key = f"{name}:{im['cocoid']}" if "cocoid" in im else f"{name}:{Path(filename).stem}"
        image_path = _abs(root / im.get("filepath", "") / filename)
        meta = {k: v for k, v in im.items() if k not in _KARPATHY_KEYS}
        if owner.setdefault(image_path, (key, i))[0] != key:  # one picture under two ids: two samples of it
            raise InputError(
                f"{path}: images[{i}]: {image_path} is listed under two ids, {owner[image_path][0]!r} "
                f"(images[{owner[image_path][1]}]) and {key!r}"
            )
        _add(by_id, CaptionSample(key, image_path, captions, _KARPATHY_SPLITS[raw_split], meta))
    return list(by_id.values())


# ---------------------------------------------------------------------------------------------- Flickr8k

_FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")  # the official folder is misspelt
_FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _text_lines(path: Path):
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 raises naming file and line."""
    data = path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM would glue itself to the first image name
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: not UTF-8 (byte {e.start}: {raw[:60]!r})") from e


def _read_flickr8k(
    root: Path, seed: int, val_fraction: float, test_fraction: float, skipped: SkipReport
) -> list[CaptionSample]:
    """Flickr8k.token.txt + the three split files; images no split file lists get a hash split."""
    text_dirs = [root, root / "Flickr8k_text"]  # the official text zip unpacks into Flickr8k_text/
    token_file = next((d / "Flickr8k.token.txt" for d in text_dirs if (d / "Flickr8k.token.txt").is_file()), None)
    if token_file is None:
        raise InputError(f"{root}: no Flickr8k.token.txt found (looked in {', '.join(map(str, text_dirs))})")
    image_dir = next((root / d for d in _FLICKR_IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise InputError(f"{root}: no image folder found (expected one of {', '.join(_FLICKR_IMAGE_DIRS)})")

    split_of: dict[str, tuple[str, Path]] = {}
    for split, fname in _FLICKR_SPLIT_FILES.items():
        f = token_file.parent / fname
        if not f.is_file():
            continue
        for _, line in _text_lines(f):
            name = line.strip()
            if not name:
                continue
            if name in split_of and split_of[name][0] != split:
                raise InputError(f"{f}: {name} is also listed in {split_of[name][1]}")
            split_of[name] = (split, f)

    captions: dict[str, list[str]] = {}
    for lineno, line in _text_lines(token_file):
        if not line.strip():
            continue
        head, tab, caption = line.partition("\t")
        name, hash_, _ = head.rpartition("#")
        if not tab or not hash_ or not name.strip():
            raise InputError(f"{token_file}:{lineno}: expected '<image>.jpg#<n><TAB><caption>', got {line[:80]!r}")
        caps = captions.setdefault(name, [])
        if caption.strip():
            caps.append(caption.strip())
        else:
            skipped.add("empty captions", f"{token_file}:{lineno}", repr(line[:80]))

    samples = []
    for name, caps in captions.items():
        if not caps:
            continue
        key = f"flickr8k:{Path(name).stem}"
        split = split_of[name][0] if name in split_of else hash_split(seed, key, val_fraction, test_fraction)
        samples.append(CaptionSample(key, _abs(image_dir / name), caps, split, {"file_name": name}))
    return samples
