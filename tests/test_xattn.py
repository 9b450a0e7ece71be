"""Cross-attention fusion (connector.type xattn): the image enters through gated layers, not the prompt.

Untrained, the gates are shut and the model is exactly its LLM; opened, the text reads the image; rows without
an image read nothing; beams, training, resume and reloading see the same blocks."""

import pytest
import torch

from helpers import tiny_chain_file
from vlmlab.config import ConfigError, load_config
from vlmlab.model.vlm import build_vlm
from vlmlab.model.xattn import CrossAttentionConnector


@pytest.fixture(scope="module")
def xattn_vlm(tmp_path_factory, tiny_config):
    """The tiny CLIP + GPT-2 with a cross-attention block before each of its 2 layers, untrained, in eval mode."""
    cfg = tiny_config(tmp_path_factory.mktemp("xattn"), "connector.type=xattn", "connector.xattn_every=1")
    return build_vlm(cfg).eval()


def open_gates(model, value=2.0):
    with torch.no_grad():
        for block in model.connector.blocks:
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


def test_shut_gates_leave_the_llm_as_it_is_and_still_let_gradients_open_them(xattn_vlm):
    model = xattn_vlm
    assert isinstance(model.connector, CrossAttentionConnector)
    assert model.num_visual_tokens == 0 and model.connector.layer_ids == [0, 1]  # every layer of the 2-layer GPT-2
    text = model.text_batch(["a red circle.", "a blue square at the top left."])
    images = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert model(images, text).item() == model(None, text).item() == model(images.flip(0), text).item()
    model.zero_grad()
    model(images, text).backward()
    block = model.connector.blocks[0]
    assert block.attn_gate.grad.abs().item() > 0 and block.ffn_gate.grad.abs().item() > 0  # tanh'(0) = 1
    assert block.query.weight.grad is None or block.query.weight.grad.abs().max().item() == 0  # gated off
    model.zero_grad()


def test_open_gates_make_the_text_read_the_image_at_the_texts_own_positions(xattn_vlm):
    model = xattn_vlm
    open_gates(model)
    try:
        text = model.text_batch(["a red circle.", "a blue square at the top left."])
        images = torch.randn(2, 16, 32)
        with torch.no_grad():
            true = model(images, text, reduction="sum_per_sample")
            swapped = model(images.flip(0), text, reduction="sum_per_sample")
            alone = model(None, text, reduction="sum_per_sample")
        assert not torch.allclose(true[0], swapped[0]) and not torch.allclose(true[0], alone[0])
        assert torch.equal(true[1], text.labels.ne(-100).sum(1))  # no visual positions: the caption's tokens only
        greedy = model.generate_from_tokens(images)
        beams = model.generate_from_tokens(images, num_beams=3)  # beams repeat each row's memory
        assert len(greedy) == len(beams) == 2
        assert model.generate_from_tokens(images[:1]) == greedy[:1]  # a row's caption does not depend on its batch
    finally:
        open_gates(model, 0.0)


