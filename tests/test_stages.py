"""Task building from annotations, stages chained by init_from, and a tiny chain end to end."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, require
from vlmlab.analysis.chain import load_chain, run_chain
from vlmlab.config import ConfigError, load_config
from vlmlab.data.formats import CaptionSample
from vlmlab.data.grounded_questions import ImageFacts, article, plural, pope_questions, short_questions
from vlmlab.data.make_tasks import make_tasks
from vlmlab.data.questions import read_llava_conversations, read_mmbench_tsv, read_pope, read_vqa_v2
from vlmlab.eval.caption_matching import IMAGE_PMI, SWAPPED_PMI
from vlmlab.run import load_run
from vlmlab.run.checkpoint import TRAINABLE_FILE


def facts(path, names, cxs=None):
    cxs = cxs or [0.5] * len(names)
    sample = CaptionSample(path, path, ["a caption"], "test")
    return ImageFacts(sample, [{"name": n, "cx": c} for n, c in zip(names, cxs)])


def test_articles_and_plurals():
    assert article("apple") == "an apple" and article("dog") == "a dog"
    assert plural("bus", 2) == "buses" and plural("person", 3) == "people" and plural("cup", 1) == "cup"


def test_short_questions_answers_follow_the_boxes():
    f = facts("/img.jpg", ["dog", "cat", "person", "person"], [0.1, 0.9, 0.5, 0.6])
    qs = short_questions(f, ["dog", "cat", "person", "car"], random.Random(0))
    by_type = {q.question_type: q for q in qs}
    assert by_type["is there a"].answer in ("yes", "no")
    absent = [q for q in qs if q.answer == "no"]
    assert absent and "car" in absent[0].question  # the only absent category
    lr = by_type["left or right"]
    left = "dog" in lr.question.split(" to the ")[0]
    assert lr.answer == ("left" if left else "right")  # dog at 0.1 is left of the cat at 0.9
    count = by_type["how many"]
    name = count.question.split("How many ")[1].split(" are")[0]
    assert count.answer == str({"dogs": 1, "cats": 1, "people": 2}[name])


def test_pope_is_built_as_its_authors_build_it():
    images = [facts(f"/{i}.jpg", names) for i, names in enumerate(
        [["dog", "cat", "car"], ["dog", "cat", "sofa", "tv"], ["car", "bus", "truck"], ["dog", "cat"]]
    )]  # fmt: skip
    for setting in ("random", "popular", "adversarial"):
        items = pope_questions(images, setting, seed=0)
        per_image = Counter(img for img, _, _ in items)
        assert set(per_image) == {"/0.jpg", "/1.jpg", "/2.jpg"}  # the image with 2 categories is left out
        assert all(n == 6 for n in per_image.values())  # 3 positives, each followed by a negative
        assert [label for _, _, label in items[:6]] == ["yes", "no"] * 3
        present = {f.sample.image_path: set(f.counts) for f in images}
        for img, question, label in items:
            name = question.removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]
            assert (name in present[img]) == (label == "yes")
    # adversarial: the negative for a dog+cat+car image is what co-occurs with them most: sofa / tv (with dog, cat)
    adversarial = pope_questions(images, "adversarial", seed=0)
    negatives_0 = [q for img, q, label in adversarial if img == "/0.jpg" and label == "no"]
    assert {q.split(" ")[3] for q in negatives_0} <= {"sofa", "tv", "bus", "truck"}
    assert "sofa" in negatives_0[0] or "tv" in negatives_0[0]


def test_make_tasks_on_coco_writes_readable_files_and_keeps_splits_apart(tmp_path):
    root = require(SHARED_DATA / "coco2017-mini")
    cfg = load_config(None, [f"data.datasets=[coco:{root}]"])
    summary = make_tasks(cfg, tmp_path)
    assert summary["images"]["test"] > 5 and summary["files"]["pope_test_random.json"] % 6 == 0
    train = read_llava_conversations(tmp_path / "conversations_train.json")
    test_vqa = read_vqa_v2(tmp_path / "vqa_test_questions.json", tmp_path / "vqa_test_annotations.json")
    pope = read_pope(tmp_path / "pope_test_adversarial.json")
    mc = read_mmbench_tsv(tmp_path / "mmbench_test.tsv")
    assert all(len(q.answers) == 10 for q in test_vqa) and {q.answer_type for q in test_vqa} == {
        "yes/no",
        "number",
        "other",
    }
    train_images = {c.image for c in train}
    assert not train_images & {q.image for q in test_vqa + pope + mc}  # no image in both
    groups = Counter(q.group for q in mc)
    assert set(groups.values()) == {4}  # every question in its 4 rotations
    first = [q for q in mc if q.group == mc[0].group]
    assert len({q.choices[q.answer_index] for q in first}) == 1  # the right answer travels with its text


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory, tiny_clip_dir, tiny_gpt2_dir):
    tmp = tmp_path_factory.mktemp("chain")
    chain = {
        "name": "tiny",
        "base": None,
        "overrides": {
            "vision.name": f"hf:{tiny_clip_dir}",
            "lm.name": str(tiny_gpt2_dir),
            "data.datasets": [f"synthetic:{tmp / 'world'}"],
            "data.synthetic_images": 40,
            "train.batch_size": 4,
            "train.eval_every": 3,
            "train.save_every": 3,
            "train.max_steps": 3,
            "connector.num_queries": 4,
        },
        "tasks": str(tmp / "tasks"),
        "stages": {"caption": {}, "instruct": {"train.lr": 1e-4}},
        "blind": True,
        "evaluate": ["pope", "mmbench"],
    }
    (tmp / "chain.yaml").write_text(yaml.safe_dump(chain))
    return tmp, run_chain(load_chain(str(tmp / "chain.yaml")), tmp / "out")


@pytest.mark.slow
def test_a_tiny_chain_trains_each_stage_from_the_previous_and_scores_with_controls(tiny_chain):
    tmp, summary = tiny_chain
    out = tmp / "out"
    assert set(summary["runs"]["model"]) == {"caption", "instruct"} and summary["runs"]["blind"]
    instruct_cfg = load_config(out / "instruct" / "config.yaml")
    assert instruct_cfg.train.stage == "instruct" and instruct_cfg.train.init_from == str(out / "caption")
    assert load_config(out / "blind" / "instruct" / "config.yaml").connector.type == "none"
    for arm, sees in (("instruct", True), ("blind/instruct", False)):  # a blind run has no shuffled-image probe
        records = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "val_loss" in r]
        assert evals and all(("val_loss_shuffled_images" in r) == sees for r in evals)
    for task in ("pope", "mmbench"):
        rows = summary["tables"][task]
        assert {"model", "swapped image", "no image", "blind model", "prior"} <= set(rows)
        assert "answers changed by swap" in rows["model"]
    assert rows["prior"]["accuracy"] == pytest.approx(0.25)  # always "A" over 4 rotations
    assert rows["prior"]["accuracy[mutual_info]"] == pytest.approx(0.25)
    assert {"accuracy[mutual_info]", "circular_accuracy[mutual_info]"} <= set(rows["blind model"])
    assert summary["tables"]["pope"]["prior"]["yes_ratio"] == 1.0
    assert set(summary["forgetting"]) == {"caption", "instruct"}
    assert (out / "chain.md").read_text().startswith("## pope")


@pytest.mark.slow
def test_init_from_starts_the_next_stage_from_exactly_the_trained_weights(tiny_chain):
    tmp, _ = tiny_chain
    out = tmp / "out"
    from safetensors.torch import load_file

    from vlmlab.model.vlm import build_vlm
    from vlmlab.train.stages import initialise_from

    fresh = build_vlm(load_config(out / "instruct" / "config.yaml"))
    report = initialise_from(fresh, out / "caption")
    source = load_file(out / "caption" / "checkpoint" / TRAINABLE_FILE)
    now = fresh.trainable_state_dict()
    assert report["loaded"] and not report["unused"]
    assert all(torch.equal(now[k], source[k]) for k in report["loaded"])
    # and the instruct run then moved away from them: it trained
    trained = load_run(out / "instruct").trainable_state_dict()
    assert any(not torch.equal(trained[k], source[k]) for k in report["loaded"])


@pytest.mark.slow
def test_a_chain_can_start_from_a_pretrained_caption_run(tiny_chain):
    tmp, _ = tiny_chain
    pretrained = tmp / "out" / "caption"
    spec = yaml.safe_load((tmp / "chain.yaml").read_text())
    spec |= {"stages": {"instruct": {"train.max_steps": 2}}, "pretrained": str(pretrained), "evaluate": ["pope"]}
    (tmp / "from_pretrained.yaml").write_text(yaml.safe_dump(spec))
    summary = run_chain(load_chain(str(tmp / "from_pretrained.yaml")), tmp / "from")
    for arm in ("instruct", "blind/instruct"):  # both arms start from it; the blind one leaves its connector out
        assert load_config(tmp / "from" / arm / "config.yaml").train.init_from == str(pretrained)
    assert list(summary["forgetting"]) == ["pretrained", "instruct"]
    caption_only = json.loads((tmp / "out" / "chain.json").read_text())["forgetting"]["caption"]
    assert summary["forgetting"]["pretrained"]["CIDEr-D"] == pytest.approx(caption_only["CIDEr-D"])

    (tmp / "bad.yaml").write_text(yaml.safe_dump(spec | {"stages": {"caption": {}}}))
    with pytest.raises(ConfigError, match="instruct or vqa"):
        load_chain(str(tmp / "bad.yaml"))
    (tmp / "zero.yaml").write_text(yaml.safe_dump(spec | {"objects_min_captions": 0}))
    with pytest.raises(ConfigError, match="objects_min_captions"):
        load_chain(str(tmp / "zero.yaml"))
    (tmp / "word.yaml").write_text(yaml.safe_dump(spec | {"presence_from_boxes": "boxes"}))
    with pytest.raises(ConfigError, match="presence_from_boxes"):
        load_chain(str(tmp / "word.yaml"))
    for turns in (0, True, "4"):
        (tmp / "turns.yaml").write_text(yaml.safe_dump(spec | {"vqa_turns": turns}))
        with pytest.raises(ConfigError, match="vqa_turns"):
            load_chain(str(tmp / "turns.yaml"))
    (tmp / "missing.yaml").write_text(yaml.safe_dump(spec | {"pretrained": str(tmp / "no-such-run")}))
    with pytest.raises(ConfigError, match="train it first"):
        run_chain(load_chain(str(tmp / "missing.yaml")), tmp / "never")
    assert not (tmp / "never").exists()


@pytest.mark.slow
def test_blind_from_starts_the_blind_arm_from_the_models_caption_run(tiny_chain):
    """The blind arm trains no caption stage of its own: it starts from the model's (LoRA, no connector)."""
    from vlmlab.model.vlm import build_vlm
    from vlmlab.train.stages import initialise_from

    tmp, _ = tiny_chain
    spec = yaml.safe_load((tmp / "chain.yaml").read_text())
    spec |= {"stages": {"caption": {"train.max_steps": 2}, "instruct": {"train.max_steps": 2}}}
    spec |= {"blind_from": "caption", "evaluate": ["pope"], "forgetting_split": None}
    (tmp / "blind_from.yaml").write_text(yaml.safe_dump(spec))
    out = tmp / "blind-from"
    summary = run_chain(load_chain(str(tmp / "blind_from.yaml")), out)
    assert list(summary["runs"]["blind"]) == ["instruct"] and not (out / "blind" / "caption").exists()
    blind_cfg = load_config(out / "blind" / "instruct" / "config.yaml")
    assert blind_cfg.train.init_from == str(out / "caption") and blind_cfg.connector.type == "none"
    report = initialise_from(build_vlm(blind_cfg), out / "caption")
    assert report["loaded"] and all("lora" in k for k in report["loaded"]) and not report["not_in_source"]
    assert report["unused"] and all(k.startswith("connector.") for k in report["unused"])  # left out
    assert {"model", "swapped image", "blind model", "prior"} <= set(summary["tables"]["pope"])
    for stage in ("instruct", "vqa"):  # the last stage, or none of this chain's
        (tmp / "bad.yaml").write_text(yaml.safe_dump(spec | {"blind_from": stage}))
        with pytest.raises(ConfigError, match="blind_from"):
            load_chain(str(tmp / "bad.yaml"))


