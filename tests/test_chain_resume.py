"""A chain killed in any stage and run again ends with the weights of an uninterrupted chain: a stage counts as
finished only when its checkpoint reached its train.max_steps, an unfinished one resumes exactly, and a stage
folder holding another run is refused before anything trains."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmlab.analysis.chain import load_chain, run_chain
from vlmlab.config import ConfigError, save_config
from vlmlab.run.checkpoint import CHECKPOINT, MANIFEST_FILE, TRAINABLE_FILE

STEPS = {"caption": 12, "instruct": 8, "vqa": 4}


def _chain_file(tmp, tiny_clip_dir, tiny_gpt2_dir, name="chain", **stage_settings):
    spec = {
        "name": name,
        "base": None,
        "overrides": {
            "vision.name": f"hf:{tiny_clip_dir}",
            "lm.name": str(tiny_gpt2_dir),
            "data.datasets": [f"synthetic:{tmp / 'world'}"],
            "data.synthetic_images": 40,
            "connector.num_queries": 4,
            "train.batch_size": 4,
            "train.save_every": 2,
            "train.eval_every": 100,
            "train.eval_batches": 1,
            "train.log_every": 1,
        },
        "tasks": str(tmp / "tasks"),
        "stages": {stage: {"train.max_steps": n, **stage_settings.get(stage, {})} for stage, n in STEPS.items()},
        "blind": False,
        "evaluate": [],
        "forgetting_split": None,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _saved_step(run_dir):
    """The step in a stage's checkpoint manifest (None: none yet, or caught in the middle of its rename)."""
    try:
        return json.loads((run_dir / CHECKPOINT / MANIFEST_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_a_chain_killed_in_any_stage_and_rerun_ends_with_the_uninterrupted_weights(
    tmp_path, tiny_clip_dir, tiny_gpt2_dir
):
    chain = _chain_file(tmp_path, tiny_clip_dir, tiny_gpt2_dir)
    env = {**os.environ, "VLMLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "chain.log", "a")

    def launch(out):
        args = [sys.executable, "-m", "vlmlab.cli", "chain", str(chain), "--out-dir", str(tmp_path / out)]
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill_during(stage):
        """Runs the chain until `stage` has saved a checkpoint short of its end, then SIGKILLs it."""
        proc, run_dir, deadline = launch("run"), tmp_path / "run" / stage, time.time() + 300
        while (_saved_step(run_dir) or 0) < 2:
            assert proc.poll() is None and time.time() < deadline, f"the chain ended before {stage} could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert 2 <= _saved_step(run_dir) < STEPS[stage], f"{stage} finished before the kill"
        return _saved_step(run_dir)

    assert launch("reference").wait(timeout=600) == 0  # also writes the tasks and the feature cache both use
    caption_step = kill_during("caption")
    assert not (tmp_path / "run" / "instruct").exists()
    instruct_step = kill_during("instruct")
    assert not (tmp_path / "run" / "vqa").exists()
    assert launch("run").wait(timeout=600) == 0

    text = (tmp_path / "chain.log").read_text()
    for stage, step in (("caption", caption_step), ("instruct", instruct_step)):
        assert f"resumed from {tmp_path / 'run' / stage / CHECKPOINT} at step {step}" in text
    for stage in STEPS:
        resumed = load_file(tmp_path / "run" / stage / CHECKPOINT / TRAINABLE_FILE)
        reference = load_file(tmp_path / "reference" / stage / CHECKPOINT / TRAINABLE_FILE)
        assert resumed.keys() == reference.keys()
        differing = [k for k in reference if not torch.equal(resumed[k], reference[k])]
        assert not differing, f"{stage}: {len(differing)} tensors differ from the uninterrupted chain's"
