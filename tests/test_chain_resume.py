"""A chain killed in any stage and run again ends with the weights of an uninterrupted chain: a stage counts as
finished only when its checkpoint reached its train.max_steps, an unfinished one resumes exactly, and a stage
folder holding another run is refused before anything trains. A stage exported on one machine stands in for its
run on another (`--use STAGE=MODEL`), once it is checked to be that stage."""

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

from vlmlab.analysis.chain import load_chain, plan_stages, run_chain
from vlmlab.analysis.export import export_run
from vlmlab.config import ConfigError, apply_settings, save_config
from vlmlab.run.checkpoint import CHECKPOINT, MANIFEST_FILE, TRAINABLE_FILE, CheckpointError, save_checkpoint

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

    def launch_args(out):
        return [sys.executable, "-m", "vlmlab.cli", "chain", str(chain), "--out-dir", str(tmp_path / out)]

    def launch(out):
        return subprocess.Popen(launch_args(out), env=env, stdout=log, stderr=subprocess.STDOUT)

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

    # on another machine: the caption stage exported (float32: exact), the chain continues from the release
    export_run(tmp_path / "reference" / "caption", tmp_path / "released-caption", dtype="float32")
    args = ["--use", f"caption={tmp_path / 'released-caption'}"]
    done = subprocess.run([*launch_args("elsewhere"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "elsewhere" / "caption").exists()  # not trained again
    for stage in ("instruct", "vqa"):
        continued = load_file(tmp_path / "elsewhere" / stage / CHECKPOINT / TRAINABLE_FILE)
        reference = load_file(tmp_path / "reference" / stage / CHECKPOINT / TRAINABLE_FILE)
        differing = [k for k in reference if not torch.equal(continued[k], reference[k])]
        assert not differing, f"{stage}: {len(differing)} tensors differ from the chain trained in one sitting"


# ------------------------------------------------------------------- which stage folders a chain reuses, resumes, refuses


class _Weights(torch.nn.Module):
    """Stands in for a VLM in save_checkpoint: what the chain reads of a stage is its record and checkpoint step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def trainable_state_dict(self):
        return {"w": self.w.detach()}


def _stage_run(run_dir, cfg, step):
    """A stage folder as training leaves it: config.yaml, and a checkpoint at `step` (none for 0)."""
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    if step:
        model = _Weights()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        save_checkpoint(run_dir, model, optimizer, scheduler, step, {"epoch": 0, "batches_into_epoch": step})


@pytest.fixture
def chain(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    return load_chain(str(_chain_file(tmp_path, tiny_clip_dir, tiny_gpt2_dir)))


def _stage_config(chain, out, stage, *changes):
    previous = {"caption": None, "instruct": out / "caption", "vqa": out / "instruct"}[stage]
    return apply_settings(
        chain.config(stage, out / stage, previous, blind=False),
        {k: yaml.safe_load(v) for k, v in (c.split("=") for c in changes)},
    )


def _finished(chain, out):
    return {p.stage: p.finished for p in plan_stages(chain, out, None)}


def test_a_stage_is_finished_only_when_its_checkpoint_reached_its_steps(chain, tmp_path):
    out = tmp_path / "out"
    _stage_run(out / "caption", _stage_config(chain, out, "caption"), step=4)  # killed at step 5 of 12
    assert _finished(chain, out) == {"caption": False, "instruct": False, "vqa": False}
    (out / "caption" / CHECKPOINT / "manifest.json").unlink()  # and its manifest cannot be edited around
    with pytest.raises(CheckpointError, match="manifest"):
        plan_stages(chain, out, None)

    out = tmp_path / "out2"
    _stage_run(out / "caption", _stage_config(chain, out, "caption"), step=12)
    _stage_run(out / "instruct", _stage_config(chain, out, "instruct", "train.eval_every=5"), step=0)
    assert _finished(chain, out) == {"caption": True, "instruct": False, "vqa": False}  # killed before step 1
    # a finished stage asked for more steps (the chain file edited): resumed to them, not taken as finished
    chain.stages["caption"]["train.max_steps"] = 20
    assert _finished(chain, out) == {"caption": False, "instruct": False, "vqa": False}


def test_a_chain_folder_moved_whole_is_reused(chain, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for stage in STEPS:  # each stage recorded with the folders it was trained in, now under another name
        _stage_run(new / stage, _stage_config(chain, old, stage), step=STEPS[stage])
    assert _finished(chain, new) == {"caption": True, "instruct": True, "vqa": True}


def test_a_stage_folder_holding_another_run_is_refused_before_anything_is_written(chain, tmp_path):
    out = tmp_path / "out"
    _stage_run(out / "caption", _stage_config(chain, out, "caption", "train.lr=0.5"), step=STEPS["caption"])
    with pytest.raises(ConfigError, match=r"out/caption holds a run .*train.lr: recorded 0.5, now 0.0003"):
        run_chain(chain, out)
    assert not (tmp_path / "tasks").exists() and sorted(p.name for p in out.iterdir()) == ["caption"]


def test_a_stage_trained_on_an_unfinished_one_is_refused(chain, tmp_path):
    """What the chain did before stages had to be finished: instruct trained on a caption run killed at step 4."""
    out = tmp_path / "out"
    _stage_run(out / "caption", _stage_config(chain, out, "caption"), step=4)
    _stage_run(out / "instruct", _stage_config(chain, out, "instruct"), step=STEPS["instruct"])
    with pytest.raises(
        ConfigError, match=r"out/instruct holds a run \(step 8\) trained from .*out/caption, which is not"
    ):
        plan_stages(chain, out, None)


def test_a_stage_past_the_chains_steps_is_refused(chain, tmp_path):
    out = tmp_path / "out"
    _stage_run(out / "caption", _stage_config(chain, out, "caption"), step=STEPS["caption"])
    chain.stages["caption"]["train.max_steps"] = 6
    with pytest.raises(ConfigError, match="at step 12, past the chain's train.max_steps = 6"):
        plan_stages(chain, out, None)


# ------------------------------------------------------------------- a stage exported on another machine (--use)


def _released(chain, tmp_path, stage="caption", *changes):
    """A finished stage run exported as a release (float32), as another machine would have committed it."""
    made = tmp_path / "made-elsewhere"
    _stage_run(made / stage, _stage_config(chain, made, stage, *changes), step=STEPS[stage])
    return export_run(made / stage, tmp_path / f"release-{stage}", dtype="float32")


def test_an_exported_stage_stands_in_for_its_run(chain, tmp_path):
    release, out = _released(chain, tmp_path), tmp_path / "out"
    planned = plan_stages(chain, out, None, {"caption": release})
    assert [(p.stage, p.finished, p.run_dir) for p in planned][0] == ("caption", True, release)
    assert planned[1].cfg.train.init_from == str(release)  # instruct starts from the release's weights
    assert not out.exists()


def test_an_exported_stage_of_another_experiment_is_refused(chain, tmp_path):
    release, out = _released(chain, tmp_path, "caption", "train.lr=0.5"), tmp_path / "out"
    with pytest.raises(ConfigError, match=r"other settings than the chain's caption stage \(train.lr: released 0.5"):
        plan_stages(chain, out, None, {"caption": release})
    release = _released(chain, tmp_path, "instruct")  # caption still has to train: instruct did not start from it
    with pytest.raises(ConfigError, match="a stage before it trains now"):
        plan_stages(chain, out, None, {"instruct": release})
    with pytest.raises(ConfigError, match=r"--use blind/vqa: no such stage of this chain \(its stages: caption,"):
        plan_stages(chain, out, None, {"blind/vqa": release})
    with pytest.raises(ConfigError, match="not an exported model"):
        plan_stages(chain, out, None, {"caption": tmp_path})
