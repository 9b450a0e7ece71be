"""Plain dataclass configs: defaults here, a YAML file on top, `--set key=value` overrides on top of that.

Unknown keys and wrong types fail at load time, before any model is built, naming the key. This module is the
bottom of the package and imports nothing of it: the names a config value may take (connector types, stages,
dataset formats) are defined here, and the modules that act on them import them from here. It also holds the one
way the package writes a file (write_atomic, append_whole), so that every layer, this one included, writes so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config that cannot work: names the key and what is allowed."""


# ---------------------------------------------------------------------------------------------- allowed values

SMOLLM2_NAME = "smollm2-135m-instruct"  # the embedded default LM (model/language_model.py converts its GGUF)
CONNECTOR_TYPES = ("qformer", "meanpool", "linear", "mlp", "xattn", "none")  # built by model/connector.py
DATASET_FORMATS = ("coco", "karpathy", "flickr8k", "synthetic")  # read by data/formats.py
# vision.name: one of these (model/efficientnet_lite.py LITE_VARIANTS), or "hf:<hub name or local dir>"
LITE_ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


@dataclass(frozen=True)
class Stage:
    data: str  # "captions" (data.datasets), or a file name pattern inside data.tasks, {split} = train | val
    what: str  # one line for people


# train.stage: what a run trains on (train/stages.py chains stages; train/loop.py and train/stage1_loop.py train)
STAGES = {
    "caption": Stage("captions", "image-caption pairs from data.datasets (alignment; BLIP-2 stage 2 / LLaVA stage 1)"),
    "instruct": Stage("conversations_{split}.json", "multi-turn conversations from data.tasks (LLaVA stage 2)"),
    "vqa": Stage("vqa_conversations_{split}.json", "single-turn short answers from data.tasks (VQA fine-tuning)"),
    # the Q-Former alone with ITC/ITM/ITG (train/stage1_loop.py); its run is a caption run's init_from
    "qformer": Stage("captions", "image-caption pairs, Q-Former alone with ITC/ITM/ITG (BLIP-2 stage 1)"),
}


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """'FORMAT:PATH' -> (FORMAT, the paths that must exist): Karpathy's 'JSON@IMAGE_ROOT' names two, a synthetic
    world none (it is made on first use). A malformed spec raises ValueError."""
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in DATASET_FORMATS or not path:
        raise ValueError(
            f"bad dataset spec {spec!r}: expected FORMAT:PATH with FORMAT one of {', '.join(DATASET_FORMATS)}"
        )
    if fmt == "synthetic":
        return fmt, []
    if fmt == "karpathy":
        return fmt, [p for p in split_at(path) if p]
    return fmt, [path]


def split_at(path: str) -> tuple[str, str | None]:
    """'JSON@IMAGE_ROOT' -> (JSON, IMAGE_ROOT); a path that exists as written is taken whole."""
    if "@" in path and not Path(path).exists():
        json_path, root = path.rsplit("@", 1)
        return json_path, root
    return path, None


@dataclass
class VisionConfig:
    name: str = "efficientnet-lite0"  # or "efficientnet-lite1/2", "hf:<hub name or local dir>" (CLIP/SigLIP)
    image_size: int | None = None  # None: the encoder's native size
    unfreeze_last: int = 0  # train the encoder's last N blocks too (LLaVA "pattern B"); bypasses the feature cache


@dataclass
class ConnectorConfig:
    type: str = "qformer"  # meanpool | linear | mlp (LLaVA) | xattn (Flamingo-style) | none (the blind baseline)
    num_queries: int = 16
    depth: int = 2
    width: int = 256
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.0
    freeze: bool = False  # keep the connector at its initialisation (the "frozen Q-Former" control)
    merge: int = 1  # linear / mlp: k x k blocks of the image-token grid make one visual token (k^2 fewer)
    xattn_every: int = 6  # xattn: a gated cross-attention block before decoder layers 0, k, 2k, ... (model/xattn.py)


@dataclass
class LoRAConfig:
    enabled: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: per-architecture default (language_model.py)