@pytest.mark.slow
def test_init_from_refuses_a_tensor_of_another_shape(tiny_chain, tiny_clip_dir, tiny_gpt2_dir):
    from vlmlab.model.vlm import build_vlm
    from vlmlab.train.stages import initialise_from

    tmp, _ = tiny_chain
    other = build_vlm(
        load_config(None, [f"vision.name=hf:{tiny_clip_dir}", f"lm.name={tiny_gpt2_dir}", "connector.num_queries=8"])
    )
    with pytest.raises(ValueError, match="connector.queries"):
        initialise_from(other, tmp / "out" / "caption")


def test_conversation_stages_need_their_task_files(tmp_path):
    with pytest.raises(ConfigError, match="data.tasks"):
        load_config(None, ["train.stage=instruct"])
    from vlmlab.config import check_data_paths

    cfg = load_config(None, ["train.stage=vqa", f"data.tasks={tmp_path}"])
    with pytest.raises(ConfigError, match="vqa_conversations_train.json does not exist"):
        check_data_paths(cfg)


def test_a_chain_from_another_replaces_only_its_own_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMLAB_DATA", str(tmp_path))  # the data root the photo chain names must exist
    parent = load_chain("photos-hour")
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"from": "photos-hour", "vqa_turns": 2}))
    child = load_chain(str(tmp_path / "child.yaml"))
    assert child.vqa_turns == 2 and child.name == "child"  # its own key; a name is never inherited
    assert child.questions == parent.questions and child.stages == parent.stages and len(child.questions) == 4
    # the parent's base is the parent's, wherever the child lives
    assert child.config("vqa", tmp_path / "r", None, blind=False) == parent.config("vqa", tmp_path / "r", None, False)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"from": "b.yaml"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"from": "a.yaml", "stages": {"caption": {}}}))
    with pytest.raises(ConfigError, match="at most one other"):
        load_chain(str(tmp_path / "a.yaml"))
    (tmp_path / "orphan.yaml").write_text(yaml.safe_dump({"from": "no-such-chain"}))
    with pytest.raises(ConfigError, match="no chain 'no-such-chain'"):
        load_chain(str(tmp_path / "orphan.yaml"))
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"from": "photos-hour", "stage": {}}))
    with pytest.raises(ConfigError, match="unknown: \\['stage'\\]"):
        load_chain(str(tmp_path / "typo.yaml"))
    counted = {"from": "photos-hour", "counts_from_captions": True, "tasks": "data/tasks/counts"}
    (tmp_path / "counts.yaml").write_text(yaml.safe_dump(counted))
    assert load_chain(str(tmp_path / "counts.yaml")).counts_from_captions is True
    for bad, match in (({"objects_from_captions": False}, "set both"), ({"counts_from_captions": "yes"}, "true or")):
        (tmp_path / "bad_counts.yaml").write_text(yaml.safe_dump(counted | bad))
        with pytest.raises(ConfigError, match=match):
            load_chain(str(tmp_path / "bad_counts.yaml"))


