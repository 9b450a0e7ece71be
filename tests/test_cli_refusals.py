"""Bad input to the newer commands is refused in one line (`vlmlab CMD: error: ...`, exit 2) naming the file and
the row or key, before anything is written: make-tasks on broken COCO instances or a missing root, eval questions
on broken question files, chat on a file that is no image or a prompt longer than the LM's context, and a vision
encoder nobody makes. A long question in an evaluation set is cut to fit and counted instead."""

import base64
import copy
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from vlmlab.cli import main
from vlmlab.config import ConfigError, load_config, save_config


def refusal(capsys, argv: list[str], command: str) -> str:
    """Runs the command, checks it was refused in one line with exit 2, returns that line (a model's loading
    progress bars may come before it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert line.startswith(f"vlmlab {command}: error: ") and "Traceback" not in err, err
    return line


# ---- make-tasks on COCO instances -------------------------------------------------------------------------
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
NAMES = ["cat", "dog", "car", "bus", "cup", "tie"]


@pytest.fixture
def coco(tmp_path):
    """A COCO root of 12 photos (distinct bytes), two captions each, 2 boxed objects each: make-tasks reads it."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, captions, annotations = [], [], []
    for i in range(12):
        name = f"{i + 1:012d}.png"
        pixels = np.full((40, 60, 3), COLOURS[i % 6], dtype=np.uint8)
        pixels[i, i] = 0  # no two files alike
        Image.fromarray(pixels).save(root / "val2017" / name)
        images.append({"id": i + 1, "file_name": name, "width": 60, "height": 40})
        a, b = i % 6, (i + 1) % 6
        captions += [{"id": 2 * i + k, "image_id": i + 1, "caption": f"a {NAMES[a]} and a {NAMES[b]}"} for k in (1, 2)]
        for k, (cat, x) in enumerate(((a, 2.0), (b, 40.0))):
            annotations.append(
                {"id": 100 + 2 * i + k, "image_id": i + 1, "category_id": cat + 1, "bbox": [x, 5.0, 10.0, 8.0]}
            )
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    instances = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    return root, instances


def test_the_tiny_coco_root_makes_tasks(coco, tmp_path, capsys):
    """The root the refusals below break, unbroken: make-tasks reads it (so each refusal is the break's)."""
    root, _ = coco
    assert main(["make-tasks", str(tmp_path / "tasks"), "--data", f"coco:{root}"]) == 0
    assert (tmp_path / "tasks" / "tasks.json").is_file()


def _drop(key):
    return lambda d: d["annotations"][3].pop(key)


BROKEN_INSTANCES = {  # what is done to the file -> what the one line must say
    "no bbox": (_drop("bbox"), r"annotations\[3\] \(id 103\) lacks 'bbox'"),
    "no category_id": (_drop("category_id"), r"annotations\[3\] \(id 103\) lacks 'category_id'"),
    "no categories": (lambda d: d.pop("categories"), r"'categories' is None, not a list"),
    "unknown category": (
        lambda d: d["annotations"][3].update(category_id=9999),
        r"annotations\[3\] \(id 103\): category_id 9999 is not in the file's categories",
    ),
    "unknown image": (
        lambda d: d["annotations"][3].update(image_id=9999),
        r"annotations\[3\] \(id 103\): image_id 9999 is not in the file's images",
    ),
    "annotations null": (lambda d: d.update(annotations=None), r"'annotations' is None, not a list"),
    "negative box": (
        lambda d: d["annotations"][3].update(bbox=[-10, -10, -5, -5]),
        r"annotations\[3\] \(id 103\): bbox \[-10, -10, -5, -5\] has a negative width or height",
    ),
    "NaN in box": (
        lambda d: d["annotations"][3].update(bbox=[float("nan"), 1, 2, 3]),
        r"annotations\[3\] \(id 103\): bbox \[nan, 1, 2, 3\] is not 4 finite numbers",
    ),
    "box outside": (
        lambda d: d["annotations"][3].update(bbox=[55, 5, 20, 8]),
        r"annotations\[3\] \(id 103\): bbox \[55, 5, 20, 8\] lies outside its image \(60 x 40, 000000000002.png\)",
    ),
    "three numbers": (
        lambda d: d["annotations"][3].update(bbox=[1, 2, 3]),
        r"annotations\[3\] \(id 103\): bbox \[1, 2, 3\] is not 4 finite numbers",
    ),
    "image without width": (lambda d: d["images"][1].pop("width"), r"images\[1\] \(id 2\) has width None"),
}


