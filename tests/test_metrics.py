"""Caption metrics on hand-made cases with known answers.

Most tests use the plain tokenizer (use_java=False): no JVM, milliseconds. The Java path (PTB
tokenizer + METEOR, ~10 s to load METEOR) runs once, in a module fixture, and is skipped without Java.
"""

import math
import shutil
import warnings

import pytest

from vlmlab.eval.metrics import _ptb_tokenize, caption_metrics, cider_per_image, plain_tokenize

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="no java on PATH")

REFS = {
    "1": ["a dog runs on the grass"],
    "2": ["a cat sleeps on a red sofa"],
    "3": ["two men ride bikes down a street"],
}


def plain(refs, cands):
    """Java-free metrics without the (expected) fallback warning cluttering the output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return caption_metrics(refs, cands, use_java=False)


def test_plain_tokenize():
    assert plain_tokenize("A Dog.") == "a dog"
    assert plain_tokenize("  Two men,  riding bikes!\n") == "two men riding bikes"


def test_identical_caption_scores_one():
    m = plain({"1": ["a dog runs on the grass"]}, {"1": "a dog runs on the grass"})
    for n in range(1, 5):
        assert m[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(1.0)


def test_no_shared_words_scores_zero():
    cands = {"1": "blue sky above", "2": "three old trucks parked", "3": "snowy mountain peak"}
    m = plain(REFS, cands)
    assert m["BLEU-1"] == pytest.approx(0.0, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(0.0)
    assert m["CIDEr-D"] == pytest.approx(0.0)


def test_half_the_words_match():
    # same length (brevity penalty 1), 2 of 4 unigrams match -> BLEU-1 = 2/4;
    # LCS = 2 so ROUGE-L precision = recall = 1/2 and its F-score is 1/2 too
    m = plain({"1": ["the cat sat down"]}, {"1": "the cat ran away"})
    assert m["BLEU-1"] == pytest.approx(0.5, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(0.5)


def test_cider_d_by_hand():
    """CIDEr-D = 10 * mean over n=1..4 of the clipped tf-idf cosine, times exp(-len_diff^2 / 72).

    Two images, so every n-gram here has idf log(2/1). Image 1: "a b" vs "a b c": unigram cosine
    2/sqrt(6), bigram 1/sqrt(2), no 3-/4-grams in the candidate (0); length penalty exp(-1/72).
    Image 2: "x y" vs "x y": 1, 1, and 0, 0 (a 2-word caption has no 3-grams), so 5, not 10.
    """
    penalty = math.exp(-1 / 72)
    image1 = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * penalty / 4
    image2 = 10 * (1 + 1) / 4
    m = plain({"1": ["a b c"], "2": ["x y"]}, {"1": "a b", "2": "x y"})
    assert m["CIDEr-D"] == pytest.approx((image1 + image2) / 2, rel=1e-9)


def test_cider_ranks_right_captions_above_shuffled():
    right = {k: refs[0] for k, refs in REFS.items()}
    shuffled = {"1": right["2"], "2": right["3"], "3": right["1"]}
    assert plain(REFS, right)["CIDEr-D"] > plain(REFS, shuffled)["CIDEr-D"]


def test_plain_fallback_warns_once_and_skips_meteor():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = caption_metrics(REFS, {k: r[0] for k, r in REFS.items()}, use_java=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "METEOR" in message and "\n" not in message
    assert m["tokenizer"] == "plain" and m["java"] is False and m["METEOR"] is None
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert isinstance(m[key], float)


def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match="'3'"):
        caption_metrics(REFS, {"1": "a dog", "2": "a cat"}, use_java=False)
    with pytest.raises(ValueError, match="'9'"):
        caption_metrics(REFS, {"1": "a", "2": "b", "3": "c", "9": "d"}, use_java=False)


def test_empty_reference_list_raises():
    with pytest.raises(ValueError, match="'2'"):
        caption_metrics({"1": ["a dog"], "2": []}, {"1": "a dog", "2": "a cat"}, use_java=False)


@pytest.fixture(scope="module")
def java_metrics():
    """One full PTB + METEOR run: references differ from the candidates only in case/punctuation."""
    refs = {
        "1": ["A Dog runs on the grass."],
        "2": ["A cat, sleeping on a red sofa!"],
        "3": ["Two men ride bikes down a street..."],
    }
    cands = {
        "1": "a dog runs on the grass",
        "2": "a cat sleeping on a red sofa",
        "3": "two men ride bikes down a street",
    }
    return caption_metrics(refs, cands, use_java=True)


@needs_java
def test_ptb_ignores_case_and_punctuation():
    gts, res = _ptb_tokenize({"a": ["A Dog."]}, {"a": "a dog"})
    assert gts["a"] == res["a"] == ["a dog"]


@needs_java
def test_java_path_identical_after_tokenization(java_metrics):
    m = java_metrics
    assert m["tokenizer"] == "ptb" and m["java"] is True
    for n in range(1, 5):
        assert m[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE-L"] == pytest.approx(1.0)
    assert m["METEOR"] > 0.9
    assert m["CIDEr-D"] == pytest.approx(10.0)  # pycocoevalcap scales CIDEr-D by 10


def test_cider_per_image_averages_to_the_corpus_score_and_ranks_within_it():
    refs = {"a": ["a red square on the left", "a red square"], "b": ["two dogs on grass"], "c": ["a blue circle"]}
    cands = {"a": "a red square on the left", "b": "a dog on the beach", "c": "two black cats"}
    per_image = cider_per_image(refs, cands, use_java=False)
    corpus = caption_metrics(refs, cands, use_java=False, meteor=False)["CIDEr-D"]
    assert set(per_image) == set(refs)
    assert math.fsum(per_image.values()) / 3 == pytest.approx(corpus)
    assert per_image["c"] == 0.0 < per_image["a"]  # no word shared with its references
    # document frequencies come from the references alone: another image's caption moves only its own score
    moved = cider_per_image(refs, cands | {"b": "two dogs on grass"}, use_java=False)
    assert moved["b"] > per_image["b"] and {k: moved[k] for k in "ac"} == {k: per_image[k] for k in "ac"}