def test_eval_tasks_reads_the_real_pope_and_aokvqa_files():
    from vlmlab.eval.question_scores import read_questions, resolve_pope_image

    root = require(SHARED_DATA / "questions")
    images = SHARED_DATA / "coco2017-val" / "val2017"
    fmt, qs = read_questions(root / "pope" / "coco_pope_random.json")
    assert fmt == "pope" and Path(resolve_pope_image(Path(qs[0].image).name, images)).exists()
    fmt, qs = read_questions(root / "aokvqa" / "aokvqa_v1p0_val.json", images)
    assert (
        fmt == "aokvqa"
        and json.loads((root / "aokvqa" / "aokvqa_v1p0_val.json").read_text())[0]["question"] == qs[0].question
    )


@pytest.mark.slow
def test_a_chain_can_score_on_another_task_folder_leaving_out_photos_it_trained_on(tiny_chain):
    import shutil

    tmp, _ = tiny_chain
    eval_tasks = tmp / "eval_tasks"
    shutil.copytree(tmp / "tasks", eval_tasks)
    trained = json.loads((tmp / "tasks" / "conversations_train.json").read_text())[0]["image"]
    for setting in ("random", "popular", "adversarial"):  # 4 test questions + 1 about a training photo each
        path = eval_tasks / f"pope_test_{setting}.json"
        lines = path.read_text().splitlines()[:4]
        lines.append(json.dumps({"question_id": 99, "image": trained, "text": "Is there a circle?", "label": "yes"}))
        path.write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load((tmp / "chain.yaml").read_text())
    spec |= {
        "stages": {"instruct": {"train.max_steps": 2}},
        "pretrained": str(tmp / "out" / "caption"),
        "evaluate": ["pope"],
        "eval_tasks": str(eval_tasks),
        "forgetting_split": None,
    }
    (tmp / "other_eval.yaml").write_text(yaml.safe_dump(spec))
    summary = run_chain(load_chain(str(tmp / "other_eval.yaml")), tmp / "other")
    record = json.loads((tmp / "other" / "eval" / "eval_pope.json").read_text())
    assert all(f.startswith(str(eval_tasks)) for f in record["files"])
    assert record["questions"] == 12 and record["dropped_trained_photos"] == 3
    assert summary["forgetting"] == {}  # forgetting_split: null scores no captions

    (tmp / "no_eval.yaml").write_text(yaml.safe_dump(spec | {"eval_tasks": str(tmp / "nothing")}))
    with pytest.raises(ConfigError, match="write it first"):
        run_chain(load_chain(str(tmp / "no_eval.yaml")), tmp / "never2")


