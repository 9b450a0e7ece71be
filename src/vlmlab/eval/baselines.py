"""Baselines that put a captioning score in context.

- the *blind* language model: the same LLM + LoRA, trained on the same captions with no visual
  tokens (connector.type 'none'): the best the text prior alone can write;
- the *frozen connector* control: the same training with the Q-Former (and projection) kept at its
  random initialisation, so only LoRA learns;
- *nearest-neighbour retrieval*: no generation at all; copy the training caption of the closest
  training images in the frozen encoder's pooled feature space (Devlin et al., 2015).

The two trained baselines live inside the run they are compared with, `RUN_DIR/baselines/<name>`,
are trained with the run's own config (one switch flipped) and reused while that config holds.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from safetensors import safe_open

from ..config import Config, config_to_dict, load_config
from ..data.pairs import SplitFeatures
from .metrics import plain_tokenize

BASELINES_DIR = "baselines"
TRAINED_BASELINES = {
    "blind": "blind language model: no visual tokens, same LLM + LoRA, same captions",
    "frozen_connector": "frozen connector (Q-Former + projection) kept at its random init, only LoRA learns",
}


def baseline_config(cfg: Config, name: str, run_dir: str | Path) -> Config:
    """The run's config with one switch flipped, writing into RUN_DIR/baselines/<name>."""
    out = copy.deepcopy(cfg)
    if name == "blind":
        out.connector.type = "none"
    elif name == "frozen_connector":
        out.connector.freeze = True
    else:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(TRAINED_BASELINES)}")
    out.train.output_dir = str(Path(run_dir) / BASELINES_DIR / name)
    return out


def applicable_baselines(cfg: Config) -> list[str]:
    """A blind run has no blind baseline; a run whose connector is already frozen has no frozen control."""
    names = []
    if cfg.connector.type != "none":
        names.append("blind")
        if not cfg.connector.freeze:
            names.append("frozen_connector")
    return names


def finished_step(run_dir: str | Path) -> int | None:
    """The step of a run's checkpoint (from the safetensors header, without loading the weights)."""
    from ..run.checkpoint import CHECKPOINT, TRAINABLE_FILE

    path = Path(run_dir) / CHECKPOINT / TRAINABLE_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("step", -1))


def stale_keys(expected: Config, run_dir: str | Path) -> list[str] | None:
    """Config keys on which a saved run differs from `expected` (None: no saved run).

    Ignored: where the run is written, and generation settings (they act at evaluation, not in training).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None

    def flat(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" != "train.output_dir" and not prefix.startswith("generate."):
                yield f"{prefix}{k}", v

    saved, want = dict(flat(config_to_dict(load_config(path)))), dict(flat(config_to_dict(expected)))
    return sorted(k for k in want if saved.get(k) != want[k])


def ensure_baseline(cfg: Config, name: str, run_dir: str | Path, train_missing: bool = True) -> Path | None:
    """Returns the baseline's finished run dir, training (or finishing) it first if allowed; None if absent."""
    from ..train.loop import train

    bcfg = baseline_config(cfg, name, run_dir)
    out = Path(bcfg.train.output_dir)
    stale = stale_keys(bcfg, out)
    if stale == [] and finished_step(out) == bcfg.train.max_steps:
        return out
    if not train_missing:
        return None
    if stale:
        print(f"baseline {name}: its saved config differs from the run's on {stale}; retraining it")
    print(f"baseline {name} ({TRAINED_BASELINES[name]}): training into {out}")
    train(bcfg, resume=stale == [], overwrite=bool(stale))  # a stale baseline is replaced, never mixed
    return out


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