@pytest.mark.parametrize("broken", list(BROKEN_INSTANCES))
def test_broken_instances_are_refused_naming_the_record_and_nothing_is_written(coco, tmp_path, capsys, broken):
    root, instances = coco
    change, expected = BROKEN_INSTANCES[broken]
    data = copy.deepcopy(instances)
    change(data)
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))  # NaN is written as NaN, which Python's json reads back
    out = tmp_path / "tasks"
    err = refusal(capsys, ["make-tasks", str(out), "--data", f"coco:{root}"], "make-tasks")
    assert str(path) in err and re.search(expected, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    "text, expected", [("", "empty"), ("{not json", "JSON error at line 1"), ("[1, 2]", "a list, not an object")]
)
def test_an_instances_file_that_is_no_json_object_is_refused(coco, tmp_path, capsys, text, expected):
    root, _ = coco
    (root / "annotations" / "instances_val2017.json").write_text(text)
    out = tmp_path / "tasks"
    err = refusal(capsys, ["make-tasks", str(out), "--data", f"coco:{root}"], "make-tasks")
    assert "instances_val2017.json: not a COCO instances file" in err and expected in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--counts-from-captions"], "--counts-from-captions.*--objects-from-captions.*give both"),
        (["--objects-from-captions", "--objects-min-captions", "0"], "--objects-min-captions.* 0: at least 1"),
        (["--vqa-turns", "0"], "--vqa-turns.* 0: .*at least 1"),
    ],
)
def test_make_tasks_options_are_refused_by_their_flags_before_the_data_is_read(tmp_path, capsys, flags, expected):
    out = tmp_path / "tasks"
    err = refusal(capsys, ["make-tasks", str(out), "--data", f"coco:{tmp_path / 'nowhere'}", *flags], "make-tasks")
    assert re.search(expected, err) and "nowhere" not in err, err  # the option, not the (also missing) data
    assert not out.exists()


def test_a_root_that_does_not_exist_is_refused_and_no_folder_is_made(tmp_path, capsys):
    out = tmp_path / "tasks"
    err = refusal(capsys, ["make-tasks", str(out), "--data", f"coco:{tmp_path / 'nowhere'}"], "make-tasks")
    assert "nowhere" in err and "does not exist" in err
    assert not out.exists()


def test_a_captions_file_that_is_not_json_is_one_line(coco, tmp_path, capsys):
    root, _ = coco
    (root / "annotations" / "captions_val2017.json").write_text("{oops")
    err = refusal(capsys, ["make-tasks", str(tmp_path / "tasks"), "--data", f"coco:{root}"], "make-tasks")
    assert "captions_val2017.json:1: not a COCO captions file" in err
    assert not (tmp_path / "tasks").exists()


# ---- the vision encoder's name --------------------------------------------------------------------------
def test_an_unknown_vision_encoder_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    argv = ["train", str(config), "--set", "vision.name=efficientnet-lite9", "--output-dir", str(out)]
    err = refusal(capsys, argv, "train")
    assert "vision.name 'efficientnet-lite9' is unknown" in err and "efficientnet-lite0" in err
    assert not out.exists()


def test_the_config_knows_every_encoder_the_model_builds():
    from vlmlab.config import LITE_ENCODERS
    from vlmlab.model.efficientnet_lite import LITE_VARIANTS

    assert set(LITE_ENCODERS) == set(LITE_VARIANTS)
    for name in ("efficientnet-lite2", "hf:openai/clip-vit-base-patch32"):
        assert load_config(None, [f"vision.name={name}"]).vision.name == name
    with pytest.raises(ConfigError, match="vision.name 'hf:' is unknown"):
        load_config(None, ["vision.name='hf:'"])


