"""Opening a finished run or a released model: its recorded config rebuilds the model, its verified weights fill
the trained part."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import load_config
from .record import CONFIG_FILE
from .release import is_release, resolve_model, verify_release

if TYPE_CHECKING:
    from ..model.vlm import VLM


def load_run(run_dir: str | Path) -> VLM:
    """A trained run directory, a release folder, `zoo:NAME` or `hf:ORG/NAME` -> VLM ready to caption (frozen
    parts rebuilt from the config, trained weights verified and loaded)."""
    # imported here, so that `import vlmlab.run` (the lock, for one) does not load torch and the model code
    from ..model.vlm import build_vlm
    from .checkpoint import load_trainable, load_trainable_from

    run_dir = resolve_model(run_dir)
    release = is_release(run_dir)
    if release:
        verify_release(run_dir)  # before anything is built from its config
    cfg = load_config(run_dir / CONFIG_FILE)
    model = build_vlm(cfg)
    if release:
        load_trainable_from(run_dir, model)  # float16 / bfloat16 weights, copied into the float32 model
    else:
        load_trainable(run_dir, model)
    return model.eval()
