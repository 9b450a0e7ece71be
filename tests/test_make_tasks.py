"""`vlmlab make-tasks` on a hand-made synthetic world whose every answer is known from its scene list.

The world is written in Karpathy's format with the scenes spelled out here (not sampled), so each
question read back from the written files can be answered from the scene by hand and compared.
"""

import json
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest

from vlmlab.cli import main
from vlmlab.config import load_config, save_config
from vlmlab.data.formats import CaptionSample
from vlmlab.data.grounded_questions import MC_SUFFIX, ImageFacts, pope_questions
from vlmlab.data.make_tasks import grouped_turns, make_tasks, rotated_rows
from vlmlab.data.pairs import load_samples
from vlmlab.data.questions import read_llava_conversations, read_mmbench_tsv, read_pope, read_vqa_v2
from vlmlab.data.synthetic import POSITIONS, SceneObject, render_scene

O = SceneObject  # noqa: E741 (colour, shape, size, position)
COLUMN = {p: POSITIONS.index(p) % 3 for p in POSITIONS}

# every shape at most once per scene, so "the circle" always names one object
TRAIN = [
    [O("red", "circle", "large", "top left")],
    [O("blue", "square", "small", "center"), O("green", "triangle", "large", "right")],
    [O("yellow", "triangle", "small", "bottom")],
    [O("purple", "circle", "small", "left"), O("orange", "square", "large", "top right")],
]
TEST = [
    [O("red", "square", "large", "left"), O("blue", "circle", "small", "right")],
    [O("green", "triangle", "small", "top left")],
    [O("orange", "circle", "large", "bottom right"), O("yellow", "triangle", "small", "bottom left")],
    [O("purple", "square", "small", "center")],
]


