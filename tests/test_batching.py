"""Length-bucketed batches: every pair once per epoch, less padding on real captions, exact resume."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA, require
from vlmlab.data.batching import LengthBucketBatchSampler, pair_lengths, real_token_share
from vlmlab.train.loop import train


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=300),
    batch_size=st.integers(1, 16),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_an_epoch_is_full_batches_of_distinct_pairs(lengths, batch_size, seed, epoch):
    sampler = LengthBucketBatchSampler(lengths, batch_size, seed=seed, bucket_batches=4)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(lengths) // batch_size
    assert all(len(b) == batch_size for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) and all(0 <= i < len(lengths) for i in flat)
    assert list(sampler) == batches  # a pure function of (seed, epoch): what exact resume relies on


def test_epochs_and_seeds_change_the_order_and_every_pair_is_seen():
    rng = random.Random(0)
    lengths = [rng.randint(5, 30) for _ in range(400)]
    sampler = LengthBucketBatchSampler(lengths, 8, seed=0)
    epochs = []
    for e in range(3):
        sampler.set_epoch(e)
        epochs.append(list(sampler))
    assert epochs[0] != epochs[1] != epochs[2]
    assert {i for b in epochs[0] for i in b} == set(range(400))  # 400 = 50 full batches: nothing dropped
    other = LengthBucketBatchSampler(lengths, 8, seed=1)
    assert list(other) != epochs[0]
    # the batches' order is shuffled too, not sorted by length from short to long
    maxima = [max(lengths[i] for i in b) for b in epochs[0]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_on_real_coco_captions_buckets_compute_far_fewer_padding_tokens(gpt2_tokenizer):
    """The point of it: on COCO captions at batch 8, random batches waste a measurable share of text positions
    on padding; bucketed batches nearly none."""
    from vlmlab.data.formats import load_captions

    samples = load_captions(f"coco:{require(SHARED_DATA / 'coco2017-val')}", seed=0)["train"]
    pairs = [(0, c) for s in samples[:400] for c in s.captions]
    lengths = pair_lengths(gpt2_tokenizer, pairs)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, len(order) - 7, 8)]
    bucketed = list(LengthBucketBatchSampler(lengths, 8, seed=0))
    random_share, bucket_share = real_token_share(lengths, shuffled), real_token_share(lengths, bucketed)
    assert random_share < 0.85, random_share  # COCO captions vary: 8 to 30+ tokens
    assert bucket_share > 0.97, bucket_share
    assert bucket_share > random_share + 0.1


def test_pair_lengths_count_tokens_of_captions_and_conversations(gpt2_tokenizer):
    pairs = [(0, "a dog"), (1, [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "a dog"}])]
    short, conversation = pair_lengths(gpt2_tokenizer, pairs)
    assert short == 2 and conversation > short


def _trace(tmp_path, name):
    rows = [json.loads(x) for x in (tmp_path / name / "rank0.jsonl").read_text().splitlines()]
    return [(r["step"], r["pairs"]) for r in rows]


@pytest.mark.slow
def test_resume_with_length_buckets_continues_the_same_batches_across_epochs(tmp_path, tiny_config, monkeypatch):
    """A run stopped at step 7 and resumed trains on exactly the batches of an uninterrupted run, epoch
    boundaries included (the tiny world has a few batches per epoch)."""
    extra = [
        "data.batch_by_length=true",
        "data.max_train_images=10",
        "train.log_every=1",
        "train.eval_every=100",
        "train.save_every=7",
    ]
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("VLMLAB_TRACE_DATA", str(tmp_path / "straight"))
    cfg = tiny_config(tmp_path, *extra, "train.max_steps=16")
    cfg.train.output_dir = str(tmp_path / "run_straight")
    train(cfg)
    monkeypatch.setenv("VLMLAB_TRACE_DATA", str(tmp_path / "resumed"))
    cfg.train.output_dir = str(tmp_path / "run_resumed")
    cfg.train.max_steps = 7
    train(cfg)
    cfg.train.max_steps = 16
    train(cfg, resume=True)
    straight, resumed = _trace(tmp_path, "straight"), _trace(tmp_path, "resumed")
    assert [s for s, _ in straight] == list(range(1, 17))
    assert resumed == straight
    seen = [i for _, pairs in straight for i in pairs]
    assert len(set(seen)) < len(seen), "the test must cross an epoch boundary (a pair seen twice)"


def test_under_several_processes_each_rank_takes_its_share_and_follows_the_epoch():
    """accelerate wraps the batch sampler in its shard wrapper: the epoch must still reach it (or every epoch
    would repeat epoch 0's batches), and the ranks together take each batch of the epoch exactly once."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    lengths = [random.Random(i).randint(3, 30) for i in range(64)]
    full = LengthBucketBatchSampler(lengths, 4, seed=0, bucket_batches=4)
    per_rank = []
    for rank in (0, 1):
        loader = DataLoader(list(range(64)), batch_sampler=LengthBucketBatchSampler(lengths, 4, 0, bucket_batches=4))
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        epochs = []
        for epoch in (0, 1):
            shard.set_epoch(epoch)
            epochs.append([b.tolist() for b in shard])
        per_rank.append(epochs)
    for epoch in (0, 1):
        full.set_epoch(epoch)
        batches = list(full)
        assert per_rank[0][epoch] == batches[0::2] and per_rank[1][epoch] == batches[1::2]
    assert per_rank[0][0] != per_rank[0][1]
