"""Arm records: a study that outlives the machine it runs on.

An ablation suite of many CPU-hours cannot finish in one sitting, and `runs/` does not survive a change of
machine. So `vlmlab ablate SUITE --records DIR` writes, as each arm (variant x seed) finishes, one small JSON,
DIR/<variant>/seed<k>.json: the arm's config (data paths written against $VLMLAB_DATA, so another machine's
data root reads the same), its finished step, its eval.json (and its BLIP-2 stage-1 eval.json), its parameter
counts and validation curve, with the commit, date and machine that made it. Committed as it is written, the
record stands in for the arm on any later machine: an arm with a record whose config is the one the suite now asks
for is not trained again, and its figures enter the tables as the run's own would. A record made with other
settings is refused by name (it describes another experiment), never silently reused or replaced.
"""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

from ..config import DATA_ROOT_VARIABLE, DEFAULT_DATA_ROOT, Config, ConfigError, config_to_dict, write_atomic
from ..run.record import flat, flat_differences, git_commit

ARM_RECORD_FORMAT = "vlmlab-arm/1"
# Keys that do not change what a finished arm's figures are: where its folders were, and how often it logged.
# (generate.* is compared: the captions an arm is scored on come from it.)
NOT_COMPARED = (
    "train.output_dir",
    "train.init_from",  # a pretrain variant's stage-1 folder: its own config is compared instead
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.eval_batches",
    "train.feature_batch_size",
)


def data_root() -> str:
    """The absolute data root of this machine ($VLMLAB_DATA, else the default), as data specs expand it."""
    return os.path.abspath(os.environ.get(DATA_ROOT_VARIABLE) or DEFAULT_DATA_ROOT)


def portable_dataset(spec: str, root: str) -> str:
    """'coco:/work/shared/data/coco2017-val' -> 'coco:$VLMLAB_DATA/coco2017-val' when root is /work/shared/data."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        return spec
    absolute = os.path.abspath(path)
    if absolute == root or absolute.startswith(root.rstrip("/") + "/"):
        return f"{kind}:${DATA_ROOT_VARIABLE}" + absolute[len(root.rstrip("/")) :]
    return spec


def portable_config(cfg: Config, root: str | None = None) -> dict:
    """The config as a flat {dotted.key: value} dict, data paths against $VLMLAB_DATA, folders left out."""
    root = root or data_root()
    values = flat(config_to_dict(cfg))
    values["data.datasets"] = [portable_dataset(s, root) for s in values.get("data.datasets") or []]
    return {k: v for k, v in values.items() if k not in NOT_COMPARED}


def logged(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per line; empty when it logged nothing."""
    from ..run.record import METRICS_FILE

    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) from a run's metrics.jsonl; empty when it logged none."""
    return [(r["step"], r["val_loss"]) for r in logged(run_dir) if "val_loss" in r]


def training_speed(run_dir: Path) -> float | None:
    """The median samples/s over a run's logged windows, None when it logged none: with the record's machine and
    threads, what a planner needs to size the next arm on another machine."""
    import statistics

    speeds = [r["samples_per_s"] for r in logged(run_dir) if "samples_per_s" in r]
    return round(statistics.median(speeds), 3) if speeds else None


def arm_record_path(records_dir: str | Path, variant: str, seed: int) -> Path:
    return Path(records_dir) / variant / f"seed{seed}.json"


