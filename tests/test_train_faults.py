"""Training survives SIGKILL (also mid-checkpoint) and resumes on the same trajectory; bad states are refused."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlmlab.config import ConfigError, save_config
from vlmlab.run import load_run
from vlmlab.run.checkpoint import CHECKPOINT, MANIFEST_FILE, TRAINABLE_FILE, CheckpointError, verify_checkpoint
from vlmlab.train.loop import train

FAST = ["train.max_steps=12", "train.save_every=3", "train.log_every=1", "train.eval_every=6", "train.eval_batches=1"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _trajectory(run_dir):
    """(step, kind, value) for every logged number except timings."""
    out = []
    for r in _records(run_dir):
        for key in ("train_loss", "val_loss", "val_loss_shuffled_images", "lr"):
            if key in r:
                out.append((r["step"], key, r[key]))
    return out


@pytest.fixture
def launch(tmp_path, tiny_config):
    """Starts `vlmlab train` in a fresh process (one thread, a shared feature cache) for a run folder."""
    env = {**os.environ, "VLMLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def start(name, resume=False, kill_at=None):
        cfg = tiny_config(tmp_path, *FAST, f"train.output_dir={tmp_path / name}")
        save_config(cfg, tmp_path / f"{name}.yaml")
        args = [sys.executable, "-m", "vlmlab.cli", "train", str(tmp_path / f"{name}.yaml")] + (
            ["--resume"] if resume else []
        )
        run_env = {**env, **({"VLMLAB_KILL_AT": kill_at} if kill_at else {})}
        log = open(tmp_path / f"{name}.log", "a")
        return subprocess.Popen(args, env=run_env, stdout=log, stderr=subprocess.STDOUT)

    return start


def _wait(proc, timeout=300):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_trajectory(tmp_path, launch):
    assert _wait(launch("reference")) == 0
    reference = _trajectory(tmp_path / "reference")
    assert [s for s, k, _ in reference if k == "train_loss"] == list(range(1, 13))
    run = tmp_path / "run"

    # 1. killed after the weights of the step-6 checkpoint are written, before its training state
    assert _wait(launch("run", kill_at="checkpoint-partial@6")) == -signal.SIGKILL
    assert verify_checkpoint(run / CHECKPOINT) == 3 and (run / (CHECKPOINT + ".tmp")).exists()
    # 2. resumed from step 3, killed between moving checkpoint/ aside and renaming the new one in
    assert _wait(launch("run", resume=True, kill_at="checkpoint-swapping@9")) == -signal.SIGKILL
    assert not (run / CHECKPOINT).exists() and verify_checkpoint(run / (CHECKPOINT + ".old")) == 6
    # 3. resumed from checkpoint.old (step 6), killed from outside at a step drawn at random
    target = random.Random(os.getpid()).randint(7, 11)
    proc = launch("run", resume=True)
    deadline = time.time() + 300
    while not any(r.get("step", 0) >= target and "train_loss" in r for r in _records(run)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert _wait(proc) == -signal.SIGKILL
    # 4. resumed to the end
    assert _wait(launch("run", resume=True)) == 0
    log = (tmp_path / "run.log").read_text()
    assert "resumed from" in log and f"{CHECKPOINT}.old at step 6" in log

    resumed = _trajectory(run)
    assert [(s, k) for s, k, _ in resumed] == [(s, k) for s, k, _ in reference]  # each record once, none lost
    for (step, key, a), (_, _, b) in zip(resumed, reference):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"{key} at step {step}: resumed {a} != uninterrupted {b}"
    a, b = load_run(run).trainable_state_dict(), load_run(tmp_path / "reference").trainable_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_corrupt_checkpoint_is_refused_not_loaded(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.save_every=2")
    run = train(cfg)
    weights = run / CHECKPOINT / TRAINABLE_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit-pattern in the tensor bytes: safetensors itself would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(cfg, resume=True)
    with pytest.raises(CheckpointError, match=TRAINABLE_FILE):
        load_run(run)

    (run / CHECKPOINT / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        train(cfg, resume=True)


def test_resume_refuses_a_changed_batch_size(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    train(tiny_config(tmp_path, "train.max_steps=2", "train.save_every=2"))
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train.batch_size: recorded 8, now 4"):
        train(tiny_config(tmp_path, "train.max_steps=4", "train.batch_size=4"), resume=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded  # refused before anything was written


def _poison_training_call(monkeypatch, call: int, kind: str):
    """Makes the call-th training forward (validation passes excluded) give a NaN loss or a NaN gradient."""
    from vlmlab.model.vlm import VLM

    original, calls = VLM.forward, {"n": 0}

    def forward(self, image_tokens, text, reduction="mean"):  # training calls use reduction="sum"
        out = original(self, image_tokens, text, reduction=reduction)
        if reduction != "sum" or not self.training:
            return out
        calls["n"] += 1
        if calls["n"] != call:
            return out
        nll_sum, count = out
        if kind == "loss":
            return nll_sum * float("nan"), count
        q = self.connector.queries.sum()
        return nll_sum + 0.0 * torch.sqrt(
            q - q
        ), count  # finite value; d sqrt(u)/du at 0 is inf, so the gradient is NaN

    monkeypatch.setattr(VLM, "forward", forward)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_value_stops_the_run_naming_the_step_and_keeps_the_checkpoint(
    tmp_path, tiny_config, monkeypatch, kind
):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.save_every=2")
    _poison_training_call(monkeypatch, call=4, kind=kind)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 4;.*step 2\) is intact"):
        train(cfg)
    checkpoint = tmp_path / "run" / CHECKPOINT
    assert verify_checkpoint(checkpoint) == 2
    weights = load_run(tmp_path / "run").trainable_state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_mode_drops_the_bad_batch_and_finishes(tmp_path, tiny_config, monkeypatch, kind):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.log_every=1", "train.on_nonfinite=skip")
    _poison_training_call(monkeypatch, call=4, kind=kind)
    run = train(cfg)
    records = _records(run)
    assert [r["step"] for r in records if "skipped_nonfinite" in r] == [4]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # step 4 redone on the next batch
    assert all(r["train_loss"] == r["train_loss"] for r in records if "train_loss" in r)  # no NaN logged
    state = torch.load(run / CHECKPOINT / "training_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 6 and state["data"]["batches_into_epoch"] == 7  # 7 batches, 6 updates
    assert all(torch.isfinite(v).all() for v in load_run(run).trainable_state_dict().values())


def test_a_diverged_run_in_skip_mode_still_stops(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE", str(tmp_path / "cache"))
    for call in range(1, 40):
        _poison_training_call(monkeypatch, call=call, kind="loss")  # every training batch, stacked
    cfg = tiny_config(tmp_path, "train.on_nonfinite=skip")
    with pytest.raises(FloatingPointError, match="in a row"):
        train(cfg)