@pytest.mark.slow
def test_a_chain_scores_real_question_files_and_says_when_none_is_left(tiny_chain):
    tmp, _ = tiny_chain
    tasks = tmp / "tasks"
    trained = json.loads((tasks / "conversations_train.json").read_text())[0]["image"]
    only_trained = tmp / "pope_trained_only.json"  # a real set whose every photo the run trained on
    only_trained.write_text(
        json.dumps({"question_id": 1, "image": trained, "text": "Is there a circle?", "label": "yes"})
    )
    spec = yaml.safe_load((tmp / "chain.yaml").read_text())
    spec |= {
        "stages": {"instruct": {"train.max_steps": 2}},
        "pretrained": str(tmp / "out" / "caption"),
        "evaluate": [],
        "forgetting_split": None,
        "questions": [
            {"task": "pope", "file": str(tasks / "pope_test_random.json")},
            {"task": "pope", "file": str(only_trained)},
        ],
    }
    (tmp / "real.yaml").write_text(yaml.safe_dump(spec))
    summary = run_chain(load_chain(str(tmp / "real.yaml")), tmp / "real")
    rows = summary["tables"]["pope: pope_test_random.json"]
    assert {"model", "swapped image", "blind model", "prior"} <= set(rows)
    assert "1 about photos the run trained on left out" in summary["not_scored"]["pope: pope_trained_only.json"]
    assert "Not scored: 0 question(s)" in (tmp / "real" / "chain.md").read_text()

    for bad, match in (({"task": "captions", "file": str(only_trained)}, "not one of"), ({"task": "pope"}, "each of")):
        (tmp / "bad_q.yaml").write_text(yaml.safe_dump(spec | {"questions": [bad]}))
        with pytest.raises(ConfigError, match=match):
            load_chain(str(tmp / "bad_q.yaml"))
    (tmp / "gone.yaml").write_text(yaml.safe_dump(spec | {"questions": [{"task": "pope", "file": str(tmp / "no")}]}))
    with pytest.raises(ConfigError, match="do not exist"):
        run_chain(load_chain(str(tmp / "gone.yaml")), tmp / "never3")