@dataclass
class LMConfig:
    name: str = SMOLLM2_NAME  # or a transformers hub name / local dir
    chat_format: bool = False  # wrap the prompt in the model's chat template
    end_token: str | None = None  # None: <|im_end|> with chat format, else <|endoftext|> (see language_model.py)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=lambda: ["synthetic:data/synthetic"])  # FORMAT:PATH specs
    prompt: str = "A picture of"
    max_caption_tokens: int = 32
    tasks: str | None = None  # a `vlmlab make-tasks` folder: the conversations of the instruct / vqa stages
    conversation_format: str = "auto"  # chatml | plain (LLaVA stage 1) | gpt2; auto: chatml if the tokenizer has it
    max_conversation_tokens: int = 128  # text tokens of one conversation (an answer cut short loses its end token)
    split_seed: int = 0  # deterministic train/val/test split where a format has none
    max_train_images: int | None = None  # take a deterministic subset (quick runs)
    max_eval_images: int | None = None
    synthetic_images: int = 600  # size of the synthetic world when a spec asks for it
    synthetic_max_objects: int = 1  # the demo's world: one shape per picture; up to 9 (one per grid cell)
    synthetic_occlusion: bool = False  # shapes larger than their grid cell, so neighbours cover part of each other
    batch_by_length: bool = False  # batches of similar caption length (data/batching.py): less padding per step
    retrieved_captions: int = 0  # SmallCap: captions of the k nearest training images in the prompt (0: off)


@dataclass
class TrainConfig:
    stage: str = "caption"  # caption | instruct | vqa | qformer (STAGES above: what trains, on which data)
    init_from: str | None = None  # a finished run whose trained weights start this one (chaining stages)
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 150  # the embedded demo: about 7 minutes on 2 CPU cores
    lr: float = 3e-4  # connector (1e-3 made it drift into a loud, image-independent soft prompt)
    lora_lr: float = 5e-4
    gate_lr: float = 1e-2  # connector.type xattn: its tanh gates, which start at 0 (train/loop.py build_optimizer)
    vision_lr: float = 1e-5  # the encoder's unfrozen blocks (vision.unfreeze_last), pretrained: small steps
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    log_every: int = 10
    mixed_precision: str = "auto"  # bf16 where native, else float32 (train/precision.py) | "no" | "bf16" | "fp16"
    feature_batch_size: int = 32
    on_nonfinite: str = "stop"  # "stop": a NaN/inf loss or gradient ends the run | "skip": drop that batch's update


@dataclass
class QFormerStage1Config:
    """BLIP-2 stage 1 (train.stage = qformer; model/qformer_stage1.py): which losses train the Q-Former."""

    itc: bool = True  # image-text contrastive (max over queries, learned temperature)
    itm: bool = True  # image-text matching with hard negatives sampled from the ITC similarities
    itg: bool = True  # image-grounded caption generation (causal text over the queries)
    max_text_tokens: int = 32  # caption tokens (with the end token) the text side reads


@dataclass
class GenerateConfig:
    max_new_tokens: int = 30
    num_beams: int = 1
    repetition_penalty: float = 1.0


@dataclass
class Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    qformer_stage1: QFormerStage1Config = field(default_factory=QFormerStage1Config)


