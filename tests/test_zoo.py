"""The models committed in zoo/: each loads verified and answers a real photo; the zoo stays small; and (slow)
each re-scores to the figures its card states, read from the record the card was written from."""

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, require
from vlmlab.app.demo import first_images, load_split, split_nll
from vlmlab.config import load_config
from vlmlab.eval.question_scores import PRIOR_FILE
from vlmlab.run import load_run
from vlmlab.run.release import RELEASE_MANIFEST, verify_release, zoo_dir, zoo_names

ZOO = zoo_names()
MAX_ZOO_MB = 40


def a_photo():
    return sorted(require(SHARED_DATA / "coco2017-mini").rglob("*.jpg"))[0]


def test_the_zoo_holds_the_demo_model_and_stays_small():
    assert "demo" in ZOO
    total = sum(p.stat().st_size for p in zoo_dir().rglob("*") if p.is_file())
    assert total < MAX_ZOO_MB * 2**20, f"zoo/ is {total / 2**20:.1f} MB (at most {MAX_ZOO_MB})"


@pytest.mark.parametrize("name", ZOO)
def test_each_model_loads_verified_and_answers_a_photo(name):
    manifest = verify_release(zoo_dir() / name)
    model = load_run(f"zoo:{name}")
    assert json.loads((zoo_dir() / name / RELEASE_MANIFEST).read_text()) == manifest
    caption = model.caption([a_photo()])[0]
    assert caption.strip(), f"zoo:{name} wrote an empty caption"
    if model.cfg.train.stage in ("instruct", "vqa"):
        answer = model.chat(a_photo(), [{"role": "user", "content": "<image>\nIs there a person in the image?"}])
        assert answer.strip()


@pytest.mark.parametrize("name", [n for n in ZOO if (zoo_dir() / n / PRIOR_FILE).exists()])
def test_a_chat_models_saved_prior_gives_the_prior_answers_its_records_hold(name):
    """The VQA prior row is read from the model's training questions, which the zoo does not carry; the prior its
    export saved must give every answer the recorded prior row gave."""
    from vlmlab.data.questions import Question
    from vlmlab.eval.question_scores import prior_predictions

    prior = json.loads((zoo_dir() / name / PRIOR_FILE).read_text())
    records = sorted((zoo_dir() / name / "records").glob("*eval_vqa.json"))
    assert records and prior["training questions"] > 0
    for record in records:
        answers = json.loads(record.read_text())["answers"]
        asked = [Question(a["question_id"], "", a["question"], question_type=a["question_type"]) for a in answers]
        assert prior_predictions("vqa", asked, prior) == [a["prior"] for a in answers], record.name


def test_every_chat_model_carries_its_prior():
    chat = [n for n in ZOO if load_config(zoo_dir() / n / "config.yaml").data.tasks]
    assert chat and all((zoo_dir() / n / PRIOR_FILE).exists() for n in chat)


