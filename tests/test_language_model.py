"""The frozen LLM: loading by name, the cached GGUF conversion, LoRA defaults per architecture."""

import pytest
import torch

from vlmlab.model import language_model as lmmod
from vlmlab.model.language_model import add_lora, embedding_rms, load_language_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, gpt2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(gpt2_tokenizer),
    )
    LlamaForCausalLM(config).save_pretrained(out)
    gpt2_tokenizer.save_pretrained(out)
    return out


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_loaded_model_is_frozen(tiny_gpt2_dir):
    model, tokenizer = load_language_model(str(tiny_gpt2_dir))
    assert not _trainable(model) and not model.training
    assert tokenizer.eos_token_id == 50256
    assert embedding_rms(model) > 0


@pytest.mark.parametrize("fixture, expected", [("tiny_gpt2_dir", "c_attn"), ("tiny_llama_dir", ("q_proj", "v_proj"))])
def test_lora_defaults_per_architecture(request, fixture, expected):
    model, _ = load_language_model(str(request.getfixturevalue(fixture)))
    lora = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=None)
    trainable = _trainable(lora)
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert targets == ({expected} if isinstance(expected, str) else set(expected))
    ids = torch.tensor([[1, 2, 3]])
    before = lora(ids).logits
    assert torch.allclose(before, model(ids).logits)  # LoRA's B starts at zero: the LM is unchanged at first


def test_lora_errors(tiny_gpt2_dir):
    model, _ = load_language_model(str(tiny_gpt2_dir))
    with pytest.raises(ValueError, match="do not exist"):
        add_lora(model, 4, 8, 0.0, ["q_proj"])
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no default LoRA targets"):
        add_lora(model, 4, 8, 0.0, None)


@pytest.mark.slow
def test_smollm2_is_converted_once_and_then_reloaded_from_cache(monkeypatch):
    path = lmmod.smollm2_dir()  # converts on the first call on a machine, then returns the cached folder
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()

    def no_gguf():
        raise AssertionError("the GGUF was read again although a converted copy is cached")

    monkeypatch.setattr(lmmod, "_smollm2_gguf_dir", no_gguf)
    model, tokenizer = load_language_model(lmmod.SMOLLM2_NAME)
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    # the dequantised model is a working LM: the instruct model continues a plain sentence sensibly
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