# ---- eval questions on a broken question file -------------------------------------------------------------
@pytest.fixture
def config_only_run(tmp_path, tiny_config):
    """A run folder with only its config.yaml: question files are read (and refused) before any model loads."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(tmp_path), run / "config.yaml")
    return run


def _pope_line(**fields):
    record = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"} | fields
    return json.dumps({k: v for k, v in record.items() if v is not None})


BROKEN_QUESTIONS = {
    "pope without label": (
        "pope",
        "p.json",
        _pope_line() + "\n" + _pope_line(label=None) + "\n",
        "line 2 lacks 'label'",
    ),
    "pope first line without label": ("pope", "p.json", _pope_line(label=None) + "\n", "line 1 lacks 'label'"),
    "pope label maybe": ("pope", "p.json", _pope_line(label="maybe") + "\n", "line 1: label 'maybe' is not yes/no"),
    "empty": ("pope", "p.json", "", "is empty: no questions"),
    "vqa not json": ("vqa", "q.json", "{oops\n", "cannot be read as JSON"),
    "mmbench base64 of no image": (
        "mmbench",
        "m.tsv",
        "index\tquestion\tA\tB\tanswer\timage\n0\tWhat?\tx\ty\tA\t"
        + base64.b64encode(b"no image here").decode()
        + "\n",
        "row 2: image is base64 but not of an image",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN_QUESTIONS))
def test_a_broken_question_file_is_one_line_naming_the_row(config_only_run, tmp_path, capsys, broken):
    task, name, text, expected = BROKEN_QUESTIONS[broken]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    argv = ["eval", "questions", str(config_only_run), "--task", task, "--questions", str(path), "--out-dir", str(out)]
    err = refusal(capsys, argv, "eval")
    assert str(path) in err and expected in err, err
    assert not list(out.glob("eval_*"))


# ---- long prompts and files that are no image, with a tiny trained run --------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    from vlmlab.train.loop import train

    root = tmp_path_factory.mktemp("refusals")
    old = os.environ.get("VLMLAB_CACHE")
    os.environ["VLMLAB_CACHE"] = str(root / "cache")
    run_dir = train(tiny_config(root, "train.max_steps=2", "train.eval_every=2", "generate.max_new_tokens=4"))
    image = sorted((root / "world" / "images").glob("*.png"))[0]
    yield run_dir, image
    if old is None:
        os.environ.pop("VLMLAB_CACHE", None)
    else:
        os.environ["VLMLAB_CACHE"] = old


LONG = "is there a red circle " * 200  # ~1000 tokens; the tiny GPT-2 reads 128 positions


def test_a_prompt_longer_than_the_context_is_refused_by_chat(run, capsys):
    run_dir, image = run
    err = refusal(capsys, ["chat", str(run_dir), str(image), LONG], "chat")
    assert "language model reads 128" in err and "4 visual tokens" in err and "shorten it by" in err


def test_a_long_line_of_a_questions_file_is_named(run, tmp_path, capsys):
    run_dir, image = run
    questions = tmp_path / "q.txt"
    questions.write_text("what is it?\n\n" + LONG + "\n")
    err = refusal(capsys, ["chat", str(run_dir), str(image), "--questions-file", str(questions)], "chat")
    assert f"{questions}: line 3: the prompt is" in err


def test_a_file_that_is_no_image_is_named_by_chat(run, tmp_path, capsys):
    run_dir, _ = run
    text = tmp_path / "text.txt"
    text.write_text("not an image\n")
    err = refusal(capsys, ["chat", str(run_dir), str(text), "what is it?"], "chat")
    assert str(text) in err


def test_a_long_pope_question_is_cut_to_fit_and_counted(run, tmp_path, capsys):
    run_dir, image = run
    pope = tmp_path / "pope_test_random.json"
    lines = [_pope_line(question_id=i, image=str(image), label="yes" if i % 2 else "no") for i in range(3)]
    lines.append(_pope_line(question_id=3, image=str(image), text=LONG * 20, label="no"))  # ~100k characters
    pope.write_text("\n".join(lines) + "\n")
    argv = ["eval", "questions", str(run_dir), "--task", "pope", "--questions", str(pope), "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "1 of 4 questions are longer than the language model's context" in capsys.readouterr().out
    record = json.loads((tmp_path / "eval_pope.json").read_text())
    assert record["questions_cut_to_fit"] == ["3"] and record["questions"] == 4


# ---- the model's context, on the untrained tiny model -------------------------------------------------------
def test_the_context_is_read_from_the_lm_config(tiny_vlm):
    assert tiny_vlm.context_length == 128  # the tiny GPT-2's n_positions
    assert tiny_vlm.prompt_budget(image=True, new_tokens=10) == 128 - tiny_vlm.num_visual_tokens - 10


def test_cut_prompts_fit_and_keep_the_image_and_the_end(tiny_vlm):
    from vlmlab.data.formats import InputError
    from vlmlab.model.context import PromptTooLong

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    messages = [{"role": "user", "content": "<image>\n" + LONG + " The end?"}]
    with pytest.raises(PromptTooLong, match="language model reads 128"):
        tiny_vlm.chat(image, messages, max_new_tokens=5)
    with pytest.raises(PromptTooLong):
        tiny_vlm.reply_logprobs([image], [messages], [["yes"], ["no"]])
    assert isinstance(PromptTooLong("x"), InputError)
    (answer,) = tiny_vlm.chat_batch([image, None][:1], [messages], cut_long=True, max_new_tokens=5)
    assert isinstance(answer, str)
    (fitted,) = tiny_vlm._fitted([messages], [True], 5, cut_long=True, with_visual=True)
    whole = tiny_vlm.encode_messages(messages, generation=True)
    assert fitted.truncated and len(fitted.ids) + tiny_vlm.num_visual_tokens + 5 == 128
    assert fitted.ids[: whole.image_position] == whole.ids[: whole.image_position]  # the template's start
    assert fitted.image_position == whole.image_position
    assert fitted.ids[-20:] == whole.ids[-20:]  # the end of the question and the assistant's header
    assert tiny_vlm.reply_logprobs([image], [messages], [["yes"], ["no"]], cut_long=True).shape == (1, 2)


def test_a_caption_asked_for_more_tokens_than_the_context_is_refused(tiny_vlm):
    from vlmlab.model.context import PromptTooLong

    image = Image.new("RGB", (32, 32), (30, 30, 200))
    with pytest.raises(PromptTooLong, match="200 tokens to generate"):
        tiny_vlm.caption([image], max_new_tokens=200)