def write_world(root: Path, splits: dict[str, list[list[SceneObject]]]) -> Path:
    """A Karpathy-format world with the given scenes per split; returns the JSON path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for split, scenes in splits.items():
        for objects in scenes:
            name = f"{len(entries):03d}.png"
            render_scene(objects, 64, random.Random(len(entries))).save(root / "images" / name)
            words = " and ".join(f"a {o.size} {o.colour} {o.shape}" for o in objects)
            entries.append(
                {
                    "filename": name,
                    "filepath": "images",
                    "split": split,
                    "sentences": [{"raw": f"{words}."}],
                    "objects": [asdict(o) for o in objects],
                }
            )
    path = root / "dataset_hand.json"
    path.write_text(json.dumps({"dataset": "hand", "images": entries}))
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("hand")
    world = write_world(root / "world", {"train": TRAIN, "val": TRAIN[:1], "test": TEST})
    out = root / "tasks"
    summary = make_tasks(load_config(None, [f"data.datasets=[karpathy:{world}]"]), out)
    scenes = {}
    for entry in json.loads(world.read_text())["images"]:
        path = str((world.parent / "images" / entry["filename"]).resolve())
        scenes[path] = [SceneObject(**o) for o in entry["objects"]]
    return out, summary, scenes


def answer_from_scene(question: str, objects: list[SceneObject]) -> str | None:
    """The answer a person gives from the scene list, for each question kind make-tasks writes."""
    shapes = Counter(o.shape for o in objects)
    by_shape = {o.shape: o for o in objects}
    if m := re.fullmatch(r"Is there an? (\w+) in the image\?", question):
        return "yes" if m[1] in shapes else "no"
    if m := re.fullmatch(r"How many (\w+?)s are there\?", question):
        return str(shapes[m[1]])
    if m := re.fullmatch(r"What colou?r is the (\w+)\?", question):
        return by_shape[m[1]].colour
    if m := re.fullmatch(r"Is the (\w+) small or large\?", question):
        return by_shape[m[1]].size
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return by_shape[m[1]].position
    if m := re.fullmatch(r"Is the (\w+) to the left or to the right of the (\w+)\?", question):
        return "left" if COLUMN[by_shape[m[1]].position] < COLUMN[by_shape[m[2]].position] else "right"
    return None


def test_every_vqa_answer_is_what_the_scene_says(tasks):
    out, summary, scenes = tasks
    test = read_vqa_v2(out / "vqa_test_questions.json", out / "vqa_test_annotations.json")
    assert summary["files"]["vqa_test_questions.json"] == len(test) > 0
    kinds = Counter()
    for q in test:
        objects = scenes[str(Path(q.image).resolve())]
        assert len(q.answers) == 10 and q.answer_type in ("yes/no", "number", "other")
        if q.question == "What shape is in the image?":
            assert q.answers[0] in {o.shape for o in objects}, q
            continue
        expected = answer_from_scene(q.question, objects)
        assert expected is not None, f"a question kind this test does not know: {q.question!r}"
        assert set(q.answers) == {expected}, (q.question, q.answers, objects)
        kinds[q.question_type] += 1
    # presence (both answers), counting, left/right, colour, size, position all appear
    assert {"is there a", "how many", "left or right", "what color is the", "what size is the", "where is the"} <= set(
        kinds
    )
    assert Counter(q.answers[0] for q in test if q.question_type == "is there a").keys() == {"yes", "no"}


def test_only_test_images_are_evaluated_and_train_images_are_trained_on(tasks):
    out, summary, scenes = tasks
    test_images = {str(Path(p).resolve()) for p in list(scenes)[len(TRAIN) + 1 :]}
    assert summary["images"] == {"train": len(TRAIN), "val": 1, "test": len(TEST)}
    evaluated = {q.image for q in read_vqa_v2(out / "vqa_test_questions.json", out / "vqa_test_annotations.json")}
    evaluated |= {q.image for q in read_mmbench_tsv(out / "mmbench_test.tsv")}
    for setting in ("random", "popular", "adversarial"):
        evaluated |= {q.image for q in read_pope(out / f"pope_test_{setting}.json")}
    trained = {c.image for c in read_llava_conversations(out / "conversations_train.json")}
    trained |= {c.image for c in read_llava_conversations(out / "vqa_conversations_train.json")}
    assert {str(Path(p).resolve()) for p in evaluated} == test_images
    assert not trained & evaluated and len(trained) == len(TRAIN)


def test_conversations_are_llava_records_with_one_image_in_the_first_turn(tasks):
    out, _, scenes = tasks
    records = read_llava_conversations(out / "conversations_train.json")
    assert len(records) == len(TRAIN)
    for c in records:
        roles = [m["role"] for m in c.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert [m["content"].count("<image>") for m in c.messages if m["role"] == "user"][0] == 1
        assert sum(m["content"].count("<image>") for m in c.messages) == 1
        objects = scenes[c.image]
        assert c.messages[1]["content"].lower().startswith("a ")  # the caption, capitalised
        for question, reply in zip(c.messages[4::2], c.messages[5::2]):  # after description + object list
            expected = answer_from_scene(question["content"], objects)
            if expected is not None:
                assert reply["content"] == expected.capitalize() + "."
    vqa = read_llava_conversations(out / "vqa_conversations_train.json")
    lettered = 0
    for c in vqa:
        question, *rest = c.messages[0]["content"].removeprefix("<image>\n").split("\n")
        expected = answer_from_scene(question, scenes[c.image])
        reply = c.messages[1]["content"]
        if rest and rest[-1] == MC_SUFFIX.strip():  # lettered options: the letter names the right option
            lettered += 1
            options = {line[0]: line[3:] for line in rest[:-1]}
            assert list(options) == list("ABCD")[: len(options)] and reply in options
            assert expected is None or options[reply] == expected
        else:
            assert expected is None or reply == expected
    assert 0 < lettered < len(vqa)  # the vqa stage also learns the multiple-choice format


def test_mmbench_rows_are_the_four_rotations_and_the_right_option_is_right(tasks):
    out, summary, scenes = tasks
    rows = read_mmbench_tsv(out / "mmbench_test.tsv")
    assert summary["files"]["mmbench_test.tsv"] == len(rows) > 0
    groups = defaultdict(list)
    for q in rows:
        groups[q.group].append(q)
    for group in groups.values():
        assert len(group) == 4 and len({q.question for q in group}) == 1
        first = group[0].choices
        for k, q in enumerate(group):
            assert q.choices == first[k:] + first[:k]  # rotation k of the first row
        right = {q.choices[q.answer_index] for q in group}
        assert len(right) == 1  # the answer letter moves with its option
        expected = answer_from_scene(group[0].question, scenes[group[0].image])
        assert right == {expected}, (group[0].question, right, scenes[group[0].image])
        assert first.count(expected) == 1  # no distractor is also right


def test_rotated_rows_letters_by_hand():
    rows = rotated_rows(10, "/x.png", "Q?", ["w", "x", "y", "z"], right=2, category="object")
    assert [r[0] for r in rows] == [10, 11, 12, 13] and {r[1] for r in rows} == {10}
    assert [r[4:8] for r in rows][1] == ["x", "y", "z", "w"]
    assert [r[8] for r in rows] == ["C", "B", "A", "D"]  # "y" at index 2, 1, 0, 3


def test_pope_on_the_synthetic_world_asks_about_present_and_absent_shapes(tasks):
    out, summary, scenes = tasks
    for setting in ("random", "popular", "adversarial"):
        items = read_pope(out / f"pope_test_{setting}.json")
        assert summary["files"][f"pope_test_{setting}.json"] == len(items) > 0
        labels = [q.answers[0] for q in items]
        assert labels == ["yes", "no"] * (len(items) // 2)  # each positive followed by its negative
        for q in items:
            assert answer_from_scene(q.question, scenes[q.image]) == q.answers[0]


def _facts(path, names):
    return ImageFacts(CaptionSample(path, path, ["c"], "test"), [{"name": n, "cx": None} for n in names])


def test_popular_negatives_count_frequency_over_the_whole_annotated_set():
    test = [_facts("/t.jpg", ["dog", "cat", "car"])]
    train = [_facts(f"/{i}.jpg", ["umbrella", "oven"] if i < 5 else ["oven"]) for i in range(8)]
    items = pope_questions(test, "popular", population=test + train)
    negatives = [text for _, text, label in items if label == "no"]
    # oven is in 8 images, umbrella in 5: the negatives in that order, with "an" before a vowel
    assert negatives[:2] == ["Is there an oven in the image?", "Is there an umbrella in the image?"]
    assert len(negatives) == 2  # only two absent categories exist: no third pair


def test_popular_negatives_with_equal_counts_come_out_alike_in_every_process():
    """Tied frequencies broke in set order, which follows each process's string hashing (PYTHONHASHSEED): two
    runs of make-tasks wrote different negatives (8 of 1,435 photos-recipe-boxes training questions)."""
    import subprocess
    import sys

    code = (
        "from vlmlab.data.formats import CaptionSample; from vlmlab.data.grounded_questions import ImageFacts, pope_questions\n"
        "f = lambda p, ns: ImageFacts(CaptionSample(p, p, ['c'], 'test'), [{'name': n, 'cx': None} for n in ns])\n"
        "names = ['oven', 'sink', 'bench', 'kite', 'fork', 'vase', 'bowl', 'cake']\n"
        "test = [f('/t.jpg', ['dog', 'cat', 'car'])]\n"
        "pop = test + [f(f'/{i}.jpg', names) for i in range(3)]  # every absent category as frequent as the next\n"
        "print(pope_questions(test, 'popular', population=pop))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": str(seed)}, capture_output=True, text=True, check=True
        ).stdout
        for seed in range(6)
    }
    assert len(runs) == 1, runs


def test_an_image_in_both_training_and_evaluation_is_refused(tmp_path):
    world = write_world(tmp_path / "world", {"train": TRAIN, "test": TEST})
    images = tmp_path / "world" / "images"
    shutil.copyfile(images / "000.png", images / f"{len(TRAIN):03d}.png")  # a test file = a train file's bytes
    cfg = load_config(None, [f"data.datasets=[karpathy:{world}]"])
    with pytest.raises(ValueError, match="also training images"):
        make_tasks(cfg, tmp_path / "tasks")


def test_the_command_writes_the_files_and_says_what_it_wrote(tmp_path, capsys):
    world = write_world(tmp_path / "world", {"train": TRAIN, "test": TEST})
    assert main(["make-tasks", str(tmp_path / "tasks"), "--data", f"karpathy:{world}"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "tasks" / "tasks.json").read_text())
    for name, count in record["files"].items():
        assert (tmp_path / "tasks" / name).is_file() and f"{count:>7}  {tmp_path / 'tasks' / name}" in printed
    assert "SHA-1" in record["split_check"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("holds", ["the user's tasks.json", "a finished run", "an earlier make-tasks output"])
def test_make_tasks_into_a_folder_that_holds_anything_is_refused_unless_overwrite(tmp_path, capsys, holds):
    world = write_world(tmp_path / "world", {"train": TRAIN, "test": TEST})
    out = tmp_path / "out"
    command = ["make-tasks", str(out), "--data", f"karpathy:{world}"]
    if holds == "the user's tasks.json":
        out.mkdir()
        (out / "tasks.json").write_text('{"my": "own task list"}')
    elif holds == "a finished run":
        out.mkdir()
        save_config(load_config(None), out / "config.yaml")
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "trainable.safetensors").write_bytes(b"weights")
        (out / "captions_test.json").write_text('{"captions": "of the run"}')  # `vlmlab captions` writes this name
    else:
        assert main(command) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlmlab make-tasks: error: {out} is not empty (it holds ") and err.count("\n") == 1
    assert "--overwrite" in err
    assert _files(out) == before
    assert main([*command, "--overwrite"]) == 0
    assert "SHA-1" in json.loads((out / "tasks.json").read_text())["split_check"]
    if holds == "a finished run":  # what make-tasks does not write is left as it was
        assert all(_files(out)[name] == before[name] for name in ("config.yaml", "checkpoint/trainable.safetensors"))


def test_make_tasks_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "a file").write_text("not a folder")
    assert main(["make-tasks", str(tmp_path / "a file"), "--data", "karpathy:/nowhere.json"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "a file").read_text() == "not a folder"


def test_a_rewrite_that_fails_part_way_leaves_no_tasks_json_and_no_torn_file(tmp_path, monkeypatch):
    """Each file is whole (the old one or the new one), and the folder, no longer one finished set, has no
    tasks.json: a chain writes it again rather than train on a mix."""
    import vlmlab.data.make_tasks as module

    world = write_world(tmp_path / "world", {"train": TRAIN, "test": TEST})
    cfg = load_config(None, [f"data.datasets=[karpathy:{world}]"])
    out = tmp_path / "tasks"
    make_tasks(cfg, out)
    monkeypatch.setattr(module, "write_atomic", _failing_after(2, module.write_atomic))
    with pytest.raises(OSError, match="No space left"):
        make_tasks(cfg, out)
    assert not (out / "tasks.json").exists()
    for path in out.glob("*.json"):  # every file whole (POPE's are JSON lines)
        lines = path.read_text().splitlines() if "pope" in path.name else [path.read_text()]
        assert all(json.loads(line) is not None for line in lines)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _failing_after(count: int, write):
    """write_atomic that fails, as on a full disk, once `count` files are written."""
    done = []

    def write_or_fail(path, content):
        if len(done) == count:
            raise OSError(28, "No space left on device")
        done.append(path)
        return write(path, content)

    return write_or_fail


def _synthetic_facts(objects: list[SceneObject]) -> ImageFacts:
    sample = CaptionSample("/s.png", "/s.png", ["c"], "test", {"objects": [asdict(o) for o in objects]})
    from vlmlab.data.grounded_questions import image_facts

    (facts,) = image_facts([sample])
    return facts


TWINS = [  # two circles: one name, two colours
    [O("red", "circle", "large", "top left"), O("blue", "circle", "large", "right")],
    [O("red", "circle", "small", "top left"), O("blue", "circle", "large", "right")],
]


@pytest.mark.parametrize("objects", TWINS, ids=["same size", "other size"])
def test_a_question_about_one_of_two_alike_shapes_names_one_object(objects):
    """'What colour is the circle?' with a red and a blue circle has two right answers; none may be asked."""
    from vlmlab.data.grounded_questions import choice_questions, short_questions

    facts = _synthetic_facts(objects)
    for seed in range(40):
        rng = random.Random(seed)
        for q in short_questions(facts, ["circle", "square", "triangle"], rng):
            if q.question_type in ("what color is the", "what size is the", "where is the"):
                described = q.question.split(" the ", 1)[1].rstrip("?").split(" small or large")[0].split()
                matching = [o for o in objects if all(w in (o.size, o.shape) for w in described)]
                assert len(matching) == 1, (q.question, q.answer)
        for question, options, _right in choice_questions(facts, ["circle", "square", "triangle"], rng):
            if "colour" in question:
                assert sum(o.colour in options for o in objects) == 1, (question, options)


def test_four_objects_of_four_colours_get_a_colour_question_of_three_options():
    """Six colours, four in the picture: two are left as distractors, so the question has three options (it
    crashed make-tasks on the 1-4 shape world before)."""
    from vlmlab.data.grounded_questions import choice_questions

    objects = [O("red", "circle", "large", "top left"), O("blue", "square", "small", "right")]
    objects += [O("green", "triangle", "small", "left"), O("yellow", "circle", "small", "bottom")]
    facts = _synthetic_facts(objects)
    asked = [
        q for seed in range(20) for q in choice_questions(facts, ["circle", "square", "triangle"], random.Random(seed))
    ]
    colour = [(options, right) for question, options, right in asked if "colour" in question]
    assert colour and all(len(options) == len(set(options)) == 3 for options, _ in colour)
    assert all(sum(o.colour in options for o in objects) == 1 for options, _ in colour)
    assert all(options[right] in ("red", "blue", "green", "yellow") for options, right in colour)


def test_a_three_option_question_reads_back_from_the_tsv(tmp_path):
    """Three options leave column D empty, as in MMBench's own files; the rows read back with three choices and
    the right one right in every rotation (the chain's multiple-choice eval refused the file before)."""
    import csv

    from vlmlab.data.make_tasks import rotated_rows

    image = tmp_path / "scene.png"
    image.write_bytes(b"")
    rows = rotated_rows(0, str(image), "What colour is the square?", ["red", "blue", "green"], 1, "attribute")
    with open(tmp_path / "mmbench_test.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "group", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        writer.writerows(rows)
    read = read_mmbench_tsv(tmp_path / "mmbench_test.tsv")
    assert [len(q.choices) for q in read] == [3, 3, 3]
    assert all(q.choices[q.answer_index] == "blue" for q in read)
    assert len({q.group for q in read}) == 1
    with pytest.raises(ValueError, match="5 options"):
        rotated_rows(0, str(image), "?", list("abcde"), 0, "object")


def test_every_right_answer_to_what_shape_scores_full_marks(tasks):
    from vlmlab.eval.vqa import vqa_accuracy

    out, _, scenes = tasks
    test = read_vqa_v2(out / "vqa_test_questions.json", out / "vqa_test_annotations.json")
    asked = [q for q in test if q.question == "What shape is in the image?"]
    assert asked  # asked only where one kind of shape is in the picture: its name is then the one right answer
    assert all(len({o.shape for o in scenes[q.image]}) == 1 for q in asked)
    for q in asked:
        for o in scenes[q.image]:
            assert vqa_accuracy(o.shape, q.answers) == 1.0, (o.shape, q.answers)


def test_no_count_is_asked_of_a_category_annotated_as_a_crowd(tmp_path):
    from conftest import SHARED_DATA, require
    from vlmlab.data.grounded_questions import plural

    root = require(SHARED_DATA / "coco2017-mini")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    crowd = defaultdict(set)
    for a in data["annotations"]:
        if a.get("iscrowd"):
            crowd[files[a["image_id"]]].add(plural(names[a["category_id"]], 2))
    make_tasks(load_config(None, [f"data.datasets=[coco:{root}]"]), tmp_path)
    asked = []
    for split in ("train", "test"):
        vqa = read_vqa_v2(tmp_path / f"vqa_{split}_questions.json", tmp_path / f"vqa_{split}_annotations.json")
        asked += [q for q in vqa if q.question_type == "how many"]
    asked += [q for q in read_mmbench_tsv(tmp_path / "mmbench_test.tsv") if q.question.startswith("How many")]
    assert asked
    for q in asked:
        counted = q.question.removeprefix("How many ").removesuffix(" are there?")
        assert counted not in crowd[Path(q.image).name], (q.question, q.image)


def captions_and_boxed_files(root: Path) -> tuple[dict[str, list[str]], set[str]]:
    """A COCO folder's captions by image file name, and the names of the files that have instances."""
    captions = defaultdict(list)
    for a in json.loads((root / "annotations" / "captions_val2017.json").read_text())["annotations"]:
        captions[f"{a['image_id']:012d}.jpg"].append(a["caption"])
    instances = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    files = {im["id"]: im["file_name"] for im in instances["images"]}
    return captions, {files[a["image_id"]] for a in instances["annotations"]}


def test_objects_from_captions_add_training_photos_and_leave_the_test_files_on_boxes(tmp_path):
    from conftest import SHARED_DATA, require
    from vlmlab.data.caption_objects import objects_from_captions

    root = require(SHARED_DATA / "coco2017-mini")
    cfg = load_config(None, [f"data.datasets=[coco:{root}]"])
    boxed = make_tasks(cfg, tmp_path / "boxes")
    summary = make_tasks(cfg, tmp_path / "captions", objects_from_captions=True)
    added = summary["objects_from_captions"]
    assert added["train"] > 0 and added["test"] == 0
    assert summary["images"]["train"] == boxed["images"]["train"] + added["train"]
    assert summary["images"]["test"] == boxed["images"]["test"]
    for setting in ("random", "popular", "adversarial"):  # POPE counts over annotated photos only: unchanged
        name = f"pope_test_{setting}.json"
        assert (tmp_path / "captions" / name).read_text() == (tmp_path / "boxes" / name).read_text()
    test_images = {
        q.image
        for q in read_vqa_v2(*(tmp_path / "captions" / f"vqa_test_{k}.json" for k in ("questions", "annotations")))
    }
    assert test_images == {
        q.image for q in read_vqa_v2(*(tmp_path / "boxes" / f"vqa_test_{k}.json" for k in ("questions", "annotations")))
    }
    captions, with_boxes = captions_and_boxed_files(root)
    train = read_vqa_v2(
        tmp_path / "captions" / "vqa_train_questions.json", tmp_path / "captions" / "vqa_train_annotations.json"
    )
    from_captions = [q for q in train if Path(q.image).name not in with_boxes]
    assert from_captions and {q.question_type for q in from_captions} == {"is there a"}  # no count, no side
    for q in from_captions:  # a "yes" is an object two captions name, a "no" one that none names
        named = objects_from_captions(captions[Path(q.image).name])
        asked = q.question.split(" ", 3)[-1].removesuffix(" in the image?")
        assert (asked in named) == (q.answers[0] == "yes"), (q.question, named)


def test_one_naming_caption_is_enough_when_asked_and_the_labels_follow_it(tmp_path):
    """--objects-min-captions 1 (issue 14's recall lever): every photo two captions ground is still in, more
    join, a "yes" is an object at least one caption names and a "no" one that none names."""
    from conftest import SHARED_DATA, require
    from vlmlab.data.caption_objects import objects_from_captions

    root = require(SHARED_DATA / "coco2017-mini")
    cfg = load_config(None, [f"data.datasets=[coco:{root}]"])
    two = make_tasks(cfg, tmp_path / "two", objects_from_captions=True)
    one = make_tasks(cfg, tmp_path / "one", objects_from_captions=True, min_captions=1)
    assert one["objects_min_captions"] == 1 and two["objects_min_captions"] == 2
    assert one["objects_from_captions"]["train"] > two["objects_from_captions"]["train"]
    assert one["images"]["test"] == two["images"]["test"]
    captions, with_boxes = captions_and_boxed_files(root)
    train = read_vqa_v2(tmp_path / "one" / "vqa_train_questions.json", tmp_path / "one" / "vqa_train_annotations.json")
    single = 0
    for q in (q for q in train if Path(q.image).name not in with_boxes):
        asked = q.question.split(" ", 3)[-1].removesuffix(" in the image?")
        named = objects_from_captions(captions[Path(q.image).name], min_captions=1)
        assert (asked in named) == (q.answers[0] == "yes"), (q.question, named)
        single += q.answers[0] == "yes" and asked not in objects_from_captions(captions[Path(q.image).name])
    assert single > 0  # some "yes" rests on one caption alone
    with pytest.raises(ValueError, match="at least 1"):
        make_tasks(cfg, tmp_path / "zero", objects_from_captions=True, min_captions=0)


def boxed_categories(root: Path) -> dict[str, set[str]]:
    """A COCO folder's boxed categories by image file name."""
    instances = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    files = {im["id"]: im["file_name"] for im in instances["images"]}
    out = defaultdict(set)
    for a in instances["annotations"]:
        out[files[a["image_id"]]].add(names[a["category_id"]])
    return out


def test_presence_from_boxes_asks_stage_3_about_boxed_photos_only_every_box_and_as_many_absent(tmp_path):
    """--presence-from-boxes (issue 14's POPE lever): stage-3 files ask only about photos with boxes, every boxed
    category "yes" and as many absent ones "no"; the caption-grounded photos stay in the instruct conversations."""
    from conftest import SHARED_DATA, require

    root = require(SHARED_DATA / "coco2017-mini")
    cfg = load_config(None, [f"data.datasets=[coco:{root}]"])
    make_tasks(cfg, tmp_path / "mixed", objects_from_captions=True, min_captions=1)
    boxes = make_tasks(cfg, tmp_path / "boxes", objects_from_captions=True, min_captions=1, presence_from_boxes=True)
    boxed = boxed_categories(root)
    for split in ("train", "val"):
        mixed_photos = {
            Path(c.image).name for c in read_llava_conversations(tmp_path / "mixed" / f"vqa_conversations_{split}.json")
        }
        photos = {
            Path(c.image).name for c in read_llava_conversations(tmp_path / "boxes" / f"vqa_conversations_{split}.json")
        }
        assert photos and photos <= set(boxed) and mixed_photos - set(boxed)  # without the flag: caption photos too
        instruct = {
            Path(c.image).name for c in read_llava_conversations(tmp_path / "boxes" / f"conversations_{split}.json")
        }
        assert instruct - set(boxed)  # caption-grounded photos still teach the instruct stage
    assert boxes["presence_from_boxes"]["train"] == boxes["images"]["train"] - boxes["objects_from_captions"]["train"]
    train = read_vqa_v2(
        tmp_path / "boxes" / "vqa_train_questions.json", tmp_path / "boxes" / "vqa_train_annotations.json"
    )
    asked = defaultdict(dict)
    for q in (q for q in train if q.question_type == "is there a"):
        name = re.match(r"Is there an? (.+) in the image\?", q.question).group(1)
        assert name not in asked[Path(q.image).name]  # no question twice
        asked[Path(q.image).name][name] = q.answers[0]
    for photo, answers in asked.items():
        assert {n for n, a in answers.items() if a == "yes"} == boxed[photo]  # every box, and only boxes, say yes
        assert sum(a == "no" for a in answers.values()) == len(boxed[photo])  # as many "no": balanced per photo
    assert set(asked) == {Path(q.image).name for q in train}  # the other stage-3 questions are on boxed photos too
    for setting in ("random", "popular", "adversarial"):  # the test files do not change
        name = f"pope_test_{setting}.json"
        assert (tmp_path / "boxes" / name).read_text() == (tmp_path / "mixed" / name).read_text()


def test_adversarial_negatives_among_the_training_no_are_objects_that_cooccur(tmp_path):
    """The training "no" answers follow POPE's settings in turn, so some are absent objects that co-occur with what
    is there (the hard negatives a uniform draw almost never gives): on the mini, a share well above chance."""
    from conftest import SHARED_DATA, require
    from vlmlab.data.grounded_questions import image_facts
    from vlmlab.data.make_tasks import boxes_presence_questions
    from vlmlab.data.pairs import load_samples

    root = require(SHARED_DATA / "coco2017-mini")
    facts = image_facts(load_samples(load_config(None, [f"data.datasets=[coco:{root}]"]))["train"])
    together = defaultdict(Counter)
    for f in facts:
        for a in f.counts:
            together[a].update(set(f.counts) - {a})
    questions = boxes_presence_questions(facts, seed=0, population=facts)
    by_photo = {f.sample.image_path: f for f in facts}
    no = [q for q in questions if q.answer == "no"]
    name = lambda q: re.match(r"Is there an? (.+) in the image\?", q.question).group(1)  # noqa: E731
    top = lambda f: {c for p in f.counts for c, _ in together[p].most_common(3)} - set(f.counts)  # noqa: E731
    hard = sum(name(q) in top(by_photo[q.image]) for q in no) / len(no)
    vocabulary = {n for f in facts for n in f.counts}
    chance = sum(len(top(by_photo[q.image])) / (len(vocabulary) - len(by_photo[q.image].counts)) for q in no) / len(no)
    assert hard > 2 * chance, (hard, chance)


def test_vqa_turns_ask_every_stage_3_question_once_k_to_a_photo_and_leave_every_other_file_alone(tmp_path):
    """--vqa-turns K (LLaVA-1.5's packing of VQAv2): the same (photo, question, answer) triples, at most K to a
    conversation about one photo, the <image> placeholder in the first turn only; every other file is unchanged."""
    from conftest import SHARED_DATA, require

    root = require(SHARED_DATA / "coco2017-mini")
    cfg = load_config(None, [f"data.datasets=[coco:{root}]"])
    one = make_tasks(cfg, tmp_path / "one", objects_from_captions=True, min_captions=1, presence_from_boxes=True)
    four = make_tasks(
        cfg, tmp_path / "four", objects_from_captions=True, min_captions=1, presence_from_boxes=True, vqa_turns=4
    )
    for split in ("train", "val"):
        name = f"vqa_conversations_{split}.json"
        singles = read_llava_conversations(tmp_path / "one" / name)
        grouped = read_llava_conversations(tmp_path / "four" / name)
        assert len(grouped) < len(singles) and four["files"][name] == len(grouped)

        def triples(conversations):
            out = Counter()
            for c in conversations:
                turns = c.messages
                assert turns[0]["content"].startswith("<image>\n")
                assert sum(m["content"].count("<image>") for m in turns) == 1
                for q, a in zip(turns[::2], turns[1::2]):
                    out[(c.image, q["content"].removeprefix("<image>\n"), a["content"])] += 1
            return out

        assert triples(grouped) == triples(singles)
        assert max(len(c.messages) for c in grouped) == 8 and min(len(c.messages) for c in grouped) >= 2
    for name in one["files"]:
        if not name.startswith("vqa_conversations_"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "four" / name).read_bytes(), name
    assert four["vqa_turns"] == 4 and "vqa_turns" not in one


def test_grouped_turns_refuses_what_it_cannot_group():
    single = [("a.jpg", [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "yes"}])]
    assert grouped_turns(single, 1, random.Random(0)) == single
    with pytest.raises(ValueError, match="at least 1"):
        grouped_turns(single, 0, random.Random(0))
    two_turns = [("a.jpg", single[0][1] * 2)]
    with pytest.raises(ValueError, match="single-turn"):
        grouped_turns(two_turns, 2, random.Random(0))


def test_counts_from_captions_add_only_count_questions_to_stage_3_and_leave_every_other_file_alone(tmp_path):
    from conftest import SHARED_DATA, require
    from vlmlab.data.caption_objects import counts_from_captions

    root = require(SHARED_DATA / "coco2017-mini")
    cfg = load_config(None, [f"data.datasets=[coco:{root}]"])
    flags = dict(objects_from_captions=True, min_captions=1, presence_from_boxes=True)
    plain = make_tasks(cfg, tmp_path / "plain", **flags)
    counted = make_tasks(cfg, tmp_path / "counts", **flags, counts_from_captions=True)
    asked = counted["counts_from_captions"]
    assert sum(asked["train"].values()) > 0 and "1" not in asked["train"]  # captions say "two dogs", not "one"
    for name in plain["files"]:
        if name.startswith("vqa_conversations_") or name.startswith("vqa_train_"):
            continue
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "counts" / name).read_bytes(), name
    before, after = (
        read_vqa_v2(tmp_path / run / "vqa_train_questions.json", tmp_path / run / "vqa_train_annotations.json")
        for run in ("plain", "counts")
    )
    key = lambda q: (q.image, q.question, q.answers[0])  # noqa: E731
    added = Counter(map(key, after)) - Counter(map(key, before))
    assert not Counter(map(key, before)) - Counter(map(key, after))  # nothing removed
    assert sum(added.values()) == sum(asked["train"].values())
    captions = {str(Path(s.image_path)): s.captions for s in load_samples(cfg)["train"]}
    for image, question, answer in added:
        assert question.startswith("How many ") and answer in {
            str(n) for n in counts_from_captions(captions[image], 1).values()
        }
    with pytest.raises(ValueError, match="give both"):
        make_tasks(cfg, tmp_path / "alone", counts_from_captions=True)
