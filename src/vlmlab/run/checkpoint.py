"""A run's checkpoint: its trained weights and training state with a SHA-256 manifest, written crash-safely
and verified before anything loads them."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import write_atomic
from ..data.features import file_digest
from ..model.vlm import VLM
from .lock import RunRefused
from .record import CHECKPOINT

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (TRAINABLE_FILE, STATE_FILE)  # what save_checkpoint writes and the manifest lists


class CheckpointError(RunRefused):
    """A checkpoint that is partial, corrupt or does not fit this run: never loaded silently."""


def _fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: VLMLAB_KILL_AT=NAME@STEP makes this process SIGKILL itself here."""
    if os.environ.get("VLMLAB_KILL_AT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_durably(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, model: VLM, optimizer, scheduler, step: int, data_state: dict) -> None:
    """Writes checkpoint/ atomically: files go to checkpoint.tmp/, a manifest of their SHA-256 last, then a rename.

    A crash at any point leaves either the previous checkpoint or the new one whole (see find_checkpoint).
    """
    final, tmp, old = (run_dir / (CHECKPOINT + suffix) for suffix in ("", ".tmp", ".old"))
    if tmp.exists():
        shutil.rmtree(tmp)  # a partial write from a crashed run: never a candidate for loading
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, model, optimizer, scheduler, step, data_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a file-size limit: the previous checkpoint stays
        raise
    _fault_point("checkpoint-written", step)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.replace(old)
    _fault_point("checkpoint-swapping", step)
    tmp.replace(final)
    if old.exists():
        shutil.rmtree(old)


def restore_rng(rng: dict) -> None:
    """Puts back every random state a checkpoint captured (_write_files): torch, Python, NumPy and, where the
    checkpoint was written on a GPU and this machine has one, CUDA."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _write_files(tmp: Path, model: VLM, optimizer, scheduler, step: int, data_state: dict) -> None:
    """The checkpoint's files, each flushed to disk, into checkpoint.tmp/: the weights, the state, the manifest."""
    _write_durably(tmp / TRAINABLE_FILE, lambda p: _save_weights(model.trainable_state_dict(), p, step))
    _fault_point("checkpoint-partial", step)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    _write_durably(tmp / STATE_FILE, lambda p: torch.save(state, p))
    manifest = {
        "step": step,
        "files": {name: file_digest(tmp / name, "sha256") for name in CHECKPOINT_FILES},
    }
    _write_durably(tmp / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=1)))


def _save_weights(tensors: dict, path: Path, step: int) -> None:
    """save_file, with its I/O failures raised as the OSError they are: safetensors reports a full disk as a
    SafetensorError whose text ends in "(os error 27)" (seen under `ulimit -f`), which no caller can tell from a
    bad tensor."""
    try:
        save_file(tensors, path, metadata={"step": str(step)})
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def verify_checkpoint(path: Path) -> int:
    """Checks every file of a checkpoint folder against its manifest; returns its step or raises CheckpointError.

    Every file in the folder must be listed (and match its SHA-256), and the manifest's step must be the one
    saved in the weights: a manifest edited around a changed file, or to another step, is refused."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        # checkpoint/ is renamed into place only after its manifest is written, so a checkpoint without one was
        # tampered with or damaged: refused, or deleting one file would switch every integrity check off
        raise CheckpointError(
            f"{path}: no {MANIFEST_FILE}; a finished checkpoint always has one (it lists the SHA-256 of each file), "
            "so this one was damaged or edited and is not loaded"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files, step = manifest["files"], int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from e
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: unreadable manifest ('files' is no mapping of names to SHA-256)")
    # a file the manifest does not list is checked by nothing: refused, or editing its line out of the manifest
    # would let any weights through
    for entry in sorted(path.iterdir()):
        if entry.name != MANIFEST_FILE and entry.name not in files:
            raise CheckpointError(
                f"{entry}: not listed in {MANIFEST_FILE}, so its SHA-256 cannot be checked; not loaded"
            )
    unlisted = [name for name in CHECKPOINT_FILES if name not in files]
    if unlisted:
        raise CheckpointError(f"{manifest_path}: does not list {', '.join(unlisted)} (a checkpoint always has "
                              f"{', '.join(CHECKPOINT_FILES)}); it was edited and is not trusted")  # fmt: skip
    for name, digest in files.items():
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: missing (listed in the manifest)")
        if file_digest(path / name, "sha256") != digest:
            raise CheckpointError(f"{path / name}: SHA-256 does not match the manifest; the file is corrupt")
    # the step says whether a run is finished (a chain reuses a finished stage): the manifest's must be the one
    # saved in the weights, which their SHA-256 covers
    try:
        with safe_open(str(path / TRAINABLE_FILE), "pt") as f:
            weights_step = (f.metadata() or {}).get("step")
    except SafetensorError as e:
        raise CheckpointError(f"{path / TRAINABLE_FILE}: not a safetensors file ({e})") from e
    if weights_step is not None and str(weights_step) != str(step):
        raise CheckpointError(f"{manifest_path}: says step {step}, but {TRAINABLE_FILE} was saved at step "
                              f"{weights_step}; the manifest was edited and is not trusted")  # fmt: skip
    return step


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: checkpoint/, or checkpoint.old/ when a crash hit the rename in between.

    checkpoint.tmp/ is never loaded. A checkpoint/ that fails verification raises: resuming from it, or silently
    from scratch, would both hide the damage.
    """
    final, old = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    if final.exists():
        verify_checkpoint(final)
        return final
    if old.exists():
        verify_checkpoint(old)
        return old
    return None


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint a resume would start from (find_checkpoint's, verified); None when there is none."""
    path = find_checkpoint(run_dir)
    return None if path is None else int(json.loads((path / MANIFEST_FILE).read_text())["step"])


def load_trainable(run_dir: Path, model: VLM) -> None:
    """Loads a run's trained weights after verifying them (find_checkpoint); a checkpoint without manifest is refused."""
    run_dir = Path(run_dir)
    path = find_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT / TRAINABLE_FILE})")
    load_trainable_from(path, model)


def load_trainable_from(checkpoint: Path, model: VLM) -> None:
    """Loads verified weights; non-finite values are refused (a NaN-weight model would caption silently empty)."""
    state = load_file(checkpoint / TRAINABLE_FILE)
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(
            f"{checkpoint / TRAINABLE_FILE}: {len(bad)} tensor(s) hold NaN/inf values (first: {bad[0]}); not loaded"
        )
    model.load_trainable_state_dict(state)


def truncate_metrics(path: Path, step: int) -> None:
    """Keeps the log records up to `step` (written before that checkpoint); rewritten atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line torn by the kill itself
    write_atomic(path, "".join(line + "\n" for line in keep))
