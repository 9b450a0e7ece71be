"""The built-in synthetic world: 1..N coloured shapes on a plain background, captioned exactly.

Every caption is fully determined by the picture (colour, shape, size, grid cell), so a model that
ignores the image cannot do well: it is the quickest honest test that captions follow the image.
With several objects per scene (`max_objects`, up to 9) a caption must also bind each colour to its
shape and count them, and a Q-Former's queries have more than one thing to look at; with `occlusion`
the shapes are drawn larger than their grid cell, so neighbours can cover part of each other.
The world is written in Karpathy's split format, so the ordinary 'karpathy' reader loads it; each
image's entry keeps its objects, with their boxes (fractions of the image) and visible shares.
"""

from __future__ import annotations

import inspect
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..config import write_atomic

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 0),
    "purple": (140, 50, 180),
    "orange": (250, 135, 0),
}
BACKGROUNDS = ((255, 255, 255), (225, 225, 225))  # white, light grey
SIZE_FRACTION = {"small": 0.45, "large": 0.85}  # shape side / grid cell side
# with occlusion: a large shape spans 1.4 cells, so shapes in neighbouring cells overlap by up to 0.4 cell
OCCLUDING_SIZE_FRACTION = {"small": 0.7, "large": 1.4}
# 2: entries keep each object's box and visible share, params the occlusion flag (images and captions as in 1)
WORLD_VERSION = 2  # bump when rendering or captions change, so ensure_world regenerates old worlds


@dataclass
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str  # one of POSITIONS: a cell of the 3x3 grid


def check_max_objects(max_objects: int) -> None:
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)} (one shape per grid cell), got {max_objects}")


def sample_scene(rng: random.Random, max_objects: int = 2) -> list[SceneObject]:
    """1..max_objects objects, each in its own grid cell (so they never overlap)."""
    check_max_objects(max_objects)
    n = rng.randint(1, max_objects)
    return [
        SceneObject(rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(SIZES), position)
        for position in rng.sample(POSITIONS, n)
    ]


def object_box(
    obj: SceneObject, image_size: int = 224, jitter: tuple[float, float] = (0.0, 0.0), occlusion: bool = False
):
    """The shape's bounding box (x0, y0, x1, y1): inside its grid cell, or centred in it and larger with occlusion.

    jitter in [-1, 1]^2 moves the shape within the slack its cell leaves around it (none when it overflows).
    """
    cell = image_size / 3
    row, col = divmod(POSITIONS.index(obj.position), 3)
    side = (OCCLUDING_SIZE_FRACTION if occlusion else SIZE_FRACTION)[obj.size] * cell
    slack = max(0.0, (cell - side) / 2 - 1)  # keep 1 px clear of the cell border
    cx = (col + 0.5) * cell + jitter[0] * slack
    cy = (row + 0.5) * cell + jitter[1] * slack
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def render_scene(
    objects: list[SceneObject],
    image_size: int = 224,
    rng: random.Random | None = None,
    occlusion: bool = False,
    layout: list | None = None,
) -> Image.Image:
    """Draws the scene in list order (a later shape covers an earlier one); with an rng the background shade and
    each shape's place within its cell vary. `layout`, when given, receives each object's box (fractions of the
    image, clipped to it) and visible share (its drawn pixels that no later shape covers)."""
    background = rng.choice(BACKGROUNDS) if rng else BACKGROUNDS[0]
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    masks = []
    for obj in objects:
        jitter = (rng.uniform(-1, 1), rng.uniform(-1, 1)) if rng else (0.0, 0.0)
        box = object_box(obj, image_size, jitter, occlusion)
        _draw_shape(draw, obj.shape, box, RGB[obj.colour])
        if layout is not None:
            mask = Image.new("1", (image_size, image_size), 0)
            _draw_shape(ImageDraw.Draw(mask), obj.shape, box, 1)
            masks.append((box, np.asarray(mask)))
    if layout is not None:
        covered = np.zeros((image_size, image_size), dtype=bool)
        for box, mask in reversed(masks):  # the last drawn is fully visible; each earlier one loses what follows it
            area = int(mask.sum())
            visible = int((mask & ~covered).sum())
            covered |= mask
            clipped = [min(1.0, max(0.0, v / image_size)) for v in box]
            layout.insert(0, {"box": [round(v, 4) for v in clipped], "visible": round(visible / max(area, 1), 3)})
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# "at the top left", "on the left", "in the center": the preposition English uses for each cell
_PLACE = {p: f"at the {p}" for p in POSITIONS} | {
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}
TEMPLATES = ("{}.", "there is {}.", "an image of {}.", "a picture showing {}.")


