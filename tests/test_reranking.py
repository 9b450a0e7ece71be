"""Choosing among beam candidates: MBR and neighbour consensus pick what they should, on hand-made cases and a
tiny model; `vlmlab eval --rerank` records the rule, the candidates and every rule's scores."""

import json

import pytest

from vlmlab.eval.captioning import evaluate_split
from vlmlab.eval.reranking import (
    Reranker,
    check_rerank,
    consensus_scores,
    mbr_choice,
    neighbour_choice,
    oracle_choice,
    pick,
)

DOGS = ["a dog runs on the grass", "a brown dog runs on grass", "a dog running in the grass", "a red bus"]
CATS = ["a cat sleeps on a sofa", "a cat on a sofa", "a grey cat sleeping on the sofa", "a plate of food"]
TRAINS = ["a train at the station", "a long train in a station", "a train pulls into a station", "two men"]


def test_mbr_picks_the_candidate_the_others_agree_with():
    chosen = mbr_choice([DOGS, CATS, TRAINS])
    assert chosen[0] in DOGS[:3] and chosen[1] in CATS[:3] and chosen[2] in TRAINS[:3]  # never the odd one out
    assert chosen[0] == "a dog runs on the grass"  # shares the most n-grams with both siblings


def test_neighbour_consensus_follows_the_neighbours_not_the_beam_order():
    neighbours = [["a red bus on a street", "a red double decker bus"], ["food on a plate", "a plate of food"]]
    chosen = neighbour_choice([DOGS, CATS], neighbours)
    assert chosen == ["a red bus", "a plate of food"]  # the last beam wins when the neighbours say so


def test_consensus_scores_rank_an_exact_reference_first_and_ties_go_to_the_likelier_beam():
    scores = consensus_scores([DOGS, CATS, TRAINS], [[DOGS[1]] * 2, [CATS[2]] * 2, [TRAINS[0]] * 2])
    assert max(range(4), key=scores[0].__getitem__) == 1
    assert max(range(4), key=scores[1].__getitem__) == 2
    assert pick([["x", "y", "z"]], [[0.5, 0.5, 0.1]]) == ["x"]
    assert oracle_choice([DOGS, CATS], [["a red bus"], ["a cat on a sofa"]]) == ["a red bus", "a cat on a sofa"]


def test_bad_rerank_settings_fail_before_anything_loads():
    with pytest.raises(ValueError, match="unknown rerank rule"):
        check_rerank("best", 5)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        check_rerank("mbr", 1)
    with pytest.raises(ValueError, match="nearest-neighbour retriever"):
        Reranker("neighbours", 5)
    with pytest.raises(ValueError, match="pseudo-reference"):
        consensus_scores([DOGS], [])


def test_candidates_are_the_beams_best_first(tiny_vlm, tiny_split):
    features = tiny_split.features.float()
    candidates = tiny_vlm.candidates_from_tokens(features, 3)
    assert len(candidates) == 4 and all(len(c) == 3 for c in candidates)
    assert [c[0] for c in candidates] == tiny_vlm.generate_from_tokens(features, num_beams=3)


def test_evaluate_split_with_mbr_keeps_a_candidate_and_scores_every_rule(tiny_vlm, tiny_split):
    result = evaluate_split(
        tiny_vlm, tiny_split, batch_size=2, reranker=Reranker("mbr", 3), num_beams=3, use_java=False
    )
    assert result["generation"]["rerank"] == "mbr" and result["generation"]["candidates"] == 3
    assert result["generation"]["num_beams"] == 3  # the width the candidates came from, not the run's default
    for example in result["examples"]:
        assert len(example["candidates"]) == 3 and example["caption"] in example["candidates"]
    assert [e["caption"] for e in result["examples"]] == mbr_choice([e["candidates"] for e in result["examples"]])
    table = result["selection"]
    assert list(table) == ["beam top-1", "mbr", "oracle (true references)"]
    assert table["oracle (true references)"]["CIDEr-D"] >= max(r["CIDEr-D"] for r in table.values()) - 1e-9


@pytest.mark.slow  # trains a tiny run
def test_eval_command_reranks_with_the_retrieval_neighbours(tmp_path, tiny_config, monkeypatch):
    from vlmlab.cli import main as cli_main
    from vlmlab.train.loop import train

    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, "train.max_steps=2", "generate.max_new_tokens=4")
    run_dir = train(cfg)
    out = tmp_path / "reranked"
    argv = ["eval", str(run_dir), "--split", "val", "--no-baselines", "--retrieval-k", "2", "--contact-images", "0"]
    assert cli_main(argv + ["--rerank", "neighbours", "--candidates", "3", "--out-dir", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    expected = {"num_beams": 3, "rerank": "neighbours", "candidates": 3, "rerank_neighbours_k": 2}
    assert {k: result["generation"][k] for k in expected} == expected
    row = next(iter(result["rows"].values()))
    assert all(e["caption"] in e["candidates"] for e in row["examples"])
    assert set(row["selection"]) == {"beam top-1", "mbr", "neighbours", "oracle (true references)"}
    text = (out / "eval.md").read_text()
    assert "Choosing among the model's 3 beam candidates" in text and "nearest training images" in text

    with pytest.raises(SystemExit):  # argparse refuses an unknown rule
        cli_main(argv + ["--rerank", "best"])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        cli_main(argv + ["--rerank", "mbr", "--candidates", "1", "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # refused before anything was written
