"""The VLMEvalKit adapter's message handling (VLMEvalKit itself is not on PyPI)."""

import pytest

from vlmlab.integrations.vlmevalkit import to_messages


def test_interleaved_items_become_one_turn_with_the_image_in_place():
    image, messages = to_messages(
        [{"type": "text", "value": "Look:"}, {"type": "image", "value": "/x.jpg"}, {"type": "text", "value": "What?"}]
    )
    assert image == "/x.jpg" and messages == [{"role": "user", "content": "Look:\n<image>\nWhat?"}]
    assert to_messages("plain text") == (None, [{"role": "user", "content": "plain text"}])


@pytest.mark.parametrize(
    "message, error",
    [
        ([{"type": "image", "value": "a"}, {"type": "image", "value": "b"}], "a second image"),
        ([{"type": "video", "value": "v.mp4"}], "type 'video'"),
    ],
)
def test_what_a_vlmlab_model_cannot_read_is_refused(message, error):
    with pytest.raises(ValueError, match=error):
        to_messages(message)


def test_the_adapter_answers_with_a_real_tiny_model(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from PIL import Image

    from vlmlab.config import load_config
    from vlmlab.integrations.vlmevalkit import VlmlabVLMEvalKit
    from vlmlab.model.vlm import build_vlm

    adapter = VlmlabVLMEvalKit.__new__(VlmlabVLMEvalKit)  # a fresh model instead of a trained run
    adapter.model = build_vlm(load_config(None, [f"vision.name=hf:{tiny_clip_dir}", f"lm.name={tiny_gpt2_dir}"]))
    adapter.max_new_tokens = 3
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "r.png")
    reply = adapter.generate(
        [{"type": "image", "value": str(tmp_path / "r.png")}, {"type": "text", "value": "Colour?"}]
    )
    assert isinstance(reply, str)