def _phrase(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {_PLACE[obj.position]}"


def describe_scene(objects: list[SceneObject], rng: random.Random, template: int | None = None) -> str:
    """One caption naming every object; the template (and the order of objects) is drawn from rng."""
    if template is None:
        template = rng.randrange(len(TEMPLATES))
    phrases = [_phrase(o) for o in objects]
    rng.shuffle(phrases)
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return TEMPLATES[template].format(listed)


def scene_captions(objects: list[SceneObject], rng: random.Random, n: int = 3) -> list[str]:
    """n captions of one scene, each from a different template."""
    return [describe_scene(objects, rng, t) for t in rng.sample(range(len(TEMPLATES)), n)]


# longest phrases first, so "at the top left" is not read as "at the top"
_PLACE_PATTERN = re.compile("|".join(re.escape(_PLACE[p]) for p in sorted(POSITIONS, key=lambda p: -len(_PLACE[p]))))
_POSITION_OF = {phrase: p for p, phrase in _PLACE.items()}  # 'on the left' -> 'left'
_WORD = {
    kind: re.compile(r"\b(" + "|".join(words) + r")\b")
    for kind, words in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES))
}
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")  # what a caption says of each object
ATTRIBUTES = OBJECT_ATTRIBUTES + ("count",)
OBJECT_SCORES = ("objects exact", "objects real", "colour-shape pairs")  # object_scores' keys


def caption_attributes(caption: str) -> dict:
    """What a caption claims about the scene: the multiset of colours, shapes, sizes and positions it names,
    and how many objects (shape words) it names. Words outside the world's vocabulary are ignored."""
    text = caption.lower()
    out = {kind: sorted(m.group(1) for m in pattern.finditer(text)) for kind, pattern in _WORD.items()}
    out["position"] = sorted(_POSITION_OF[m.group(0)] for m in _PLACE_PATTERN.finditer(text))
    out["count"] = len(out["shape"])
    return out


def attribute_correct(caption: str, objects: list[dict]) -> dict[str, bool]:
    """Per attribute, whether the caption names exactly the scene's values (as multisets; count as a number)."""
    claimed = caption_attributes(caption)
    truth = {kind: sorted(o[kind] for o in objects) for kind in OBJECT_ATTRIBUTES}
    truth["count"] = len(objects)
    return {kind: claimed[kind] == truth[kind] for kind in ATTRIBUTES}


def caption_objects(caption: str) -> list[dict]:
    """The objects a caption describes, one per shape word: the last size and colour words since the previous
    object, and the first place phrase after it (None where a caption leaves one out)."""
    text = caption.lower()
    shapes = list(_WORD["shape"].finditer(text))
    out, start = [], 0
    for i, m in enumerate(shapes):
        end = shapes[i + 1].start() if i + 1 < len(shapes) else len(text)
        before = text[start : m.start()]
        colours = _WORD["colour"].findall(before)
        sizes = _WORD["size"].findall(before)
        place = _PLACE_PATTERN.search(text, m.end(), end)
        out.append(
            {
                "colour": colours[-1] if colours else None,
                "shape": m.group(1),
                "size": sizes[-1] if sizes else None,
                "position": _POSITION_OF[place.group(0)] if place else None,
            }
        )
        start = place.end() if place else m.end()
    return out


