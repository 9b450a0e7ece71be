"""Batches of captions of similar length: less padding, so the same step computes more real tokens.

A random batch is padded to its longest caption; on COCO captions that wastes a large share of every
step (benchmarks/train_throughput.py measures it). `LengthBucketBatchSampler` is the usual remedy
(HF Trainer's `group_by_length`, fairseq's buckets): shuffle, cut the permutation into "mega-batches"
of `bucket_batches` batches, sort each mega-batch by length, cut it into batches, shuffle the batches.
Batches stay random in content and order; only their length spread shrinks.

Exact resume: every epoch's batches are a pure function of (seed, epoch), so `set_epoch(e)` and
skipping the first k batches (accelerate's `skip_first_batches`) continue a run exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class EpochPermutation(Sampler[int]):
    """A random permutation of range(n) drawn from (seed, epoch) alone: the same epoch gives the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator()).tolist())

    def __len__(self) -> int:
        return self.n


class LengthBucketBatchSampler(BatchSampler):
    """Batches of `batch_size` indices whose `lengths` are close; the incomplete last batch is dropped.

    `sampler` is an `EpochPermutation` so that accelerate (which calls `batch_sampler.sampler.set_epoch`,
    also through its multi-process shard wrapper) sets the epoch of the one object that decides the order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucket_batches: int = 32):
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and bucket_batches ({bucket_batches}) must be >= 1")
        super().__init__(EpochPermutation(len(lengths), seed), batch_size, drop_last=True)
        self.lengths = list(lengths)
        self.bucket_batches = bucket_batches

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        order = order[: len(order) - len(order) % self.batch_size]  # drop_last: random leftovers, not the longest
        mega = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), mega):
            bucket = sorted(order[start : start + mega], key=lambda i: self.lengths[i])
            batches += [bucket[i : i + self.batch_size] for i in range(0, len(bucket), self.batch_size)]
        generator = self.sampler.generator()
        generator.manual_seed(generator.initial_seed() + 1)  # batch order: a second stream of the same epoch
        return iter([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size


def pair_lengths(tokenizer, pairs: Sequence[tuple[int, object]]) -> list[int]:
    """The text length of each training pair in tokens: a caption's tokens, or a conversation's message tokens."""
    texts = [c if isinstance(c, str) else " ".join(m["content"] for m in c) for _, c in pairs]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def real_token_share(lengths: Sequence[int], batches: Sequence[Sequence[int]], fixed: int = 0) -> float:
    """Share of computed token positions that are real when each batch is padded to its longest row; `fixed`
    tokens per row (visual tokens, prompt) are real in every row."""
    real = sum(fixed + lengths[i] for b in batches for i in b)
    computed = sum(len(b) * (fixed + max(lengths[i] for i in b)) for b in batches)
    return real / computed
