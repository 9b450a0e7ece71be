"""VQA accuracy, POPE and multiple choice on hand-made cases whose scores are worked out by hand."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import SHARED_DATA, require
from helpers import write_vqa_training_files
from vlmlab.data.questions import Question
from vlmlab.eval.multiple_choice import choice_scores, extract_choice, likelihood_pick, rotations
from vlmlab.eval.pope import parse_yes_no, pope_scores, pope_scores_by_setting
from vlmlab.eval.question_scores import score, unconditional_logprobs
from vlmlab.eval.vqa import normalize_answer, prior_answers, vqa_accuracy, vqa_scores


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("The Cat", "cat"),
        ("dont know", "don't know"),
        ("yes,", "yes"),
        ("black-and-white", "black and white"),
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),
        ("  an apple\n", "apple"),
        ("none", "0"),
    ],
)
def test_evalai_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_is_the_leave_one_out_mean_of_min_matches_over_3():
    humans = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2": 2 of 9 others agree -> 2/3; leaving out a "3": 3 agree -> 1
    assert vqa_accuracy("two", humans) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("four", humans) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)  # 0 when its own annotator is left out


def test_vqa_scores_per_answer_type():
    scores = vqa_scores(["yes", "no", "2"], [["yes"] * 10, ["yes"] * 10, ["2"] * 10], ["yes/no", "yes/no", "number"])
    assert scores["vqa_accuracy"] == pytest.approx(2 / 3)
    assert scores["vqa_accuracy[yes/no]"] == 0.5 and scores["vqa_accuracy[number]"] == 1.0
    assert scores["questions[yes/no]"] == 2


def test_prior_is_the_most_frequent_normalised_answer_per_question_type():
    prior = prior_answers(["how many", "how many", "what color"], [["Two"] * 6 + ["3"] * 4, ["2"], ["red"] * 10])
    assert prior == {"how many": "2", "what color": "red"}


@pytest.mark.parametrize(
    "answer, parsed",
    [
        ("Yes.", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("There is no dog.", "no"),
        ("The dog is not there", "no"),
        ("Nothing like that. No.", "yes"),  # only the first sentence counts, as in the POPE authors' script
        ("I think so", "yes"),
    ],
)
def test_pope_parsing_follows_the_authors(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_scores_and_the_yes_ratio_of_predictions():
    labels = ["yes", "yes", "no", "no"]
    always_yes = pope_scores(["Yes."] * 4, labels)
    assert always_yes["recall"] == 1.0 and always_yes["precision"] == 0.5
    assert always_yes["yes_ratio"] == 1.0 and always_yes["accuracy"] == 0.5
    assert always_yes["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    mixed = pope_scores(["yes", "no", "no", "yes"], labels)  # TP 1, FN 1, TN 1, FP 1
    assert mixed == {
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "yes_ratio": 0.5,
        "questions": 4,
    }
    by = pope_scores_by_setting(["yes", "no"], ["yes", "no"], ["random", "adversarial"])
    assert set(by) == {"adversarial", "random"} and by["random"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="'maybe'"):
        pope_scores(["yes"], ["maybe"])


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", 1),
        ("(C) a bird", 2),
        ("D.", 3),
        ("Answer: B", 1),
        ("The answer is (C).", 2),
        ("A", 0),
        ("A dog.", 1),  # the article, not option A: read by option text instead
        ("It is a cat", 0),
        ("dog or cat", None),  # two options named: none picked
        ("a horse", None),
        ("dark red", 3),  # 'red' is inside 'dark red': the longer option wins
    ],
)
def test_option_extraction(answer, expected):
    assert extract_choice(answer, ["cat", "dog", "bird", "dark red"]) == expected


def test_circular_eval_needs_every_rotation_right():
    options, answer = ["cat", "dog", "bird", "fish"], 2
    rots = rotations(options, answer)
    assert [r[0][r[1]] for r in rots] == ["bird"] * 4  # the right option travels with its text
    always_a = [0] * 4
    truth = [r[1] for r in rots]
    scores = choice_scores(always_a, truth, ["q1"] * 4)
    assert scores["accuracy"] == 0.25 and scores["circular_accuracy"] == 0.0
    assert choice_scores(truth, truth, ["q1"] * 4)["circular_accuracy"] == 1.0


def test_likelihood_picks_the_likeliest_option_summed_or_per_character():
    options = ["red", "a dark shade of blue"]
    logprobs = [-3.0, -8.0]  # the long option loses in sum, wins per character (-0.4 vs -1.0)
    assert likelihood_pick(logprobs, options, "sum") == 0
    assert likelihood_pick(logprobs, options, "char") == 1
    with pytest.raises(ValueError, match="norm"):
        likelihood_pick(logprobs, options, "token")


def test_mutual_information_picks_the_option_the_context_raises_most_not_the_commonest():
    options = ["dog", "aardvark"]
    logprobs = [-2.0, -4.0]  # "dog" is likelier here...
    unconditional = {"dog": -1.0, "aardvark": -9.0}  # ...but far likelier anywhere: the context raised "aardvark"
    assert likelihood_pick(logprobs, options, "sum") == 0
    assert likelihood_pick(logprobs, options, "mutual_info", unconditional) == 1
    with pytest.raises(ValueError, match="unconditional"):
        likelihood_pick(logprobs, options, "mutual_info")


def test_unconditional_logprobs_are_each_option_as_the_reply_to_an_empty_message(tiny_vlm):
    questions = [Question("q1", None, "Colour?", choices=["red", "blue"]), Question("q2", None, "?", choices=["red"])]
    empty = [{"role": "user", "content": ""}]
    got = unconditional_logprobs(tiny_vlm, questions, batch_size=1)
    assert set(got) == {"red", "blue"}  # each distinct text once
    for text, lp in got.items():
        assert lp == pytest.approx(tiny_vlm.continuation_logprobs(None, empty, [text])[0][0], abs=1e-5)
    asked = tiny_vlm.continuation_logprobs(None, [{"role": "user", "content": "Colour?"}], ["red", "blue"])
    assert [lp for lp, _, _ in asked] != pytest.approx([got["red"], got["blue"]], abs=1e-3)  # the question counts


def test_multiple_choice_rows_score_by_likelihood_and_by_letter():
    questions = [
        Question(f"q{k}", None, "Colour?", choices=rotated, answer_index=idx, group="q")
        for k, (rotated, idx) in enumerate(rotations(["red", "blue", "a dark shade of green"], 0))
    ]
    right = [[0.0 if i == q.answer_index else -50.0 for i in range(3)] for q in questions]
    row = score("mmbench", questions, ["A", "A", "A"], right)
    assert row["accuracy"] == row["circular_accuracy"] == row["accuracy[sum]"] == 1.0
    assert row["accuracy[letter]"] == pytest.approx(1 / 3) and row["circular_accuracy[letter]"] == 0.0
    assert row["no_option_share[letter]"] == 0.0
    assert "accuracy" not in score("mmbench", questions, ["A", "A", "A"])  # no option scores: letters only
    assert "accuracy[mutual_info]" not in row  # no unconditional log-probs given
    flat = dict.fromkeys(["red", "blue", "a dark shade of green"], -1.0)
    assert score("mmbench", questions, ["A"] * 3, right, flat)["circular_accuracy[mutual_info]"] == 1.0


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=4, max_size=4), st.integers(0, 3))
def test_rotation_answers_are_always_the_same_option(options, answer):
    for rotated, idx in rotations(options, answer):
        assert rotated[idx] == options[answer]


def test_real_aokvqa_answers_score_as_their_own_annotators():
    path = require(SHARED_DATA / "questions" / "aokvqa" / "aokvqa_v1p0_val.json")
    items = json.loads(path.read_text())
    # each question's majority direct answer scores 1 when >= 4 annotators gave it (3 remain when left out)
    for item in items[:50]:
        majority = max(set(item["direct_answers"]), key=item["direct_answers"].count)
        count = sum(normalize_answer(a) == normalize_answer(majority) for a in item["direct_answers"])
        acc = vqa_accuracy(majority, item["direct_answers"])
        assert acc == (
            1.0
            if count >= 4
            else pytest.approx((count * min(1, (count - 1) / 3) + (10 - count) * min(1, count / 3)) / 10)
        )
        # the right choice's text picks the right option
        assert extract_choice(item["choices"][item["correct_choice_idx"]], item["choices"]) in (
            item["correct_choice_idx"],
            None,  # a choice whose text contains another choice's text can be ambiguous; never a wrong pick
        )


def test_unseen_only_leaves_out_exactly_the_questions_about_training_photos():
    """A-OKVQA asks about COCO val2017 photos; a run trained on coco2017-mini has captioned some of them (the
    mini's folder differs, the photo is the same: matched by COCO id)."""
    from vlmlab.config import load_config
    from vlmlab.data.formats import hash_split
    from vlmlab.eval.question_scores import drop_trained_photos, photo_key, read_questions

    assert photo_key("a/000000000139.jpg") == photo_key("b/COCO_val2014_000000000139.jpg") == "coco:139"
    assert photo_key("x/dog.jpg") == "dog.jpg"
    mini = require(SHARED_DATA / "coco2017-mini")
    path = require(SHARED_DATA / "questions" / "aokvqa" / "aokvqa_v1p0_val.json")
    cfg = load_config(None, [f"data.datasets=[coco:{mini}]"])
    _, questions = read_questions(path, SHARED_DATA / "coco2017-val" / "val2017")
    kept, dropped = drop_trained_photos(questions, cfg)
    mini_ids = {int(p.stem) for p in (mini / "val2017").glob("*.jpg")}

    def trained(q):
        image_id = int(photo_key(q.image).split(":")[1])
        return image_id in mini_ids and hash_split(0, f"coco:{image_id}", 0.1, 0.1) == "train"

    assert dropped > 0 and len(kept) + dropped == len(questions)
    assert [q.question_id for q in kept] == [q.question_id for q in questions if not trained(q)]


def test_vqa_accuracy_by_question_type_per_answerer():
    from vlmlab.data.questions import Question
    from vlmlab.eval.question_scores import by_question_type

    qs = [
        Question("1", "a.jpg", "What color is the circle?", ["red"] * 10, "other", "what color is the"),
        Question("2", "a.jpg", "What color is the square?", ["blue"] * 10, "other", "what color is the"),
        Question("3", "b.jpg", "Where is the circle?", ["left"] * 10, "other", "where is the"),
    ]
    table = by_question_type(qs, {"model": ["red", "blue", "right"], "blind model": ["red", "red", "left"]})
    assert table.splitlines()[0] == "| question type | questions | model | blind model |"
    assert "| what color is the | 2 | 1.000 | 0.500 |" in table
    assert "| where is the | 1 | 0.000 | 1.000 |" in table


def test_the_prior_row_comes_from_the_runs_own_training_questions_or_is_refused(tmp_path):
    """The prior is what the run's training answers alone would say. Where the run trained on questions that are
    not here, the prior is refused before anything loads (it was "yes" to every question), and an exported
    model's saved prior stands in for them."""
    from vlmlab.config import load_config, save_config
    from vlmlab.eval.question_scores import PRIOR_FILE, prior_predictions, training_prior

    def asked(qid, kind, answers):
        return Question(qid, "a.jpg", "?", answers=answers, question_type=kind)

    tasks, run = tmp_path / "tasks", tmp_path / "run"
    tasks.mkdir(), run.mkdir()
    save_config(load_config(None, [f"data.tasks={tasks}"]), run / "config.yaml")
    cfg = load_config(run / "config.yaml")
    with pytest.raises(ValueError, match="vqa_train_questions.json is not here: the prior row"):
        training_prior(run, cfg)
    rows = [(str(i), "how many", ["2"] * 10) for i in range(3)] + [("9", "is there a", ["no"] * 10)]
    write_vqa_training_files(tasks, rows)
    prior = training_prior(run, cfg)
    assert prior["by question type"] == {"how many": "2", "is there a": "no"} and prior["overall"] == "2"
    test = [asked("a", "how many", ["3"]), asked("b", "is there a", ["no"]), asked("c", "what color", ["red"])]
    assert prior_predictions("vqa", test, prior) == ["2", "no", "2"]
    for f in tasks.iterdir():  # an exported model elsewhere: the tasks folder is gone, its saved prior is not
        f.unlink()
    (run / PRIOR_FILE).write_text(json.dumps(prior))
    assert training_prior(run, cfg) == prior
    assert training_prior(run, load_config(None)) is None  # a caption run trained on no questions
