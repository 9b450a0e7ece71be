"""Baselines that put a captioning score in context.

- the *blind* language model: the same LLM + LoRA, trained on the same captions with no visual
  tokens (connector.type 'none'): the best the text prior alone can write;
- the *frozen connector* control: the same training with the Q-Former (and projection) kept at its
  random initialisation, so only LoRA learns;
- *nearest-neighbour retrieval*: no generation at all; copy the training caption of the closest
  training images in the frozen encoder's pooled feature space (Devlin et al., 2015).

The two trained baselines are trained before scoring by analysis/baselines.py, inside the run they are
compared with (`RUN_DIR/baselines/<name>`), and handed to the evaluation as run folders: scoring never trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu

from ..data.pairs import SplitFeatures
from .metrics import plain_tokenize

TRAINED_BASELINES = {
    "blind": "blind language model: no visual tokens, same LLM + LoRA, same captions",
    "frozen_connector": "frozen connector (Q-Former + projection) kept at its random init, only LoRA learns",
}


# ---- nearest-neighbour retrieval ---------------------------------------------------------------


def pooled(image_tokens: torch.Tensor) -> torch.Tensor:
    """[M, N, D] image tokens -> [M, D] unit vectors: the encoder's global average pool, L2-normalised."""
    return F.normalize(image_tokens.float().mean(dim=1), dim=-1)


def consensus_caption(candidates: list[str]) -> str:
    """The candidate most similar to the others: highest mean BLEU-1..4 against the rest as references."""
    if len(candidates) == 1:
        return candidates[0]
    tokens = [plain_tokenize(c) or c for c in candidates]
    gts = {i: tokens[:i] + tokens[i + 1 :] for i in range(len(tokens))}
    res = {i: [tokens[i]] for i in range(len(tokens))}
    _, per_sample = Bleu(4).compute_score(gts, res, verbose=0)
    scores = torch.tensor(per_sample, dtype=torch.float64).mean(dim=0)  # [num candidates]
    return candidates[int(scores.argmax())]


class NearestNeighbourCaptioner:
    """Captions an image with the consensus caption of its k nearest training images (cosine, pooled features)."""

    def __init__(self, train: SplitFeatures, k: int = 5):
        if not train.samples:
            raise ValueError("retrieval needs a non-empty training split")
        if k < 1:
            raise ValueError(f"retrieval k must be >= 1, got {k}")
        self.train = train
        self.k = min(k, len(train.samples))
        self.keys = pooled(train.features)

    def neighbours(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> indices of the k nearest training images [B, k], nearest first."""
        similarity = pooled(image_tokens) @ self.keys.T
        return similarity.topk(self.k, dim=1).indices

    def neighbour_captions(self, image_tokens: torch.Tensor) -> list[list[str]]:
        """All training captions of each image's k nearest training images, nearest first."""
        return [
            [c for i in row for c in self.train.samples[i].captions] for row in self.neighbours(image_tokens).tolist()
        ]

    def caption(self, image_tokens: torch.Tensor) -> list[str]:
        return [consensus_caption(candidates) for candidates in self.neighbour_captions(image_tokens)]
