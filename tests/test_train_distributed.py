"""Two processes on accelerate (gloo, CPU) train like one process taking the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from vlmlab.config import save_config
from vlmlab.run import load_run
from vlmlab.run.checkpoint import CHECKPOINT, verify_checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def tiny_gpt2_no_dropout(tiny_gpt2_dir, tmp_path_factory):
    """Dropout masks are drawn per process, so an exact comparison needs a model without dropout."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2-no-dropout")
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(out)
    return out


def _run(tmp_path, name, cfg, launcher):
    save_config(cfg, tmp_path / f"{name}.yaml")
    trace = tmp_path / f"trace-{name}"
    trace.mkdir()
    env = {
        **os.environ,
        "VLMLAB_CACHE": str(tmp_path / "cache"),
        "VLMLAB_TRACE_DATA": str(trace),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    cmd = [sys.executable, *launcher, "-m", "vlmlab.cli", "train", str(tmp_path / f"{name}.yaml")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    traces = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in sorted(trace.glob("rank*.jsonl"))}
    records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return traces, records, done.stdout + done.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_config, tiny_gpt2_no_dropout):
    def config(name, batch_size):
        return tiny_config(
            tmp_path,
            f"lm.name={tiny_gpt2_no_dropout}",
            f"train.batch_size={batch_size}",
            f"train.max_steps={STEPS}",
            "train.log_every=1",
            "train.save_every=3",
            "train.eval_every=3",
            "lm.lora.dropout=0.0",
            f"train.output_dir={tmp_path / name}",
        )

    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x unless an MPI hostfile is
    # given; torchrun-style launch (--multi_gpu) plus ACCELERATE_USE_CPU gives two CPU processes on gloo.
    launch = [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    two, two_records, log = _run(tmp_path, "two", config("two", 4), launch)
    assert "MULTI_CPU" in log or len(two) == 2, log[-2000:]

    # the feature cache was filled once, by one process, while the other waited
    shards = sorted((tmp_path / "cache" / "features").glob("*/shard-*.safetensors"))
    assert len(shards) == 2 and len({s.stem.rsplit("-", 1)[1] for s in shards}) == 1, shards  # train + val, one pid

    one, one_records, _ = _run(tmp_path, "one", config("one", 8), [])
    assert len(shards) == len(list((tmp_path / "cache" / "features").glob("*/shard-*.safetensors")))  # reused

    # ranks see disjoint data, and together exactly the single process's batch at every step
    assert sorted(two) == ["rank0", "rank1"] and sorted(one) == ["rank0"]
    for r0, r1, single in zip(two["rank0"], two["rank1"], one["rank0"], strict=True):
        assert r0["step"] == r1["step"] == single["step"]
        assert not set(r0["pairs"]) & set(r1["pairs"]), f"step {r0['step']}: both ranks trained on the same pairs"
        assert sorted(r0["pairs"] + r1["pairs"]) == sorted(single["pairs"])
    assert len(two["rank0"]) == STEPS

    # only rank 0 logs and saves: every record once, a whole checkpoint
    keys = [(r["step"], tuple(sorted(r))) for r in two_records]
    assert len(keys) == len(set(keys)) and [s for s, k in keys if "train_loss" in k] == list(range(1, STEPS + 1))
    assert verify_checkpoint(tmp_path / "two" / CHECKPOINT) == STEPS

    # the loss: the same numbers up to float summation order (stated tolerance: 1e-5 relative)
    def numbers(records):
        return [(r["step"], k, v) for r in records for k, v in r.items() if k in ("train_loss", "val_loss", "lr")]

    for (step, key, a), (_, _, b) in zip(numbers(two_records), numbers(one_records), strict=True):
        assert a == pytest.approx(b, rel=1e-5), f"{key} at step {step}: 2 processes {a} vs 1 process {b}"
    a, b = load_run(tmp_path / "two").trainable_state_dict(), load_run(tmp_path / "one").trainable_state_dict()
    # weights: Adam turns float noise in near-zero gradients into +-lr steps, so compare whole tensors (measured 6e-4)
    assert max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a) < 5e-3
