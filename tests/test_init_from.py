"""`initialise_from` without training: a saved run's tensors go into a model of a later stage, and the rest is said.

The source is saved by the real save_checkpoint (manifest and all); it carries two extra `stage1.*` tensors the
way a BLIP-2 stage-1 checkpoint does (CONTRACTS.md), and has no LoRA, which the next stage adds.
"""

import pytest
import torch

from vlmlab.config import STAGES, load_config
from vlmlab.model.vlm import build_vlm
from vlmlab.run.checkpoint import TRAINABLE_FILE, CheckpointError, save_checkpoint
from vlmlab.train.stages import initialise_from

STAGE1_EXTRAS = {"stage1.text_proj.weight": torch.ones(3, 4), "stage1.itm_head.bias": torch.zeros(2)}


def tiny(tiny_clip_dir, tiny_gpt2_dir, *settings):
    base = [f"vision.name=hf:{tiny_clip_dir}", f"lm.name={tiny_gpt2_dir}", "connector.num_queries=4"]
    return build_vlm(load_config(None, [*base, *settings]))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_clip_dir, tiny_gpt2_dir):
    torch.manual_seed(1)
    model = tiny(tiny_clip_dir, tiny_gpt2_dir, "lm.lora.enabled=false")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # "trained": far from any fresh initialisation
    state = {**model.trainable_state_dict(), **STAGE1_EXTRAS}
    model.trainable_state_dict = lambda: state  # what a stage-1 model's state looks like
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    run = tmp_path_factory.mktemp("stage1")
    save_checkpoint(run, model, optimizer, scheduler, step=7, data_state={})
    return run, state


def test_matching_tensors_load_and_the_rest_is_reported(source_run, tiny_clip_dir, tiny_gpt2_dir, capsys):
    run, source = source_run
    model = tiny(tiny_clip_dir, tiny_gpt2_dir, "lm.lora.enabled=true")
    lora_before = {k: v.clone() for k, v in model.trainable_state_dict().items() if "lora_" in k}
    report = initialise_from(model, run)
    now = model.trainable_state_dict()
    connector = sorted(k for k in source if k.startswith("connector."))
    assert connector and report["loaded"] == connector
    assert all(torch.equal(now[k], source[k]) for k in connector)
    assert report["unused"] == sorted(STAGE1_EXTRAS)
    assert lora_before and report["not_in_source"] == sorted(lora_before)
    assert all(torch.equal(now[k], v) for k, v in lora_before.items())  # left at their initialisation
    printed = capsys.readouterr().out
    assert f"loaded {len(connector)} tensors" in printed
    assert "not used by this model: stage1.itm_head.* (1), stage1.text_proj.* (1)" in printed
    assert "not in the source, left at their initialisation" in printed


def test_a_run_without_a_checkpoint_is_an_error_naming_it(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    model = tiny(tiny_clip_dir, tiny_gpt2_dir)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        initialise_from(model, tmp_path)


def test_a_damaged_source_checkpoint_is_refused(source_run, tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    import shutil

    run, _ = source_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = copy / "checkpoint" / TRAINABLE_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        initialise_from(tiny(tiny_clip_dir, tiny_gpt2_dir), copy)


def test_every_stage_says_what_it_reads():
    assert list(STAGES)[:3] == ["caption", "instruct", "vqa"]
    for name in ("caption", "instruct", "vqa"):  # issue 15 adds its own "qformer" row
        stage = STAGES[name]
        assert stage.what and (stage.data == "captions" or "{split}" in stage.data), name