def test_a_row_without_an_image_reads_nothing_in_a_mixed_batch(xattn_vlm):
    model = xattn_vlm
    open_gates(model)
    try:
        conversations = [
            [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
        ]
        text_only = [[{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."}]]
        images = torch.randn(2, 16, 32)
        with torch.no_grad():
            mixed = model.conversation_text_batch(conversations + text_only, images=[True, False])
            both = model(images, mixed, reduction="sum_per_sample")[0]
            alone = model(None, model.conversation_text_batch(text_only, images=[False]), reduction="sum_per_sample")[0]
        assert torch.allclose(both[1], alone[0], atol=1e-4)
    finally:
        open_gates(model, 0.0)


class Interrupted(Exception):
    pass


def test_an_xattn_run_trains_resumes_exactly_and_reloads_with_its_blocks(tmp_path, tiny_config, monkeypatch):
    from vlmlab.run import checkpoint, load_run
    from vlmlab.train.loop import train

    xattn = ("connector.type=xattn", "connector.xattn_every=1", "train.save_every=3", "train.max_steps=9")
    run_dir = train(tiny_config(tmp_path, *xattn))

    def stop_at_step_6(name, step):
        if step == 6:
            raise Interrupted(name)

    with monkeypatch.context() as patch:  # interrupted while writing the step-6 checkpoint: step 3's is the last
        patch.setattr(checkpoint, "_fault_point", stop_at_step_6)
        with pytest.raises(Interrupted):
            train(tiny_config(tmp_path / "b", *xattn))
    train(tiny_config(tmp_path / "b", *xattn), resume=True)
    loaded, resumed = load_run(run_dir), load_run(tmp_path / "b" / "run")
    straight, continued = loaded.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(straight[k], continued[k]) for k in straight)  # exact resume, cross-attention included
    gates = [b.attn_gate.item() for b in loaded.connector.blocks]
    assert all(g != 0.0 for g in gates)  # training opened them
    state = loaded.trainable_state_dict()
    assert any(k.startswith("connector.blocks.0.") for k in state) and any(
        k.startswith("connector.resampler.") for k in state
    )
    again = load_run(run_dir)
    text = loaded.text_batch(["a small red circle in the center."])
    images = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert loaded(images, text).item() == again(images, text).item()
    assert len(loaded.connector._hooks) == len(loaded.connector.blocks)  # each block applied once per layer


def test_xattn_settings_are_checked_before_loading():
    with pytest.raises(ConfigError, match="xattn_every"):
        load_config(None, ["connector.type=xattn", "connector.xattn_every=0"])
    with pytest.raises(ConfigError, match="train.stage 'qformer'"):
        load_config(None, ["connector.type=xattn", "train.stage=qformer"])


@pytest.mark.slow
def test_an_xattn_chain_answers_questions_beside_its_controls_and_exports(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from vlmlab.analysis.chain import load_chain, run_chain
    from vlmlab.analysis.export import export_run
    from vlmlab.run import load_run
    from vlmlab.run.release import verify_release

    xattn = {"data.synthetic_max_objects": 2, "connector.type": "xattn", "connector.xattn_every": 1}
    chain = tiny_chain_file(tmp_path, tiny_clip_dir, tiny_gpt2_dir, xattn, steps=3, evaluate=["vqa", "pope"])
    summary = run_chain(load_chain(chain), tmp_path / "out")
    for task in ("vqa", "pope"):
        assert {"model", "swapped image", "no image", "blind model", "prior"} <= set(summary["tables"][task])
    run = tmp_path / "out" / "vqa"
    release = export_run(run, tmp_path / "release", dtype="float32")
    verify_release(release)
    original, released = load_run(run), load_run(release)
    assert released.cfg.connector.type == "xattn"
    messages = [{"role": "user", "content": "<image>\nIs there a circle in the image?"}]
    image = sorted((tmp_path / "world" / "images").glob("*.png"))[0]
    assert original.continuation_logprobs(image, messages, ["Yes", "No"]) == released.continuation_logprobs(
        image, messages, ["Yes", "No"]
    )


def test_the_gates_get_their_own_learning_rate_and_no_weight_decay(xattn_vlm):
    from vlmlab.train.loop import build_optimizer

    optimizer = build_optimizer(xattn_vlm, xattn_vlm.cfg)
    gates = {id(b.attn_gate) for b in xattn_vlm.connector.blocks} | {id(b.ffn_gate) for b in xattn_vlm.connector.blocks}
    (group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & gates]
    assert {id(p) for p in group["params"]} == gates
    assert group["lr"] == xattn_vlm.cfg.train.gate_lr == 0.01 and group["weight_decay"] == 0.0
    rest = [p for g in optimizer.param_groups if g is not group for p in g["params"]]
    assert {id(p) for p in xattn_vlm.connector.parameters()} - gates <= {id(p) for p in rest}  # at train.lr
