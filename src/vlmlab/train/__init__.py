"""Training: `setup` -> `resume_from` -> `fit` (loop.py) and what a run folder holds (checkpoint.py).

Names resolve lazily, so `from vlmlab.train import load_run` (or `vlmlab.train.checkpoint`) reads a
finished run without importing the training loop or accelerate.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "train": "loop",
    "setup": "loop",
    "fit": "loop",
    "resume_from": "loop",
    "load_run": "checkpoint",
    "load_trainable": "checkpoint",
    "find_checkpoint": "checkpoint",
    "verify_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
