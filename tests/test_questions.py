"""Readers for conversation and question sets, on small files written here and on the real sets in ../shared."""

import base64
import io
import json

import pytest
from PIL import Image

from conftest import SHARED_DATA, require
from vlmlab.data.questions import (
    QuestionFileError,
    read_aokvqa,
    read_llava_conversations,
    read_mmbench_tsv,
    read_pope,
    read_vqa_v2,
)


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_llava_conversations_with_and_without_image(tmp_path):
    path = write(
        tmp_path / "conv.json",
        [
            {
                "id": "a",
                "image": "x.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is this?"},
                    {"from": "gpt", "value": "A dog."},
                    {"from": "human", "value": "What colour?"},
                    {"from": "gpt", "value": "Brown."},
                ],
            },
            {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        ],
    )
    a, b = read_llava_conversations(path, image_root=tmp_path)
    assert a.image == str(tmp_path / "x.jpg") and len(a.messages) == 4
    assert a.messages[1] == {"role": "assistant", "content": "A dog."}
    assert b.image is None


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": 1, "conversations": []}, "non-empty 'conversations'"),
        ({"id": 1, "conversations": [{"from": "bot", "value": "x"}]}, "turn 0: expected"),
        ({"id": 1, "conversations": [{"from": "gpt", "value": "x"}]}, "first turn must be the human's"),
        ({"id": 1, "conversations": [{"from": "human", "value": "<image> x"}]}, "placeholder but no 'image'"),
    ],
)
def test_llava_errors_name_file_and_record(tmp_path, record, message):
    path = write(tmp_path / "conv.json", [record])
    with pytest.raises(QuestionFileError, match=message) as e:
        read_llava_conversations(path)
    assert "conv.json: record 0" in str(e.value)


def test_vqa_v2_joins_questions_and_annotations(tmp_path):
    qs = write(tmp_path / "q.json", {"questions": [{"question_id": 7, "image_id": 42, "question": "How many?"}]})
    an = write(
        tmp_path / "a.json",
        {
            "annotations": [
                {
                    "question_id": 7,
                    "answers": [{"answer": "2"}] * 10,
                    "answer_type": "number",
                    "question_type": "how many",
                }
            ]
        },
    )
    (q,) = read_vqa_v2(qs, an, image_root=tmp_path)
    assert q.image == str(tmp_path / "000000000042.jpg") and q.answers == ["2"] * 10
    assert (q.answer_type, q.question_type) == ("number", "how many")
    write(tmp_path / "a.json", {"annotations": []})
    with pytest.raises(QuestionFileError, match="no annotation for question_id 7"):
        read_vqa_v2(qs, an)


def test_pope_lines_and_setting_from_the_file_name(tmp_path):
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text(
        '{"question_id": 1, "image": "i.jpg", "text": "Is there a dog in the image?", "label": "yes"}\n\n'
        '{"question_id": 2, "image": "i.jpg", "text": "Is there a cat in the image?", "label": "no"}\n'
    )
    qs = read_pope(path)
    assert [q.answers for q in qs] == [["yes"], ["no"]] and {q.question_type for q in qs} == {"adversarial"}
    path.write_text('{"question_id": 1, "image": "i.jpg", "text": "?", "label": "maybe"}\n')
    with pytest.raises(QuestionFileError, match="line 1: label 'maybe'"):
        read_pope(path)


def test_mmbench_tsv_with_base64_and_path_images(tmp_path):
    (tmp_path / "pic.jpg").write_bytes(b"not decoded here")
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, "JPEG")  # base64 is checked to hold an image (its header), not decoded
    b64 = base64.b64encode(jpeg.getvalue()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    (tmp_path / "mm.tsv").write_text(
        header + f"0\tWhat is it?\tnan\tcat\tdog\tbird\tfish\tB\tobject\t{b64}\n"
        "1\tHow many?\tlook closely\t1\t2\t\t\tA\tcount\tpic.jpg\n"
    )
    a, b = read_mmbench_tsv(tmp_path / "mm.tsv")
    assert a.image is None and a.image_data == jpeg.getvalue() and a.answer_index == 1 and a.hint == ""
    assert b.image == str(tmp_path / "pic.jpg") and b.choices == ["1", "2"] and b.hint == "look closely"
    (tmp_path / "mm.tsv").write_text(header + "0\tQ\t\tcat\tdog\t\t\tC\tx\tpic.jpg\n")
    with pytest.raises(QuestionFileError, match="row 2: answer 'C'"):
        read_mmbench_tsv(tmp_path / "mm.tsv")


def test_real_question_sets_read_whole():
    root = require(SHARED_DATA / "questions")
    images = SHARED_DATA / "coco2017-val" / "val2017"
    aok = read_aokvqa(root / "aokvqa" / "aokvqa_v1p0_val.json", images)
    assert len(aok) == 270 and all(len(q.answers) == 10 and len(q.choices) == 4 for q in aok)
    assert all(q.image and (images / q.image.split("/")[-1]).exists() for q in aok)
    for setting in ("random", "popular", "adversarial"):
        pope = read_pope(root / "pope" / f"coco_pope_{setting}.json")
        assert len(pope) == 6 and {q.question_type for q in pope} == {setting}
        assert sum(q.answers == ["yes"] for q in pope) == 3  # 3 positives, each followed by a negative