@pytest.mark.slow
def test_a_question_set_about_one_photo_has_no_swapped_image_row(tiny_chain):
    """The real POPE files ask 6 questions about one photo each: a swap there would ask about the same photo, so
    the table has no swapped-image row (and no share of answers changed by it) instead of a vacuous one."""
    from vlmlab.eval.question_scores import evaluate_task

    tmp, _ = tiny_chain
    image = json.loads((tmp / "tasks" / "pope_test_random.json").read_text().splitlines()[0])["image"]
    path = tmp / "one_photo_pope.json"
    lines = [{"question_id": i, "image": image, "text": f"Is there a {s}?", "label": lab}
             for i, (s, lab) in enumerate([("circle", "yes"), ("square", "no"), ("triangle", "no")])]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = evaluate_task(tmp / "out" / "caption", "pope", question_files=[path], out_dir=tmp / "one_photo")
    assert "swapped image" not in rows and "no image" in rows and "prior" in rows
    assert "answers changed by swap" not in rows["model"]


@pytest.mark.slow
def test_a_chain_scores_its_caption_stage_on_sugarcrepe_beside_the_blind_arm(tiny_chain):
    """SugarCrepe's layout (category files naming photos in coco2017-val/val2017 beside questions/), here with the
    tiny world's pictures: each caption stage gets its table, with the blind arm's caption stage as the blind LM."""
    tmp, _ = tiny_chain
    folder, photos = tmp / "data" / "questions" / "sugar-crepe", tmp / "data" / "coco2017-val" / "val2017"
    folder.mkdir(parents=True), photos.mkdir(parents=True)
    for k, picture in enumerate(sorted((tmp / "world").rglob("*.png"))[:3]):
        (photos / f"sc{k}.png").write_bytes(picture.read_bytes())  # not a COCO id: no training photo's key
    items = {str(k): {"filename": f"sc{k}.png", "caption": "a red circle", "negative_caption": "a blue square"}
             for k in range(3)}  # fmt: skip
    (folder / "replace_obj.json").write_text(json.dumps(items))
    spec = yaml.safe_load((tmp / "chain.yaml").read_text())
    spec |= {"stages": {"caption": {"train.max_steps": 2}}, "evaluate": [], "forgetting_split": None}
    (tmp / "sugarcrepe.yaml").write_text(yaml.safe_dump(spec | {"sugarcrepe": str(folder)}))
    summary = run_chain(load_chain(str(tmp / "sugarcrepe.yaml")), tmp / "sugarcrepe")
    record = summary["caption_matching"]["caption"]
    assert set(record["rows"]) == {"model", "swapped image", "no image", "blind LM", IMAGE_PMI, SWAPPED_PMI}
    assert "logprobs" not in record and f"{IMAGE_PMI} - blind LM" in record
    assert record["blind_run"] == summary["runs"]["blind"]["caption"] and record["items"] == {"replace_obj": 3}
    assert "model - blind LM" in record and "sugarcrepe caption" in summary["seconds"]
    assert "## SugarCrepe: the caption stage" in (tmp / "sugarcrepe" / "chain.md").read_text()
    assert (tmp / "sugarcrepe" / "eval" / "sugarcrepe-caption" / "sugarcrepe.json").exists()  # with the logprobs

    for bad, match in (({"stages": {"instruct": {}}}, "this chain has none"), ({}, "do not exist")):
        (tmp / "bad_sc.yaml").write_text(yaml.safe_dump(spec | bad | {"sugarcrepe": str(tmp / "gone")}))
        with pytest.raises(ConfigError, match=match):
            run_chain(load_chain(str(tmp / "bad_sc.yaml")), tmp / "never4")
    assert not (tmp / "never4").exists()
