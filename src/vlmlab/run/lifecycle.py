"""How a training run opens its folder: one sequence shared by every training entry point.

Before anything loads or is written: the config is validated, its data and model sources are checked, the folder
is locked, what it holds is checked against what was asked (record.py: a new run, --resume or --overwrite) and
the checkpoint to resume from is verified. The lock is held until training ends. Only once the run is set up does
it replace a previous run (--overwrite) and write what it is (config.yaml, model_info.json).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, check_data_paths, check_model_sources, save_config, validate, write_atomic
from .checkpoint import find_checkpoint, verify_checkpoint
from .lock import run_lock
from .record import CONFIG_FILE, MODEL_INFO_FILE, check_run_folder, remove_previous_run


@dataclass
class TrainingStart:
    """A run folder opened for training: where it is, and where training starts."""

    cfg: Config
    run_dir: Path
    checkpoint: Path | None  # the verified checkpoint to resume from; None: training starts at step 0
    overwrite: bool  # replace the run the folder holds (clear_previous_run)

    def clear_previous_run(self, also: tuple[str, ...] = ()) -> None:
        """--overwrite, once the new run is set up: removes the previous run's artefacts (and the files `also`
        names) and says which; then the folder exists, empty of any other run."""
        if self.overwrite:
            removed = remove_previous_run(self.run_dir)
            for name in also:
                if (self.run_dir / name).exists():
                    (self.run_dir / name).unlink()
                    removed.append(name)
            if removed:
                print(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def write_record(self, model_info: dict) -> None:
        """Writes what the run is (config.yaml, model_info.json), once it is known to be valid."""
        save_config(self.cfg, self.run_dir / CONFIG_FILE)
        write_atomic(self.run_dir / MODEL_INFO_FILE, json.dumps(model_info))


@contextlib.contextmanager
def training_run(
    cfg: Config, resume: bool = False, overwrite: bool = False, lock: bool = True
) -> Iterator[TrainingStart]:
    """Opens cfg.train.output_dir for training and holds its lock for the `with` block.

    Raises ConfigError (or RunRefused: locked, damaged checkpoint) before anything loads or is written. lock=False
    for the processes of `accelerate launch` other than rank 0: one process writes the folder.
    """
    validate(cfg)
    check_data_paths(cfg)  # before anything loads or is written
    check_model_sources(cfg)  # a mistyped model name: one clear line now, not a minute of hub retries
    run_dir = Path(cfg.train.output_dir)
    with run_lock(run_dir) if lock else contextlib.nullcontext():
        check_run_folder(cfg, resume, overwrite)
        checkpoint = find_checkpoint(run_dir) if resume else None  # verified here, before setup
        step = verify_checkpoint(checkpoint) if checkpoint is not None else 0
        if step > cfg.train.max_steps:
            raise ConfigError(
                f"train.max_steps = {cfg.train.max_steps} is below the step of {checkpoint} ({step}): "
                "a run cannot be resumed backwards"
            )
        yield TrainingStart(cfg, run_dir, checkpoint, overwrite)