def _check_value(key: str, value, annotation):
    """Accepts `value` for a field annotated `annotation`, converting int->float; raises naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str | int | float):  # a single item where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation in (str, float) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _merge(obj, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; allowed here: {sorted(fields)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}")
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _check_value(key, value, hints[name]))


def apply_settings(cfg: Config, settings: dict) -> Config:
    """{'connector.type': 'mlp', ...} on top of cfg (in place), checked like a YAML file; returns cfg."""
    if not isinstance(settings, dict):
        raise ConfigError(f"settings must map dotted keys to values, got {settings!r}")
    for key, value in settings.items():
        if isinstance(value, dict):  # no setting holds a mapping: a section written as nested YAML
            raise ConfigError(f"{key}: write one dotted key per setting ({key}.NAME: VALUE), not a nested mapping")
        _merge(cfg, _nest(str(key), value))
    validate(cfg)
    return cfg


def _nest(dotted_key: str, value) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}"""
    for part in reversed(dotted_key.strip().split(".")):
        value = {part: value}
    return value


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if "#" in raw and "#" not in str(value):  # YAML took ` #...` for a comment: on a command line it is text
        value = raw.strip()
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans: `mixed_precision=no` means the word
    return _nest(key, value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    if path is not None:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config file must be a mapping")
        _merge(cfg, tree)
    for text in overrides:
        _merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


_AT_LEAST_ONE = (
    "connector.num_queries connector.depth connector.width connector.heads connector.ffn_mult connector.merge "
    "connector.xattn_every "
    "data.max_caption_tokens data.max_conversation_tokens data.max_train_images data.max_eval_images "
    "train.batch_size train.grad_accum train.max_steps train.eval_every train.eval_batches train.save_every "
    "train.log_every train.feature_batch_size generate.max_new_tokens generate.num_beams"
).split()
# key -> allowed range as (low, high); a bound in a list is exclusive: [0.0] means "> 0.0"
_RANGES = {
    **{key: (1, None) for key in _AT_LEAST_ONE},
    "vision.image_size": (16, None),
    "data.synthetic_images": (10, None),
    "data.synthetic_max_objects": (1, 9),
    "connector.dropout": (0.0, [1.0]),
    "lm.lora.dropout": (0.0, [1.0]),
    "lm.lora.alpha": ([0.0], None),
    "train.lr": ([0.0], None),
    "train.lora_lr": ([0.0], None),
    "train.gate_lr": ([0.0], None),
    "generate.repetition_penalty": ([0.0], None),
    "train.weight_decay": (0.0, None),
    "train.grad_clip": (0.0, None),
    "train.warmup_steps": (0, None),
    "vision.unfreeze_last": (0, None),
    "train.vision_lr": ([0.0], None),
    "train.seed": (0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
    "data.split_seed": (0, None),
    "data.retrieved_captions": (0, None),
}


def _get(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_range(key: str, value, low, high) -> None:
    problems = []
    if isinstance(low, list):
        ok_low, text_low = value > low[0], f"> {low[0]}"
    else:
        ok_low, text_low = value >= low, f">= {low}"
    problems.append((ok_low, text_low))
    if high is not None:
        ok_high, text_high = (
            (value < high[0], f"< {high[0]}") if isinstance(high, list) else (value <= high, f"<= {high}")
        )
        problems.append((ok_high, text_high))
    if not all(ok for ok, _ in problems):
        raise ConfigError(f"{key} = {value!r} is impossible; allowed: {' and '.join(t for _, t in problems)}")


def validate(cfg: Config) -> None:
    """Values that type-check but cannot work."""
    c, t = cfg.connector, cfg.train
    _check_finite(cfg)
    _check_output_dir(cfg)
    cfg.data.datasets = [expand_data_root(spec, f"data.datasets[{i}]") for i, spec in enumerate(cfg.data.datasets)]
    for key, (low, high) in _RANGES.items():
        value = _get(cfg, key)
        if value is not None:
            _check_range(key, value, low, high)
    name = cfg.vision.name
    if name not in LITE_ENCODERS and not (name.startswith("hf:") and name[3:].strip()):
        raise ConfigError(
            f"vision.name {name!r} is unknown; allowed: {list(LITE_ENCODERS)} or 'hf:<hub name or folder>'"
        )
    if c.type not in CONNECTOR_TYPES:
        raise ConfigError(f"connector.type {c.type!r} is unknown; allowed: {list(CONNECTOR_TYPES)}")
    if c.merge > 1 and c.type not in ("linear", "mlp", "none"):  # none: a blind twin of a merged run
        raise ConfigError(f"connector.merge {c.merge} regroups a per-token projector's grid: connector.type is "
                          f"{c.type!r}, not linear or mlp")  # fmt: skip
    if c.width % c.heads != 0:
        raise ConfigError(f"connector.width ({c.width}) must be divisible by connector.heads ({c.heads})")
    if cfg.lm.lora.enabled and cfg.lm.lora.r < 1:
        raise ConfigError("lm.lora.r must be >= 1 when lm.lora.enabled is true")
    if t.stage not in STAGES:
        raise ConfigError(f"train.stage {t.stage!r} is unknown; allowed: {list(STAGES)}")
    if STAGES[t.stage].data != "captions" and not cfg.data.tasks:
        raise ConfigError(
            f"train.stage {t.stage!r} trains on conversations: set data.tasks to a `vlmlab make-tasks` folder"
        )
    if t.stage == "qformer":  # BLIP-2 stage 1
        if c.type != "qformer":
            raise ConfigError(f"train.stage 'qformer' pretrains a Q-Former: connector.type is {c.type!r}")
        q = cfg.qformer_stage1
        if not (q.itc or q.itm or q.itg):
            raise ConfigError("qformer_stage1: itc, itm and itg are all false: nothing to train")
        if q.max_text_tokens < 2:
            raise ConfigError(f"qformer_stage1.max_text_tokens must be >= 2, got {q.max_text_tokens}")
    if cfg.data.retrieved_captions and t.stage != "caption":
        raise ConfigError(
            f"data.retrieved_captions (SmallCap prompts) works in the caption stage; train.stage is {t.stage!r}"
        )
    if cfg.data.retrieved_captions and cfg.vision.unfreeze_last:
        raise ConfigError("data.retrieved_captions retrieves with cached features: vision.unfreeze_last must be 0")
    if cfg.data.conversation_format not in ("auto", "chatml", "plain", "gpt2"):
        raise ConfigError(
            f"data.conversation_format {cfg.data.conversation_format!r} is unknown; allowed: auto, chatml, plain, gpt2"
        )
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite {t.on_nonfinite!r} is unknown; allowed: 'stop', 'skip'")
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ConfigError("train.mixed_precision must be one of 'auto', 'no', 'bf16', 'fp16'")
    if t.stage == "qformer" and t.mixed_precision in ("bf16", "fp16"):
        raise ConfigError(
            f"train.stage 'qformer' (BLIP-2 stage 1) trains in float32: train.mixed_precision {t.mixed_precision!r} "
            "would be ignored; use 'auto' or 'no'"
        )
    if not cfg.data.datasets:
        raise ConfigError("data.datasets must name at least one FORMAT:PATH spec")


def _check_finite(obj, prefix: str = "") -> None:
    """inf and nan type-check as floats (`train.lr=inf`) but no setting of this project means them."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} = {value!r} is impossible; allowed: a finite number")


def _check_output_dir(cfg: Config) -> None:
    """An empty output_dir would write the run into the current folder; `~` is the home folder, as in a shell."""
    out = cfg.train.output_dir
    if not out.strip():
        raise ConfigError("train.output_dir is empty; name the folder the run is written to")
    if out.startswith("~"):
        expanded = os.path.expanduser(out)
        if expanded.startswith("~"):
            raise ConfigError(f"train.output_dir = {out!r}: cannot expand {out.split('/')[0]!r} (no such user)")
        cfg.train.output_dir = expanded


DATA_ROOT_VARIABLE = "VLMLAB_DATA"  # written $VLMLAB_DATA in a data spec
DEFAULT_DATA_ROOT = "../shared/data"  # relative to the working directory, where vlmlab runs (the repo root)


def expand_data_root(text: str, key: str) -> str:
    """'coco:$VLMLAB_DATA/coco2017-val' -> 'coco:ROOT/coco2017-val', ROOT being $VLMLAB_DATA, else DEFAULT_DATA_ROOT.

    Recipes name the shared data through this one root, so a machine that keeps it elsewhere sets one variable
    instead of editing every file. A root that is no folder fails here, naming it, before anything loads."""
    token = "$" + DATA_ROOT_VARIABLE
    if token not in text:
        return text
    root = os.environ.get(DATA_ROOT_VARIABLE) or DEFAULT_DATA_ROOT
    if not Path(root).expanduser().is_dir():
        raise ConfigError(
            f"{key} = {text!r}: the data root {root!r} is no folder; set {DATA_ROOT_VARIABLE} to the folder that holds "
            f"the datasets (default {DEFAULT_DATA_ROOT}, relative to the working directory)"
        )
    return text.replace(token, root.rstrip("/") or "/")


def check_model_sources(cfg: Config) -> None:
    """A model name that is no embedded model, no local folder and not in the Hugging Face cache fails here, at
    once: from_pretrained would first retry the hub for about a minute, then fail with an unclear error.

    Called before training loads a model (not at config load, which must stay offline and quick).
    """
    names = []
    if cfg.lm.name != SMOLLM2_NAME:
        names.append(("lm.name", cfg.lm.name))
    if cfg.vision.name.startswith("hf:"):
        names.append(("vision.name", cfg.vision.name[3:]))
    for key, name in names:
        _check_model_source(key, name)


def _check_model_source(key: str, name: str) -> None:
    import huggingface_hub
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    if Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError(f"{key} = {name!r}: no such directory")
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # downloaded before
    except HFValidationError as e:
        raise ConfigError(f"{key} = {name!r}: neither a local directory nor a valid hub name ({e})") from None
    where = f"not a local directory and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key} = {name!r}: {where}, and HF_HUB_OFFLINE is set")
    try:
        huggingface_hub.model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(f"{key} = {name!r}: {where}, and the hub has no such model") from None
    except Exception as e:  # noqa: BLE001 - no network, proxy, DNS: one clear line instead of a minute of retries
        raise ConfigError(f"{key} = {name!r}: {where}, and the hub cannot be reached ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------- writing files


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Writes a file whole or not at all: a full disk, a file-size limit or a crash leaves the old file (or none).

    content is the text or bytes, or a function that writes the file at the path it is given (savefig, torch.save):
    it writes a temporary file in the same folder, which is flushed to disk and renamed over `path` (a rename
    within a folder is atomic); on any error the temporary file is removed and `path` is as it was.
    """
    path = Path(path)
    # hidden, and ending as `path` does: writers that pick the format by the suffix (savefig) still see it
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        if callable(content):
            content(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            data = content.encode() if isinstance(content, str) else content
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # a rewritten file keeps its permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def append_whole(path: str | Path, text: str) -> None:
    """Appends text to a log (metrics.jsonl) whole or not at all: a failed append cuts the file back to where it
    ended, so the lines before stay as they were and no torn line follows them."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(text.encode())
        try:
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.ftruncate(fd, end)  # shrinking a file: allowed under a file-size limit and on a full disk
            raise
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """The rename itself reaches the disk (POSIX); skipped where a folder cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def check_data_paths(cfg: Config) -> None:
    """Every data spec names a known format and an existing path (synthetic worlds are made on first use).

    Called before training loads any model; not at config load, so a run can still be evaluated or used to
    caption on a machine that lacks its training data.
    """
    stage = STAGES.get(cfg.train.stage)
    if stage is not None and stage.data != "captions":
        for split in ("train", "val"):
            path = Path(cfg.data.tasks).expanduser() / stage.data.format(split=split)
            if not path.is_file():
                raise ConfigError(f"data.tasks = {cfg.data.tasks!r}: {path} does not exist (run `vlmlab make-tasks`)")
    if cfg.train.init_from is not None and not (Path(cfg.train.init_from).expanduser() / "config.yaml").is_file():
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r}: not a finished run (no config.yaml)")
    check_datasets(cfg)


def check_datasets(cfg: Config) -> None:
    """Every data.datasets spec names a known format and an existing path, and no dataset is listed twice."""
    seen: dict[tuple, str] = {}
    for i, spec in enumerate(cfg.data.datasets):
        key = f"data.datasets[{i}]"
        try:
            fmt, required = parse_spec(spec)
        except ValueError:
            raise ConfigError(
                f"{key} = {spec!r}: expected FORMAT:PATH with FORMAT one of {list(DATASET_FORMATS)}"
            ) from None
        for part in required:
            if not Path(part).expanduser().exists():
                raise ConfigError(f"{key} = {spec!r}: {part!r} does not exist")
        # `coco:X` and `coco:X/` (or a symlink to X) are one dataset: listed twice, every sample would count twice
        same = (fmt, os.path.realpath(os.path.expanduser(spec.partition(":")[2])))
        if same in seen:
            raise ConfigError(f"{key} = {spec!r} names the same data as {seen[same]}; list each dataset once")
        seen[same] = f"{key} = {spec!r}"