RESCORED = [(name, r.name) for name in ZOO for r in sorted((zoo_dir() / name / "records").glob("captions_*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "record"), RESCORED)
def test_each_model_rescores_to_its_card(name, record):
    """The caption NLL of the split's first images with true and shuffled images, recomputed from the released
    (float16) weights, within 0.01 of the record its card was written from (its `first_images` block: the whole
    split is minutes of CPU per model, and CI keeps under 30 min)."""
    stated = json.loads((zoo_dir() / name / "records" / record).read_text())
    model = load_run(f"zoo:{name}")
    data = load_split(model, stated["split"])
    assert len(data.samples) == stated["images"]
    check = stated["first_images"]
    again = split_nll(model, first_images(data, check["images"]), model.cfg.train.seed)
    assert again["images"] == check["images"]
    assert again["nll_true_images"] == pytest.approx(check["nll_true_images"], abs=0.01)
    assert again["nll_shuffled_images"] == pytest.approx(check["nll_shuffled_images"], abs=0.01)


def _asked_sets(name):
    """(record, the question file, its images folder) for each of the model's question records on a real set of the
    chain it came from (photos-hour): those files and photos are in ../shared, so the answers can be asked again."""
    from vlmlab.analysis.chain import load_chain

    out = []
    for record in sorted((zoo_dir() / name / "records").glob("*eval_*.json")):
        files = [Path(f).name for f in json.loads(record.read_text())["files"]]
        for q in load_chain("photos-hour").questions if SHARED_DATA.is_dir() else []:
            if files == [Path(q["file"]).name]:
                out.append((name, record.name, q["file"], q["images"]))
    return out


REASKED = [case for name in ZOO for case in _asked_sets(name)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "record", "questions", "images"), REASKED)
def test_each_chat_model_answers_its_recorded_questions_again(name, record, questions, images, tmp_path):
    """The first 8 questions of each recorded real set, asked again of the released (float16) model, answer as the
    float32 run did: POPE yes/no margins within 0.05 (and the same answer wherever the recorded margin is wider);
    open answers the same for at least 7 of 8."""
    from vlmlab.eval.question_scores import evaluate_task

    stated = json.loads((zoo_dir() / name / "records" / record).read_text())
    row = json.loads((zoo_dir() / name / RELEASE_MANIFEST).read_text()).get("row", "model")
    evaluate_task(f"zoo:{name}", stated["task"], [questions], images, limit=8, out_dir=tmp_path, unseen_only=True)
    again = json.loads((tmp_path / f"eval_{stated['task']}.json").read_text())["answers"]
    before = stated["answers"][: len(again)]
    assert [a["question_id"] for a in again] == [a["question_id"] for a in before]  # the same questions, in order
    if stated["task"] == "pope":
        for new, old in zip(again, before):
            assert new["model yes-no margin"] == pytest.approx(old[f"{row} yes-no margin"], abs=0.05)
            if abs(old[f"{row} yes-no margin"]) > 0.05:
                assert new["model"] == old[row], new["question"]
    else:
        same = sum(new["model"] == old[row] for new, old in zip(again, before))
        assert same >= len(again) - 1, [(new["model"], old[row]) for new, old in zip(again, before)]


SUGARCREPE = [(name, r.name) for name in ZOO for r in sorted((zoo_dir() / name / "records").glob("sugarcrepe*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "record"), SUGARCREPE)
def test_each_sugarcrepe_row_rescores_to_its_record(name, record):
    """The first 4 kept items of each category, scored again by the released model (its row of the record: the
    blind LM's for a blind twin), give the recorded caption log-probabilities within 0.05 per caption."""
    from vlmlab.config import load_config
    from vlmlab.eval.caption_matching import caption_logprobs, default_sugarcrepe_images, read_sugarcrepe
    from vlmlab.eval.question_scores import photo_key, trained_photo_keys
    from vlmlab.run.release import resolve_model

    stated = json.loads((zoo_dir() / name / "records" / record).read_text())
    row = json.loads((zoo_dir() / name / RELEASE_MANIFEST).read_text()).get("row", "model")
    folder = require(SHARED_DATA / "questions" / "sugar-crepe")
    seen = trained_photo_keys(load_config(resolve_model(stated["run"]) / "config.yaml"))
    model = load_run(f"zoo:{name}")
    for category, rows in read_sugarcrepe(folder, default_sugarcrepe_images(folder)).items():
        kept = [r for r in rows if photo_key(r["image"]) not in seen][:4]
        images = [None if model.blind else r["image"] for r in kept]
        true = caption_logprobs(model, images, [r["caption"] for r in kept])
        negative = caption_logprobs(model, images, [r["negative_caption"] for r in kept])
        recorded = stated["logprobs"][row][category][:4]
        assert [list(p) for p in zip(true, negative)] == [pytest.approx(r, abs=0.05) for r in recorded], category


def test_a_record_names_a_zoo_model_as_zoo_name_on_every_machine(tmp_path):
    from vlmlab.run.release import model_name

    assert model_name(zoo_dir() / "demo") == model_name(f"{zoo_dir()}/demo/") == "zoo:demo"
    assert model_name(tmp_path / "demo") == str(tmp_path / "demo")  # a run folder elsewhere: as given
