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


def test_sample_scene_rejects_bad_max_objects(tmp_path):
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(random.Random(0), max_objects=0)
    world = generate_world(tmp_path, n_images=4, seed=0, image_size=32)
    with pytest.raises(ValueError, match="max_objects must be in 1..9"):  # refused before the old world is touched
        generate_world(tmp_path, n_images=4, seed=0, image_size=32, max_objects=10)
    assert world.is_file()
    with pytest.raises(TypeError, match="unknown parameters \\['colour'\\]"):
        ensure_world(tmp_path, n_images=4, colour="red")


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


def test_layout_boxes_frame_the_drawn_pixels_and_visible_shares_count_what_later_shapes_cover():
    """Without occlusion every shape is whole; with it, a shape drawn later covers part of its neighbour, and the
    visible share is what the picture shows of it (checked on pixels, each shape its own colour)."""
    size = 96
    layout: list[dict] = []
    pixels = np.asarray(render_scene([SceneObject("red", "square", "large", "center")], size, layout=layout))
    ys, xs = np.nonzero(np.all(pixels == RGB["red"], axis=-1))
    x0, y0, x1, y1 = layout[0]["box"]
    assert layout[0]["visible"] == 1.0
    assert abs(xs.min() / size - x0) < 0.02 and abs((xs.max() + 1) / size - x1) < 0.02
    assert abs(ys.min() / size - y0) < 0.02 and abs((ys.max() + 1) / size - y1) < 0.02

    pair = [SceneObject("red", "square", "large", "left"), SceneObject("blue", "square", "large", "center")]
    for occlusion in (False, True):
        layout = []
        pixels = np.asarray(render_scene(pair, size, occlusion=occlusion, layout=layout))
        red_box, blue_box = layout[0]["box"], layout[1]["box"]
        drawn_red = int(np.all(pixels == RGB["red"], axis=-1).sum())
        whole_red = (red_box[2] - red_box[0]) * (red_box[3] - red_box[1]) * size * size
        assert layout[1]["visible"] == 1.0  # drawn last
        if occlusion:
            assert red_box[2] > blue_box[0]  # the boxes overlap
            assert 0.5 < layout[0]["visible"] < 0.95
            assert abs(drawn_red / whole_red - layout[0]["visible"]) < 0.05
        else:
            assert red_box[2] <= blue_box[0] and layout[0]["visible"] == 1.0


def test_an_occluded_world_records_it_and_is_another_world(tmp_path):
    plain = generate_world(tmp_path / "w", n_images=30, seed=2, max_objects=4, image_size=64)
    objects = [o for im in json.loads(plain.read_text())["images"] for o in im["objects"]]
    assert all(o["visible"] == 1.0 and len(o["box"]) == 4 for o in objects)
    assert {len(im["objects"]) for im in json.loads(plain.read_text())["images"]} == {1, 2, 3, 4}
    occluded = ensure_world(tmp_path / "w", n_images=30, seed=2, max_objects=4, image_size=64, occlusion=True)
    world = json.loads(occluded.read_text())
    assert world["params"]["occlusion"] is True
    assert any(o["visible"] < 1.0 for im in world["images"] for o in im["objects"])


def test_the_config_makes_the_world_it_names(tmp_path):
    from vlmlab.config import ConfigError, load_config
    from vlmlab.data.pairs import load_samples

    spec = f"data.datasets=[synthetic:{tmp_path / 'multi'}]"
    cfg = load_config(
        None, [spec, "data.synthetic_images=20", "data.synthetic_max_objects=4", "data.synthetic_occlusion=true"]
    )
    samples = load_samples(cfg)
    params = json.loads((tmp_path / "multi" / "dataset_synthetic.json").read_text())["params"]
    assert params["max_objects"] == 4 and params["occlusion"] is True
    assert max(len(s.meta["objects"]) for split in samples.values() for s in split) > 1
    with pytest.raises(ConfigError, match="synthetic_max_objects"):
        load_config(None, ["data.synthetic_max_objects=10"])


def test_object_scores_need_each_colour_on_its_own_shape():
    from dataclasses import asdict

    from vlmlab.data.synthetic import OBJECT_SCORES, attribute_correct, caption_objects, object_scores

    rng = random.Random(1)
    for _ in range(300):  # every true caption describes every object exactly
        objects = sample_scene(rng, max_objects=4)
        truth = [asdict(o) for o in objects]
        assert object_scores(describe_scene(objects, rng), truth) == dict.fromkeys(OBJECT_SCORES, 1.0)
    scene = [
        {"colour": "blue", "shape": "square", "size": "small", "position": "top left"},
        {"colour": "red", "shape": "circle", "size": "large", "position": "center"},
    ]
    swapped = "a small red square at the top left and a large blue circle in the center."
    assert all(attribute_correct(swapped, scene).values())  # per attribute, the swap is invisible
    assert object_scores(swapped, scene) == dict.fromkeys(OBJECT_SCORES, 0.0)
    half = "a small blue square at the top left and a large red circle at the top."  # one place wrong
    assert object_scores(half, scene) == {"objects exact": 0.5, "objects real": 0.5, "colour-shape pairs": 1.0}
    one = "a small blue square at the top left."
    assert object_scores(one, scene) == {"objects exact": 0.5, "objects real": 1.0, "colour-shape pairs": 0.5}
    assert object_scores("", scene) == dict.fromkeys(OBJECT_SCORES, 0.0)
    assert caption_objects("a circle and a large red square") == [
        {"colour": None, "shape": "circle", "size": None, "position": None},
        {"colour": "red", "shape": "square", "size": "large", "position": None},
    ]
