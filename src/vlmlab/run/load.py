"""Opening a finished run: its recorded config rebuilds the model, its verified checkpoint fills the trained part."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import load_config
from .record import CONFIG_FILE

if TYPE_CHECKING:
    from ..model.vlm import VLM


def load_run(run_dir: str | Path) -> VLM:
    """A trained run directory -> VLM ready to caption (frozen parts rebuilt, trained weights loaded)."""
    # imported here, so that `import vlmlab.run` (the lock, for one) does not load torch and the model code
    from ..model.vlm import build_vlm
    from .checkpoint import load_trainable

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE)
    model = build_vlm(cfg)
    load_trainable(run_dir, model)
    return model.eval()
