"""What a run folder records, and the checks made before anything in it changes.

A run folder is a record: config.yaml says how its checkpoint was trained. So `vlmlab train` refuses to
start a new run over an existing one (unless --overwrite, which removes the old run only once the new one
has been set up), and `--resume` continues only the recorded run: every config key that changes the
training trajectory must equal the recorded one; only the keys in RESUME_MAY_CHANGE may differ.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..config import Config, ConfigError, config_to_dict, load_config

# The files of a run folder (the checkpoint's own files are named in checkpoint.py)
CONFIG_FILE = "config.yaml"
MODEL_INFO_FILE = "model_info.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT = "checkpoint"

# Keys that may differ on --resume: none of them changes what the weights become up to the recorded step.
# train.max_steps extends (or shortens) a run: the cosine schedule is then stretched to the new end from the
# checkpoint's step on (what an uninterrupted run with the new max_steps would have done differs before it).
RESUME_MAY_CHANGE = (
    "train.output_dir",  # a run folder may be moved or copied
    "train.max_steps",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.log_every",
    "train.feature_batch_size",  # only how many images are encoded at once into the feature cache
)
RESUME_MAY_CHANGE_PREFIXES = ("generate.",)  # decoding settings act after training

# What a training run writes into its folder; --overwrite removes exactly these (nothing else in the folder).
RUN_ARTEFACTS = (
    CONFIG_FILE,
    METRICS_FILE,
    CHECKPOINT,
    CHECKPOINT + ".tmp",
    CHECKPOINT + ".old",
    "metrics.tmp",
    "loss.png",
    MODEL_INFO_FILE,
    "eval.json",
    "eval.md",
    "contact_sheet.png",
    "baselines",
    "inspect",
)


def flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def holds_a_run(run_dir: Path) -> list[str]:
    """The run artefacts present in run_dir (an empty list: no run there)."""
    present = [name for name in RUN_ARTEFACTS if (run_dir / name).exists()]
    if present == [METRICS_FILE] and (run_dir / METRICS_FILE).stat().st_size == 0:
        return []
    return present


def flat_differences(saved: dict, want: dict, skip=lambda key: False) -> list[tuple[str, object, object]]:
    """(key, saved value, wanted value) for every key of two flat configs that differs, keys `skip` allows left out."""
    keys = sorted(k for k in set(saved) | set(want) if not skip(k))
    return [(k, saved.get(k), want.get(k)) for k in keys if saved.get(k) != want.get(k)]


def resume_differences(recorded: Config, new: Config) -> list[tuple[str, object, object]]:
    """(key, recorded value, new value) for every key that must match on resume and does not."""
    return flat_differences(
        flat(config_to_dict(recorded)),
        flat(config_to_dict(new)),
        skip=lambda key: key in RESUME_MAY_CHANGE or key.startswith(RESUME_MAY_CHANGE_PREFIXES),
    )


def recorded_config(run_dir: Path) -> Config | None:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return load_config(path)
    except (ConfigError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: the recorded config cannot be read ({e}); refusing to touch this run") from e


def check_run_folder(cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuses, before anything is written, a start that would destroy, mix or misdescribe the run in the folder."""
    run_dir = Path(cfg.train.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or replace it")
    present = holds_a_run(run_dir) if run_dir.is_dir() else []
    if not present:
        return
    if overwrite:
        if not (run_dir / CONFIG_FILE).exists() and not (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"--overwrite: {run_dir} does not look like a run folder (no config.yaml, no checkpoint)")
        return
    if not resume:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(present)}); use --resume to continue it, another "
            "train.output_dir, or --overwrite to replace it"
        )
    recorded = recorded_config(run_dir)
    if recorded is None:
        if (run_dir / CHECKPOINT).exists() or (run_dir / (CHECKPOINT + ".old")).exists():
            raise ConfigError(f"{run_dir} has a checkpoint but no {CONFIG_FILE}: what it was trained with is unknown")
        return
    differences = resume_differences(recorded, cfg)
    if differences:
        listed = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, a, b in differences)
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the recorded run on {len(differences)} key(s): "
            f"{listed}. Resume with the recorded settings, or train into another output_dir (only "
            f"{', '.join(RESUME_MAY_CHANGE[1:])} and generate.* may change on resume)"
        )


def check_out_dir(out_dir: str | Path, run_dir: str | Path, outputs: list[str], overwrite: bool) -> None:
    """An --out-dir for what a command writes about RUN_DIR (eval.json, ...): refused, before anything is created or
    loaded, when it is another run's folder (a run folder belongs to its run) or already holds one of `outputs`,
    unless overwrite. RUN_DIR itself is the command's own folder: its results there are replaced, as always."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file, not a folder")
    if overwrite or not out.is_dir() or out.resolve() == Path(run_dir).resolve():
        return
    run_files = [name for name in (CONFIG_FILE, CHECKPOINT, CHECKPOINT + ".old") if (out / name).exists()]
    if run_files:
        raise ConfigError(
            f"--out-dir {out} is another run's folder ({', '.join(run_files)}); a run folder belongs to its run: "
            f"give another --out-dir, or --overwrite to write {', '.join(outputs)} into it"
        )
    present = [name for name in outputs if (out / name).exists()]
    if present:
        raise ConfigError(
            f"--out-dir {out} already holds {', '.join(present)}; give another --out-dir, or --overwrite to replace "
            f"{'it' if len(present) == 1 else 'them'}"
        )


def remove_previous_run(run_dir: Path) -> list[str]:
    """--overwrite, once the new run is set up: removes the old run's artefacts; returns their names."""
    removed = []
    for name in RUN_ARTEFACTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


PACKAGE_REPO = Path(__file__).resolve().parents[3]  # the checkout this package runs from (src/vlmlab/run/..)


def git_commit(repo: str | Path = PACKAGE_REPO) -> str:
    """`git rev-parse HEAD` of the code (what a run's model_info.json and every record name); "unknown" outside
    git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"
