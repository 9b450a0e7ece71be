"""SugarCrepe by a captioner's own likelihood: scores that padding cannot move, a swapped-image control that never
gives an item its own photo, photos the run trained on left out, and refusals before anything loads."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import SHARED_DATA, require
from vlmlab.eval.caption_matching import (
    IMAGE_PMI,
    SWAPPED_PMI,
    add_image_pmi_rows,
    caption_logprobs,
    caption_matching,
    format_caption_matching,
    matched,
    paired_gain,
    swapped_images,
)


def test_a_captions_logprob_in_a_batch_equals_it_scored_alone(tiny_vlm):
    """Padding must not leak into the score: SugarCrepe's negatives differ in length from their captions."""
    torch.manual_seed(0)
    photos = [Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()) for _ in range(2)]
    images = [photos[0], None, photos[1]]
    captions = ["a red circle", "a large blue square on the left of the picture", "green"]
    together = caption_logprobs(tiny_vlm, images, captions, batch_size=3)
    alone = [caption_logprobs(tiny_vlm, [im], [c])[0] for im, c in zip(images, captions)]
    assert together == pytest.approx(alone, abs=1e-3)
    assert all(t < 0 for t in together) and together[1] < together[2]  # summed: the long caption costs more
    with_image = caption_logprobs(tiny_vlm, [photos[0]], captions[:1])[0]
    assert with_image != pytest.approx(caption_logprobs(tiny_vlm, [None], captions[:1])[0])  # the image is read


@given(st.lists(st.sampled_from("abcdef"), min_size=2, max_size=30).filter(lambda xs: len(set(xs)) > 1))
def test_the_swapped_image_is_never_the_items_own_photo(images):
    swapped = swapped_images(images)
    assert len(swapped) == len(images) and all(s != own for s, own in zip(swapped, images))
    assert set(swapped) == set(images)  # every photo stands in for another: no photo is favoured


def test_one_photo_has_no_swapped_image_control():
    with pytest.raises(ValueError, match="at least 2 photos"):
        swapped_images(["a", "a"])


def test_ties_count_half_and_the_gain_is_paired_item_by_item():
    assert matched([-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0]) == [1.0, 0.0, 0.5]
    record = {"logprobs": {"model": {"x": [[-1, -2], [-1, -2], [-3, -1]]}, "blind LM": {"x": [[-2, -1]] * 3}}}
    gain = paired_gain(record, "model", "blind LM")
    assert gain["x"][0] == pytest.approx(2 / 3) and gain["all"] == gain["x"]
    assert gain["x"][1] == pytest.approx(1 / 3)  # the sd of (1, 1, 0), sqrt(1/3), over sqrt(3)


def test_image_pmi_matches_the_caption_its_image_raises_most_not_the_likeliest_one():
    """Item 1: the text prior prefers the negative (-4 > -5) but the image raises the true caption by 3 nats and the
    negative by 0.5: PMI matches it, plain likelihood does not. Item 2: the image raises neither: a tie."""
    record = {
        "logprobs": {
            "model": {"x": [[-5.0, -4.0], [-6.0, -7.0]]},
            "swapped image": {"x": [[-8.0, -4.0], [-6.0, -7.0]]},
            "no image": {"x": [[-8.0, -4.5], [-6.0, -7.0]]},
        },
        "rows": {},
        "errors": {},
    }
    assert matched(*zip(*record["logprobs"]["model"]["x"])) == [0.0, 1.0]
    add_image_pmi_rows(record)
    assert record["logprobs"][IMAGE_PMI]["x"] == [[3.0, 0.5], [0.0, 0.0]]
    assert record["rows"][IMAGE_PMI] == {"x": 0.75, "all": 0.75}
    assert record["rows"][SWAPPED_PMI]["x"] == 0.25  # the swapped photo raises the true caption not at all
    assert paired_gain(record, IMAGE_PMI, SWAPPED_PMI)["x"][0] == pytest.approx(0.5)


def test_a_conversation_run_and_a_seeing_blind_run_are_refused_before_loading(tmp_path):
    from vlmlab.config import load_config, save_config

    folder = tmp_path / "sugar-crepe"
    folder.mkdir()
    conversation, seeing = tmp_path / "conversation", tmp_path / "seeing"
    for run, overrides in ((conversation, [f"data.tasks={tmp_path}"]), (seeing, [])):
        run.mkdir()
        save_config(load_config(None, overrides), run / "config.yaml")
    with pytest.raises(ValueError, match="trained on conversations"):
        caption_matching(conversation, folder)
    with pytest.raises(ValueError, match="its connector is 'qformer', not 'none'"):
        caption_matching(seeing, folder, blind_run=seeing)
    with pytest.raises(FileNotFoundError, match="no SugarCrepe category files"):
        caption_matching(seeing, folder)


@pytest.mark.slow  # the exported photo captioner on real SugarCrepe items
def test_the_photo_captioner_is_scored_on_photos_it_never_trained_on(tmp_path):
    from vlmlab.config import load_config
    from vlmlab.eval.caption_matching import default_sugarcrepe_images, evaluate_caption_matching, read_sugarcrepe
    from vlmlab.eval.question_scores import photo_key, trained_photo_keys
    from vlmlab.run.release import resolve_model

    folder = require(SHARED_DATA / "questions" / "sugar-crepe")
    evaluate_caption_matching("zoo:photo-captioner", folder, limit=12, out_dir=tmp_path)
    record = json.loads((tmp_path / "sugarcrepe.json").read_text())
    seen = trained_photo_keys(load_config(resolve_model("zoo:photo-captioner") / "config.yaml"))
    asked = read_sugarcrepe(folder, default_sugarcrepe_images(folder), limit=12)
    unseen = {c: sum(photo_key(r["image"]) not in seen for r in rows) for c, rows in asked.items()}
    assert record["items"] == {c: n for c, n in unseen.items() if n >= 2}  # only photos it never trained on
    assert record["dropped_trained_photos"] > 0 and record["run"] == "zoo:photo-captioner"  # trained on its photos
    assert set(record["rows"]) == {"model", "swapped image", "no image", IMAGE_PMI, SWAPPED_PMI}
    assert "model - no image" in record and f"{IMAGE_PMI} - {SWAPPED_PMI}" in record
    # the true caption is more likely given its photo than given none, on average over the kept items
    model, none = record["logprobs"]["model"], record["logprobs"]["no image"]
    lift = [m[0] - n[0] for c in model for m, n in zip(model[c], none[c])]
    assert sum(lift) / len(lift) > 0
    assert "| model - no image (paired) |" in format_caption_matching(record)
    assert f"| {IMAGE_PMI} - {SWAPPED_PMI} (paired) |" in format_caption_matching(record)
    assert (tmp_path / "sugarcrepe.md").read_text().startswith("SugarCrepe by caption likelihood")
