"""Opening a finished run: its recorded config rebuilds the model, its verified checkpoint fills the trained part."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..model.vlm import VLM, build_vlm
from .checkpoint import load_trainable
from .record import CONFIG_FILE


def load_run(run_dir: str | Path) -> VLM:
    """A trained run directory -> VLM ready to caption (frozen parts rebuilt, trained weights loaded)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE)
    model = build_vlm(cfg)
    load_trainable(run_dir, model)
    return model.eval()