def object_scores(caption: str, objects: list[dict]) -> dict[str, float]:
    """Per object, not per attribute: can the caption tell the scene's objects apart?

    objects exact        share of the scene's objects the caption describes with all four attributes right
    objects real         share of the caption's objects that are in the scene, all four attributes right
    colour-shape pairs   share of the scene's objects whose colour the caption binds to the right shape
    (multisets: two red circles need two; "a red square and a blue circle" for a blue square and a red circle
    gets every colour and shape right per attribute, and no pair right)."""
    claimed = caption_objects(caption)

    def matched(fields) -> int:
        truth = Counter(tuple(o[k] for k in fields) for o in objects)
        said = Counter(tuple(o[k] for k in fields) for o in claimed)
        return sum((truth & said).values())

    exact = matched(OBJECT_ATTRIBUTES)
    return {
        "objects exact": exact / len(objects),
        "objects real": exact / len(claimed) if claimed else 0.0,
        "colour-shape pairs": matched(("colour", "shape")) / len(objects),
    }


def generate_world(
    out_dir,
    n_images: int = 2000,
    seed: int = 0,
    max_objects: int = 2,
    image_size: int = 224,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    occlusion: bool = False,
) -> Path:
    """Writes out_dir/images/00000.png ... and out_dir/dataset_synthetic.json (Karpathy format); returns the json."""
    params = dict(
        n_images=n_images,
        seed=seed,
        max_objects=max_objects,
        image_size=image_size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        occlusion=occlusion,
        version=WORLD_VERSION,
    )
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    check_max_objects(max_objects)  # before anything of an existing world is removed
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum to <= 1")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "dataset_synthetic.json"
    json_path.unlink(missing_ok=True)  # written last: a half-written world has no json and is regenerated
    width = max(5, len(str(n_images - 1)))
    for stale in image_dir.glob("*.png"):  # images of an earlier, larger world
        if re.fullmatch(r"\d+", stale.stem) and (len(stale.stem) != width or int(stale.stem) >= n_images):
            stale.unlink()

    splits = _assign_splits(n_images, random.Random(f"split-{seed}"), val_fraction, test_fraction)
    rng = random.Random(seed)
    entries = []
    for i in tqdm(range(n_images), desc="rendering synthetic world", unit="img", leave=False):
        objects = sample_scene(rng, max_objects)
        filename = f"{i:0{width}d}.png"
        layout: list[dict] = []
        render_scene(objects, image_size, rng, occlusion, layout).save(image_dir / filename, compress_level=1)
        entries.append(
            {
                "filename": filename,
                "filepath": "images",
                "split": splits[i],
                "sentences": [{"raw": c} for c in scene_captions(objects, rng)],
                "objects": [asdict(o) | place for o, place in zip(objects, layout)],
            }
        )
    world = {"dataset": "synthetic", "seed": seed, "params": params, "images": entries}
    write_atomic(json_path, json.dumps(world))  # last: the images are a world only once it is there
    return json_path


def ensure_world(out_dir, **kwargs) -> Path:
    """Generates the world unless out_dir already holds one made with the given parameters.

    Only the parameters passed are compared, so ensure_world(dir) accepts any existing world.
    """
    json_path = Path(out_dir) / "dataset_synthetic.json"
    unknown = set(kwargs) - (set(inspect.signature(generate_world).parameters) - {"out_dir"})
    if unknown:
        raise TypeError(f"ensure_world got unknown parameters {sorted(unknown)}")
    if json_path.is_file():
        try:
            with open(json_path) as f:
                recorded = json.load(f).get("params", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            recorded = None
        same = recorded and recorded.get("version") == WORLD_VERSION
        same = same and all(recorded.get(k) == v for k, v in kwargs.items())
        last = f"{recorded['n_images'] - 1:0{max(5, len(str(recorded['n_images'] - 1)))}d}.png" if same else ""
        if same and (json_path.parent / "images" / last).is_file():
            return json_path
    return generate_world(out_dir, **kwargs)


def _assign_splits(n: int, rng: random.Random, val_fraction: float, test_fraction: float) -> list[str]:
    """Exact split sizes (at least one val and one test image when asked for and n allows it)."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= n:
        n_val, n_test = round(n * val_fraction), round(n * test_fraction)
        n_test = min(n_test, n - n_val)
    splits = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    rng.shuffle(splits)
    return splits
