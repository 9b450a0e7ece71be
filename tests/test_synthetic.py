"""The synthetic world: deterministic, captions that say exactly what is drawn, readable by load_captions."""

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from vlmlab.data.formats import load_captions
from vlmlab.data.synthetic import (
    COLOURS,
    POSITIONS,
    RGB,
    SHAPES,
    SceneObject,
    describe_scene,
    ensure_world,
    generate_world,
    render_scene,
    sample_scene,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return generate_world(out, n_images=40, seed=3, image_size=96)


def words(caption: str, vocabulary) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", caption) if w in vocabulary}


def test_scenes_and_captions_are_deterministic():
    def draw(seed):
        rng = random.Random(seed)
        scenes = [sample_scene(rng) for _ in range(20)]
        captions = [describe_scene(s, rng) for s in scenes]
        pixels = [np.asarray(render_scene(s, 64, rng)) for s in scenes]
        return scenes, captions, pixels

    (s0, c0, p0), (s1, c1, p1), (_, c2, _) = draw(0), draw(0), draw(1)
    assert s0 == s1 and c0 == c1
    assert all(np.array_equal(a, b) for a, b in zip(p0, p1))
    assert c0 != c2


def test_world_files_are_deterministic(tmp_path):
    a = generate_world(tmp_path / "a", n_images=12, seed=5, image_size=64)
    b = generate_world(tmp_path / "b", n_images=12, seed=5, image_size=64)
    c = generate_world(tmp_path / "c", n_images=12, seed=6, image_size=64)
    assert json.loads(a.read_text()) == json.loads(b.read_text())
    assert json.loads(a.read_text())["images"] != json.loads(c.read_text())["images"]
    for name in ("00000.png", "00011.png"):
        assert (a.parent / "images" / name).read_bytes() == (b.parent / "images" / name).read_bytes()


def test_captions_name_exactly_the_objects(world):
    images = json.loads(world.read_text())["images"]
    assert any(len(im["objects"]) == 2 for im in images) and any(len(im["objects"]) == 1 for im in images)
    for im in images:
        objects = im["objects"]
        captions = [s["raw"] for s in im["sentences"]]
        assert len(captions) == 3 and len(set(captions)) == 3
        for c in captions:
            assert c == c.lower() and c.endswith(".") and len(c.split()) <= 20
            assert words(c, COLOURS) == {o["colour"] for o in objects}
            assert words(c, SHAPES) == {o["shape"] for o in objects}
            for o in objects:
                assert f"{o['size']} {o['colour']} {o['shape']}" in c
                assert re.search(rf"\b{o['position']}\b", c)


def test_two_objects_stay_in_their_own_cells():
    """Every drawn pixel lies in the grid cell of an object of its colour, so objects cannot overlap."""
    rng = random.Random(0)
    size = 96
    cell = size / 3
    checked = 0
    while checked < 30:
        objects = sample_scene(rng, max_objects=2)
        if len(objects) < 2:
            continue
        assert objects[0].position != objects[1].position
        pixels = np.asarray(render_scene(objects, size, rng)).astype(int)
        background = pixels[0, 0]
        ys, xs = np.nonzero(np.any(pixels != background, axis=-1))
        assert len(ys) > 0
        cells = {POSITIONS[int(y // cell) * 3 + int(x // cell)] for y, x in zip(ys, xs)}
        assert cells == {o.position for o in objects}
        for o in objects:
            row, col = divmod(POSITIONS.index(o.position), 3)
            patch = pixels[int(row * cell) : int((row + 1) * cell), int(col * cell) : int((col + 1) * cell)]
            drawn = patch[np.any(patch != background, axis=-1)]
            assert (drawn == RGB[o.colour]).all()
        checked += 1


def test_render_shapes_and_sizes():
    small = np.asarray(render_scene([SceneObject("red", "square", "small", "center")], 96))
    large = np.asarray(render_scene([SceneObject("red", "square", "large", "center")], 96))
    circle = np.asarray(render_scene([SceneObject("red", "circle", "large", "center")], 96))
    triangle = np.asarray(render_scene([SceneObject("red", "triangle", "large", "center")], 96))
    area = {
        k: int(np.all(v == RGB["red"], axis=-1).sum())
        for k, v in dict(small=small, large=large, circle=circle, triangle=triangle).items()
    }
    assert area["large"] > 2.5 * area["small"]
    assert area["triangle"] < area["circle"] < area["large"]
    assert render_scene([], 64).size == (64, 64)


def test_load_captions_round_trip(world):
    out = load_captions(f"synthetic:{world.parent}")
    samples = [s for split in out.values() for s in split]
    assert len(samples) == 40
    assert len(out["val"]) >= 1 and len(out["test"]) >= 1
    raw = {im["filename"]: im for im in json.loads(world.read_text())["images"]}
    for s in samples:
        entry = raw[f"{s.image_id.removeprefix('synthetic:')}.png"]
        assert s.meta == {"objects": entry["objects"]}
        assert s.captions == [x["raw"] for x in entry["sentences"]]
        assert s.split == entry["split"]
        image = Image.open(s.image_path)
        assert image.size == (96, 96)
    assert samples[0].image_id.startswith("synthetic:000")


def test_ensure_world_generates_once(tmp_path):
    out = tmp_path / "w"
    path = ensure_world(out, n_images=6, seed=1, image_size=48)
    stamp = path.stat().st_mtime_ns
    first = (out / "images" / "00000.png").stat().st_mtime_ns
    assert ensure_world(out, n_images=6, seed=1, image_size=48) == path
    assert ensure_world(out) == path  # no parameters given: any existing world will do
    assert path.stat().st_mtime_ns == stamp and (out / "images" / "00000.png").stat().st_mtime_ns == first

    ensure_world(out, n_images=4, seed=1, image_size=48)  # different parameters: regenerated, stale images removed
    assert len(json.loads(path.read_text())["images"]) == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"0000{i}.png" for i in range(4)]


def test_sample_scene_rejects_bad_max_objects():
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(random.Random(0), max_objects=0)


def test_attribute_scoring_reads_back_every_true_caption_and_flags_each_wrong_attribute():
    import random
    from dataclasses import asdict

    from vlmlab.data.synthetic import ATTRIBUTES, attribute_correct, describe_scene, sample_scene

    rng = random.Random(0)
    for _ in range(300):
        objects = sample_scene(rng, max_objects=3)
        truth = [asdict(o) for o in objects]
        assert all(attribute_correct(describe_scene(objects, rng), truth).values())
    one = [{"colour": "red", "shape": "circle", "size": "large", "position": "top left"}]
    wrong = {
        "colour": "a large blue circle at the top left.",
        "shape": "a large red square at the top left.",
        "size": "a small red circle at the top left.",
        "position": "a large red circle at the top.",  # "at the top" is not "at the top left"
        "count": "a large red circle at the top left and a large red circle at the top left.",
    }
    for attribute, caption in wrong.items():
        verdict = attribute_correct(caption, one)
        assert not verdict[attribute], (attribute, verdict)
        if attribute != "count":  # a second object also doubles every other multiset
            assert all(verdict[a] for a in ATTRIBUTES if a not in (attribute, "count")), (attribute, verdict)
    assert not any(attribute_correct("", one)[a] for a in ATTRIBUTES)
