"""Training the baselines a caption run is scored beside, before it is scored.

Scoring a run never trains one: the command that orchestrates (`vlmlab eval captions`) trains them here and
hands `eval.captioning.evaluate_run` their run folders. Two are trained (eval/baselines.py says what each shows):
the blind language model (connector.type 'none') and the frozen-connector control (connector.freeze).
They live inside the run they are compared with, `RUN_DIR/baselines/<name>`, are trained with the run's own
config (one switch flipped) and reused while that config holds.
"""

from __future__ import annotations

import copy
from pathlib import Path

from safetensors import safe_open

from ..config import Config, config_to_dict, load_config
from ..eval.baselines import TRAINED_BASELINES

BASELINES_DIR = "baselines"


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


def train_baselines(run_dir: str | Path, train_missing: bool = True) -> dict[str, Path | None]:
    """Each baseline that applies to a caption run, by name: its finished run folder, trained (or finished)
    first unless train_missing is False, when a baseline not finished with the run's config is None.

    A run without a finished checkpoint cannot be scored, so it is refused before any baseline trains for it."""
    from ..run.checkpoint import CHECKPOINT, TRAINABLE_FILE, find_checkpoint

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if find_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT / TRAINABLE_FILE})")
    return {name: ensure_baseline(cfg, name, run_dir, train_missing) for name in applicable_baselines(cfg)}
