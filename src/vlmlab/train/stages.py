"""Stages: one `train.stage` key decides what a run trains on, and `train.init_from` chains runs.

LLaVA trains in stages (projector only on captions, then projector + LLM on instructions) and so does
BLIP-2; here a stage is a row of config.STAGES, and a chain is runs whose `init_from` is the previous run.
What trains inside a stage is still set by the ordinary keys (`connector.freeze`, `lm.lora.enabled`),
so a recipe says it in the open; the shipped chains (recipes/chain-*.yaml) follow LLaVA's split.
"""

from __future__ import annotations

from pathlib import Path


def _group(names: list[str]) -> str:
    """'connector.layers.0.x', 'connector.layers.1.y' -> 'connector.layers.*' (2): a short report."""
    groups: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(groups.items()))


def resampler_name(name: str, target: dict) -> str:
    """A Q-Former's `connector.K` is `connector.resampler.K` in an xattn connector (model/xattn.py), whose
    cross-attention blocks read that Q-Former: a stage-1 run or a prefix Q-Former run starts its resampler."""
    if name.startswith("connector.") and name not in target:
        inside = "connector.resampler." + name[len("connector.") :]
        if inside in target:
            return inside
    return name


def initialise_from(model, run_dir: str | Path) -> dict:
    """Loads every tensor of a finished run (or an exported model: a release folder, zoo:NAME, hf:ORG/NAME) whose
    name and shape match this model's trainable state, in this model's dtype.

    The source checkpoint (or release manifest) is verified first (run/checkpoint.py, run/release.py). A release
    in float16 / bfloat16 holds the run's weights rounded to that type: a stage started from it starts from
    those, not from the float32 run (export --dtype float32 to continue exactly). Tensors the new model does not use (e.g. a
    stage-1 text side) and tensors of the new model the source lacks (e.g. LoRA added in a later stage,
    left at their initialisation) are reported; a same-named tensor of another shape is an error. An xattn model
    takes a Q-Former's tensors into its resampler (resampler_name).
    """
    import torch
    from safetensors.torch import load_file

    from ..run.checkpoint import TRAINABLE_FILE, find_checkpoint
    from ..run.release import RELEASE_WEIGHTS, is_release, resolve_model, verify_release

    run_dir = resolve_model(run_dir)
    if is_release(run_dir):
        verify_release(run_dir)
        weights = run_dir / RELEASE_WEIGHTS
    else:
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"train.init_from = {run_dir}: no checkpoint in it")
        weights = checkpoint / TRAINABLE_FILE
    target = model.trainable_state_dict()
    source = {resampler_name(k, target): v for k, v in load_file(weights).items()}
    source = {k: v.to(target[k].dtype) if k in target else v for k, v in source.items()}
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    if wrong:
        raise ValueError(f"train.init_from = {run_dir}: tensors of another shape: {wrong[:5]}")
    loaded = {k: v for k, v in source.items() if k in target}
    state = {**target, **loaded}
    model.load_trainable_state_dict(state)
    with torch.no_grad():  # load_trainable_state_dict copies LoRA / encoder blocks; confirm nothing was missed
        now = model.trainable_state_dict()
        assert all(torch.equal(now[k], v) for k, v in loaded.items())
    report = {
        "loaded": sorted(loaded),
        "unused": sorted(set(source) - set(target)),
        "not_in_source": sorted(set(target) - set(source)),
    }
    print(f"init_from {run_dir}: loaded {len(loaded)} tensors ({_group(report['loaded'])})")
    if report["unused"]:
        print(f"  not used by this model: {_group(report['unused'])}")
    if report["not_in_source"]:
        print(f"  not in the source, left at their initialisation: {_group(report['not_in_source'])}")
    return report