def write_arm_record(
    path: Path, suite: str, variant: str, seed: int, cfg: Config, run_dir: Path, stage1: Config | None = None
) -> Path:
    """The finished, evaluated arm in run_dir (and its stage-1 run) -> one JSON at path."""
    import torch

    from ..run.checkpoint import checkpoint_step
    from ..run.hardware import cpu_info
    from ..run.record import MODEL_INFO_FILE

    record = {
        "format": ARM_RECORD_FORMAT,
        "suite": suite,
        "variant": variant,
        "seed": seed,
        "step": checkpoint_step(run_dir),
        "config": portable_config(cfg),
        "stage1_config": None if stage1 is None else portable_config(stage1),
        "eval": json.loads((run_dir / "eval.json").read_text()),
        "stage1_eval": None,
        "model_info": json.loads((run_dir / MODEL_INFO_FILE).read_text()),
        "val_curve": [list(point) for point in val_curve(run_dir)],
        "commit": git_commit(),
        "date": date.today().isoformat(),
        "machine": cpu_info().describe(),
        "speed": {"threads": torch.get_num_threads(), "samples_per_s": training_speed(run_dir)},
    }
    if stage1 is not None:
        record["stage1_eval"] = json.loads((Path(stage1.train.output_dir) / "eval.json").read_text())
        record["speed"]["stage1_samples_per_s"] = training_speed(Path(stage1.train.output_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def with_added_keys(recorded: dict) -> dict:
    """A recorded flat config with every key added to Config since it was written, at its default: a new key's
    default is what the code did before the key existed (e.g. connector.xattn_every for a prefix connector)."""
    defaults = {k: v for k, v in flat(config_to_dict(Config())).items() if k not in NOT_COMPARED}
    return {**defaults, **recorded}


PRECISION_KEY = "train.mixed_precision"


def recorded_precision(record: dict) -> str | None:
    """The precision the arm trained in ("float32", "bf16", ...), as its run recorded it."""
    return (record.get("model_info", {}).get("precision") or {}).get("used")


def _as_trained(config: dict, used: str | None) -> dict:
    """A flat config whose train.mixed_precision is the precision used instead of the one asked for: `auto` is
    float32 on one CPU and bf16 on another, so the request alone does not say which experiment ran. None: the
    precision is left out of the comparison."""
    config = {k: v for k, v in config.items() if k != PRECISION_KEY}
    return config if used is None else config | {PRECISION_KEY: used}


def read_arm_record(
    path: Path, cfg: Config, split: str, stage1: Config | None = None, precision_here: str | None = None
) -> dict | None:
    """The record at path when it is the arm the suite asks for (None when there is none); ConfigError when it
    records another experiment: other settings, another split, an unfinished run, or a file that is no record.

    precision_here: the precision an arm would train in on this machine (train/precision.py); a record trained
    in another is another experiment. None (tables only, nothing trains): any precision is taken, and the table
    names each arm's."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != ARM_RECORD_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {ARM_RECORD_FORMAT!r}")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: not an arm record ({e}); move it away") from e
    used = None if precision_here is None else recorded_precision(record)
    problems = [
        f"{k}: recorded {a!r}, now {b!r}"
        for k, a, b in flat_differences(
            _as_trained(with_added_keys(record["config"]), used), _as_trained(portable_config(cfg), precision_here)
        )
    ]
    if (stage1 is None) != (record.get("stage1_config") is None):
        problems.append("stage 1: " + ("recorded none, now asked for" if stage1 is not None else "recorded, now none"))
    elif stage1 is not None:
        problems += [f"stage 1 {k}: recorded {a!r}, now {b!r}"  # stage 1 trains in float32 whatever is asked
                     for k, a, b in flat_differences(_as_trained(with_added_keys(record["stage1_config"]), None),
                                                     _as_trained(portable_config(stage1), None))]  # fmt: skip
    if record.get("step") != cfg.train.max_steps:
        problems.append(f"step: recorded {record.get('step')!r}, the arm trains to {cfg.train.max_steps}")
    if record["eval"].get("split") != split:
        problems.append(f"split: recorded {record['eval'].get('split')!r}, the suite scores {split!r}")
    if problems:
        hint = (
            f" (`auto` picks the precision by hardware: --precision {used} trains new arms as the record did)"
            if any(p.startswith(PRECISION_KEY) for p in problems)
            else ""
        )
        raise ConfigError(
            f"{path} records this arm with other settings ({'; '.join(problems)}): it is another experiment; "
            f"move it away, or give another --records folder{hint}"
        )
    return record
