"""`vlmlab chain CHAIN.yaml`: train a model in stages (caption -> instruct -> vqa), each stage starting from
the previous run (`train.init_from`), then score it on VQA / POPE / multiple choice beside its controls,
and measure what stage 2 did to stage 1's captions.

A chain file:

    name: chain-synthetic
    from: null                      # or another chain (a recipe's name or a file) that has no `from` itself:
                                    # its keys, then this file's, each replaced whole
    base: null                      # a config (a recipe's name, e.g. photo-captions, or a file), or null for the
                                    # embedded defaults
    overrides: {train.max_steps: 150}   # dotted.key: value settings on top of the base, as in `stages`
    tasks: data/tasks/synthetic     # `vlmlab make-tasks` output; written from the base data if absent
    stages:                         # in order; each a few dotted.key: value settings on top of the base
      caption: {}
      instruct: {lm.lora.enabled: true}
      vqa: {train.max_steps: 100}
    blind: true                     # also train the same chain with connector.type: none (the blind control)
    blind_from: null                # or a stage: the blind arm starts from the model's run of it (its LoRA, no
                                    # connector) and trains only the stages after it, as it does after `pretrained`
    evaluate: [vqa, pope, mmbench]
    objects_from_captions: false    # make-tasks --objects-from-captions, when the chain writes `tasks`
    objects_min_captions: 2         # make-tasks --objects-min-captions: how many captions must name an object
    counts_from_captions: false     # make-tasks --counts-from-captions: "How many" where captions agree ("two dogs")
    presence_from_boxes: false      # make-tasks --presence-from-boxes: stage-3 presence questions from boxes only
    vqa_turns: 1                    # make-tasks --vqa-turns: stage-3 questions asked K to a conversation
    eval_tasks: null                # another make-tasks folder whose test files score the chain (default: tasks);
                                    # questions about photos the run trained on are then left out, and counted
    pretrained: null                # or a finished caption run: the first stage starts from it (prismatic's
                                    # pretrained_checkpoint), e.g. the photo recipe's run before instruct -> vqa
    questions:                      # real question sets, scored too (photos the run trained on left out)
      - {task: vqa, file: $VLMLAB_DATA/questions/aokvqa/aokvqa_v1p0_val.json, images: $VLMLAB_DATA/coco2017-val/val2017}
    sugarcrepe: null                # or the SugarCrepe folder ($VLMLAB_DATA/questions/sugar-crepe): each caption
                                    # stage's caption likelihood on its hard negatives, beside its swapped-image and
                                    # no-image rows (and the blind arm's, where the chain trains a blind caption
                                    # stage), photos the run trained on left out

Runs go to OUT/<stage>/ and OUT/blind/<stage>/; tables to OUT/chain.md. With `pretrained`, the blind chain
starts from it too: its LoRA is loaded and its connector left out (the blind model has none), so the two arms
differ only in whether stages 2-3 see the image.

Run again (after a crash, a kill, or to score anew), a chain reuses each stage whose run is finished and resumes
an unfinished one exactly, so it ends with the weights of an uninterrupted chain; a stage folder holding another
run is refused before anything trains (plan_stages says which is which).

A chain longer than one sitting continues on another machine from what was exported: `vlmlab chain NAME --use
caption=zoo:photo-captioner` (or `blind/instruct=FOLDER`, any release `vlmlab export` wrote) takes that stage as
finished, once the release's config is checked to be the stage's, and trains only the stages after it. A float16
release holds the weights rounded to float16, so the stages after it start from those (`export --dtype float32`
continues exactly).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import STAGES, Config, ConfigError, apply_settings, expand_data_root, load_config, write_atomic
from ..eval.question_scores import TASKS
from .recipes import find_recipe

CHAIN_KEYS = {"name", "base", "overrides", "tasks", "eval_tasks", "stages", "blind", "evaluate", "blind_from"}
CHAIN_KEYS |= {"forgetting_split", "pretrained", "objects_from_captions", "objects_min_captions", "questions"}
CHAIN_KEYS |= {"sugarcrepe", "counts_from_captions"}
CHAIN_KEYS |= {"presence_from_boxes", "vqa_turns"}


@dataclass
class Chain:
    path: Path
    name: str
    stages: dict[str, dict]
    base: str | None = None
    overrides: dict = field(default_factory=dict)
    tasks: str | None = None
    blind: bool = True
    evaluate: list[str] = field(default_factory=lambda: ["vqa", "pope", "mmbench"])
    forgetting_split: str | None = "test"  # null: no caption scoring after each stage (it can cost most of a chain)
    pretrained: str | None = None
    eval_tasks: str | None = None
    objects_from_captions: bool = False  # when the chain writes `tasks` (make-tasks --objects-from-captions)
    objects_min_captions: int = 2  # make-tasks --objects-min-captions
    presence_from_boxes: bool = False  # make-tasks --presence-from-boxes
    vqa_turns: int = 1  # make-tasks --vqa-turns
    counts_from_captions: bool = False  # make-tasks --counts-from-captions
    questions: list[dict] = field(default_factory=list)  # {task, file, images}: real sets, e.g. A-OKVQA
    sugarcrepe: str | None = None  # SugarCrepe's folder: caption stages scored on it (eval/caption_matching.py)
    blind_from: str | None = None  # a stage: the blind arm starts from the model's run of it

    def config(self, stage: str, out_dir: Path, previous: Path | None, blind: bool) -> Config:
        base = None if self.base is None else find_recipe(self.base, "config", self.path.parent)
        cfg = apply_settings(load_config(base), self.overrides or {})
        apply_settings(cfg, self.stages[stage] or {})
        settings = {
            "train.stage": stage,
            "train.output_dir": str(out_dir),
            "train.init_from": previous and str(previous),
        }
        if STAGES[stage].data != "captions":
            settings["data.tasks"] = self.tasks
        if blind:
            settings["connector.type"] = "none"
        return apply_settings(cfg, settings)


def load_chain(spec: str) -> Chain:
    """A chain file, or a shipped recipe's name (`photos-hour` -> recipes/chain-photos-hour.yaml)."""
    path = find_recipe(spec, "chain")
    tree = chain_tree(path)
    if not isinstance(tree.get("overrides") or {}, dict):
        raise ConfigError(f"{path}: overrides map dotted keys to values, e.g. {{train.max_steps: 600}}, as stages "
                          f"do; a `- key=value` list is the command line's --set form")  # fmt: skip
    stages = tree.get("stages")
    if not isinstance(stages, dict) or not stages or set(stages) - set(STAGES):
        raise ConfigError(f"{path}: 'stages' maps stage names ({list(STAGES)}) to settings, in order")
    chain = Chain(path=path, **{"name": path.stem, **tree})
    if chain.tasks is not None and not Path(chain.tasks).is_absolute():
        chain.tasks = str(Path(chain.tasks))
    if any(STAGES[s].data != "captions" for s in stages) and not chain.tasks:
        raise ConfigError(f"{path}: stages that train on conversations need 'tasks' (a make-tasks folder)")
    if chain.pretrained is not None and STAGES[next(iter(stages))].data == "captions":
        raise ConfigError(
            f"{path}: 'pretrained' is a finished caption run; the stages after it start at instruct or vqa"
        )
    if not isinstance(chain.objects_min_captions, int) or chain.objects_min_captions < 1:
        raise ConfigError(f"{path}: objects_min_captions is how many captions must name an object (1 or more)")
    for key in ("presence_from_boxes", "counts_from_captions"):
        if not isinstance(getattr(chain, key), bool):
            raise ConfigError(f"{path}: {key} is true or false; got {getattr(chain, key)!r}")
    if chain.counts_from_captions and not chain.objects_from_captions:
        raise ConfigError(f"{path}: counts_from_captions reads the photos objects_from_captions grounds: set both")
    if isinstance(chain.vqa_turns, bool) or not isinstance(chain.vqa_turns, int) or chain.vqa_turns < 1:
        raise ConfigError(f"{path}: vqa_turns is how many questions a stage-3 conversation asks (1 or more)")
    if chain.blind_from is not None and chain.blind_from not in list(stages)[:-1]:
        raise ConfigError(
            f"{path}: blind_from is a stage of this chain with stages after it ({list(stages)[:-1]}), where the "
            f"blind arm starts from the model's run; got {chain.blind_from!r}"
        )
    for q in chain.questions:
        if not isinstance(q, dict) or set(q) - {"task", "file", "images"} or "file" not in q:
            raise ConfigError(f"{path}: each of 'questions' is {{task, file, images}}; got {q!r}")
        if q.get("task") not in TASKS:
            raise ConfigError(f"{path}: questions {q['file']}: task {q.get('task')!r} is not one of {list(TASKS)}")
        for key in ("file", "images"):
            if isinstance(q.get(key), str):
                q[key] = expand_data_root(q[key], f"{path}: questions {key}")
    if chain.sugarcrepe is not None:
        if not any(STAGES[s].data == "captions" for s in stages):
            raise ConfigError(
                f"{path}: sugarcrepe scores caption stages by their caption likelihood; this chain has none"
            )
        chain.sugarcrepe = expand_data_root(str(chain.sugarcrepe), f"{path}: sugarcrepe")
    previous = None if chain.pretrained is None else Path(chain.pretrained)
    for stage in stages:  # every stage's config is checked before anything trains
        chain.config(stage, Path("runs/check") / stage, previous, blind=False)
        previous = Path("runs/check") / stage
    return chain


def chain_tree(path: Path, child: Path | None = None) -> dict:
    """A chain file's keys on top of those of the chain it comes `from` (each key replaced whole, not merged).

    An experiment is often another with a few keys changed: `from` says which, so a chain file holds only what
    differs. One level only: a chain that a `from` names has no `from` of its own, so every key of a chain is
    in its file or in the one it names. The parent's `base` stays relative to the parent's file; its `name` is
    not inherited."""
    tree = _read_chain(path)
    parent_spec = tree.pop("from", None)
    if parent_spec is None:
        return tree
    if child is not None:
        raise ConfigError(f"{child}: from: {path} comes from {parent_spec!r} in turn; a chain comes from at most one "
                          f"other, which has no `from` itself (write {path.name}'s keys out in one file)")  # fmt: skip
    try:
        parent = find_recipe(str(parent_spec), "chain", path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: from: {e}") from None
    inherited = chain_tree(parent, child=path)
    inherited.pop("name", None)
    if inherited.get("base") is not None:
        inherited["base"] = str(find_recipe(inherited["base"], "config", parent.parent).resolve())
    return {**inherited, **tree}


def _read_chain(path: Path) -> dict:
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict) or set(tree) - CHAIN_KEYS - {"from"}:
        unknown = sorted(set(tree) - CHAIN_KEYS - {"from"}) if isinstance(tree, dict) else tree
        raise ConfigError(f"{path}: a chain is a mapping of {sorted(CHAIN_KEYS | {'from'})}; unknown: {unknown}")
    return tree


@dataclass
class PlannedStage:
    arm: str  # model | blind
    stage: str
    run_dir: Path
    cfg: Config
    finished: bool  # its checkpoint is at train.max_steps: reused as it is


def plan_stages(
    chain: Chain, out: Path, pretrained: Path | None, released: dict[str, Path] | None = None
) -> list[PlannedStage]:
    """Each stage of each arm, in training order, with whether its run is finished; refuses (ConfigError,
    CheckpointError) a stage folder the chain cannot continue, before anything trains.

    A stage is finished only when its run's own record says it reached its steps: its checkpoint (verified against
    its manifest) is at train.max_steps, in its config.yaml and in the chain. A stage killed before that resumes
    exactly, as `vlmlab train --resume` does: the same config, the same weights as an uninterrupted chain.
    Refused, naming the folder:
    - a stage folder whose recorded config differs from what the chain now asks on a key that changes the
      weights (those `--resume` refuses to change: record.resume_differences): it holds another run, which
      is never replaced or mixed; move it away, or give the chain another --out-dir. A changed train.max_steps
      extends (or ends) a stage's run, as `--resume --set train.max_steps` does; cadence keys (eval_every,
      save_every, ...) do not make a finished stage stale;
    - a checkpoint past the chain's train.max_steps (a run is not trained backwards);
    - a stage with a checkpoint after one that still has to train: its weights follow from a state of the
      stage before it that is gone (the chain once trained on an unfinished stage), so move it away.
    `released` maps stages ("caption", "blind/vqa") to exported models that stand in for their runs
    (released_stage says when one cannot)."""
    from ..run.checkpoint import checkpoint_step
    from ..run.record import recorded_config, resume_differences

    released = dict(released or {})
    planned: list[PlannedStage] = []
    for arm in ("model", "blind") if chain.blind else ("model",):
        previous, stages, upstream_trains = pretrained, list(chain.stages), False
        if arm == "blind" and chain.blind_from:  # the model's run of that stage (or its release), connector left out
            previous = next(p.run_dir for p in planned if p.stage == chain.blind_from)
            stages = stages[stages.index(chain.blind_from) + 1 :]
            model_stages = list(chain.stages)[: list(chain.stages).index(chain.blind_from) + 1]
            upstream_trains = any(not p.finished for p in planned if p.stage in model_stages)
        for stage in stages:
            run_dir = out / stage if arm == "model" else out / "blind" / stage
            cfg = chain.config(stage, run_dir, previous, blind=arm == "blind")
            key = stage if arm == "model" else f"blind/{stage}"
            if key in released:
                release = released_stage(key, released.pop(key), cfg, run_dir, upstream_trains)
                planned.append(PlannedStage(arm, stage, release, cfg, finished=True))
                previous = release
                continue
            step, recorded = checkpoint_step(run_dir) or 0, recorded_config(run_dir)
            if recorded is not None and _same_stage_before(recorded, cfg):  # a chain folder moved or copied
                recorded.train.init_from = cfg.train.init_from
            if recorded is None and step:
                raise ConfigError(f"{run_dir} has a checkpoint but no config.yaml: what it was trained with is "
                                  f"unknown; move it away, or give the chain another --out-dir")  # fmt: skip
            differences = resume_differences(recorded, cfg) if recorded is not None else []
            if differences:
                listed = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, a, b in differences)
                raise ConfigError(f"{run_dir} holds a run with other settings than the chain's {stage} stage "
                                  f"({listed}); move it away, or give the chain another --out-dir")  # fmt: skip
            if step > cfg.train.max_steps:
                raise ConfigError(f"{run_dir} is at step {step}, past the chain's train.max_steps = "
                                  f"{cfg.train.max_steps} for {stage}; a run is not trained backwards")  # fmt: skip
            if step and upstream_trains:
                raise ConfigError(f"{run_dir} holds a run (step {step}) trained from {previous}, which is not "
                                  f"finished and trains now: that run started from weights that are gone; "
                                  f"move it away, or give the chain another --out-dir")  # fmt: skip
            finished = recorded is not None and step == cfg.train.max_steps == recorded.train.max_steps
            planned.append(PlannedStage(arm, stage, run_dir, cfg, finished))
            upstream_trains |= not finished
            previous = run_dir
    if released:
        raise ConfigError(f"--use {', '.join(released)}: no such stage of this chain (its stages: "
                          f"{', '.join(p.stage if p.arm == 'model' else 'blind/' + p.stage for p in planned)})")  # fmt: skip
    return planned


def released_stage(key: str, model: Path, cfg: Config, run_dir: Path, upstream_trains: bool) -> Path:
    """An exported model standing in for a stage (--use KEY=MODEL): verified, trained with the stage's settings (data
    paths read against the data root each machine has), to the stage's steps, and after no stage that trains now."""
    from ..run.record import flat_differences, holds_a_run
    from ..run.release import is_release, verify_release
    from .arm_records import portable_config

    if not is_release(model):
        raise ConfigError(f"--use {key}={model}: not an exported model (vlmlab export writes one)")
    manifest = verify_release(model)
    recorded = load_config(model / "config.yaml")
    differences = flat_differences(
        portable_config(recorded, manifest.get("data_root")), portable_config(cfg)
    )  # fmt: skip
    if differences:
        listed = "; ".join(f"{k}: released {a!r}, now {b!r}" for k, a, b in differences)
        raise ConfigError(f"--use {key}={model}: trained with other settings than the chain's {key} stage ({listed})")
    if manifest["step"] != cfg.train.max_steps:
        raise ConfigError(f"--use {key}={model}: at step {manifest['step']}, the stage trains to {cfg.train.max_steps}")
    if upstream_trains:
        raise ConfigError(f"--use {key}={model}: a stage before it trains now, so the release did not start from it")
    if run_dir.is_dir() and holds_a_run(run_dir):
        raise ConfigError(f"--use {key}={model}: {run_dir} holds a run of that stage too; move one of them away")
    return model


def _same_stage_before(recorded: Config, cfg: Config) -> bool:
    """Whether a recorded init_from names the same run as the chain's, seen from each one's own folder: a chain
    folder may be moved or copied whole (as a run folder may), its stages then still start from each other."""
    a, b = recorded.train.init_from, cfg.train.init_from
    if a is None or b is None:
        return False
    return os.path.relpath(a, recorded.train.output_dir) == os.path.relpath(b, cfg.train.output_dir)


def run_chain(chain: Chain, out_dir: str | Path | None = None, use: dict[str, str] | None = None) -> dict:
    """Trains what is not finished (in OUT, or exported and named in `use`: {stage or blind/stage: model}), then
    scores the last stage beside its controls into OUT/chain.json and chain.md."""
    from ..data.make_tasks import make_tasks
    from ..eval.caption_matching import evaluate_caption_matching
    from ..eval.captioning import evaluate_run
    from ..eval.question_scores import TooFewQuestions, evaluate_task, task_test_files
    from ..run.checkpoint import find_checkpoint
    from ..run.release import is_release, resolve_model
    from ..train.loop import train

    out = Path(out_dir or Path("runs") / "chain" / chain.name)
    pretrained = None if chain.pretrained is None else resolve_model(chain.pretrained)
    if pretrained is not None and not is_release(pretrained) and find_checkpoint(pretrained) is None:
        raise ConfigError(f"pretrained: {pretrained} has no finished checkpoint; train it first (vlmlab train ...)")
    if chain.eval_tasks and not (Path(chain.eval_tasks) / "tasks.json").exists():
        raise ConfigError(f"eval_tasks: {chain.eval_tasks} is no make-tasks folder; write it first (vlmlab make-tasks)")
    missing = [q[k] for q in chain.questions for k in ("file", "images") if q.get(k) and not Path(q[k]).exists()]
    missing += [chain.sugarcrepe] if chain.sugarcrepe and not Path(chain.sugarcrepe).is_dir() else []
    if missing:
        raise ConfigError(f"questions / sugarcrepe: {missing} do not exist")
    released = {key: resolve_model(model) for key, model in (use or {}).items()}
    planned = plan_stages(chain, out, pretrained, released)  # every stage folder checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    first = next(iter(chain.stages))
    if chain.tasks and not (Path(chain.tasks) / "tasks.json").exists():
        started = time.time()
        cfg = chain.config(first, out / first, None, blind=False)
        make_tasks(cfg, chain.tasks, objects_from_captions=chain.objects_from_captions,
                   min_captions=chain.objects_min_captions, presence_from_boxes=chain.presence_from_boxes,
                   vqa_turns=chain.vqa_turns, counts_from_captions=chain.counts_from_captions)  # fmt: skip
        timings["make-tasks"] = time.time() - started
    runs: dict[str, dict[str, Path]] = {"model": {}, "blind": {}}
    for p in planned:  # in order: a stage trains only once the one it starts from is finished
        if not p.finished:
            started = time.time()
            train(p.cfg, resume=p.run_dir.exists())  # an unfinished stage resumes exactly from its checkpoint
            timings[f"train {p.arm} {p.stage}"] = time.time() - started
        runs[p.arm][p.stage] = p.run_dir
    last = list(chain.stages)[-1]
    tables, not_scored = {}, {}

    def score(label: str, task: str, **which) -> None:  # the last stage's model beside the blind one, timed
        started = time.time()
        try:
            tables[label] = evaluate_task(runs["model"][last], task, blind_run=runs["blind"].get(last), **which)
        finally:
            timings[f"eval {label}"] = time.time() - started

    for task in chain.evaluate:  # with eval_tasks: another folder's test files, photos the run trained on left out
        files = task_test_files(chain.eval_tasks, task) if chain.eval_tasks else None
        score(task, task, question_files=files, out_dir=out / "eval", unseen_only=bool(chain.eval_tasks))
    for q in chain.questions:  # real sets ask about photos a run may have trained on: those are left out
        label, where = f"{q['task']}: {Path(q['file']).name}", out / "eval" / Path(q["file"]).stem
        try:
            score(label, q["task"], question_files=[q["file"]], images=q.get("images"), out_dir=where, unseen_only=True)
        except TooFewQuestions as e:  # e.g. every photo of the set was in training: say so, keep the other tables
            not_scored[label] = str(e)
    matching = {}  # SugarCrepe: each caption stage by its own caption likelihood, beside its controls
    for stage in [s for s in runs["model"] if STAGES[s].data == "captions"] if chain.sugarcrepe else []:
        started = time.time()
        try:
            record = evaluate_caption_matching(runs["model"][stage], chain.sugarcrepe, out_dir=out / "eval" /
                                               f"sugarcrepe-{stage}", blind_run=runs["blind"].get(stage))  # fmt: skip
        except TooFewQuestions as e:  # every photo of it in training: say so, keep the other tables
            not_scored[f"SugarCrepe: the {stage} stage"] = str(e)
            continue
        matching[stage] = {k: v for k, v in record.items() if k != "logprobs"}
        timings[f"sugarcrepe {stage}"] = time.time() - started
    forgetting = {}
    scored = {"pretrained": pretrained} if pretrained is not None else {}
    scored |= runs["model"]
    if chain.forgetting_split and (pretrained is not None or any(STAGES[s].data == "captions" for s in chain.stages)):
        for stage, run_dir in scored.items():
            started = time.time()
            result = evaluate_run(
                run_dir, split=chain.forgetting_split, baselines=None, out_dir=out / "forgetting" / stage,
                contact_images=0,
            )  # fmt: skip
            timings[f"captions {stage}"] = time.time() - started
            row = next(iter(result["rows"].values()))  # the run's own row (no baselines asked for)
            forgetting[stage] = {k: row[k] for k in ("CIDEr-D", "BLEU-4", "nll_true") if k in row}
    summary = {"runs": {a: {s: str(p) for s, p in r.items()} for a, r in runs.items()}, "tables": tables,
               "not_scored": not_scored, "caption_matching": matching, "forgetting": forgetting,
               "seconds": timings}  # fmt: skip
    write_atomic(out / "chain.json", json.dumps(summary, indent=1))
    write_atomic(out / "chain.md", format_chain(summary))
    print(format_chain(summary))
    return summary


def format_chain(summary: dict) -> str:
    from ..eval.caption_matching import format_caption_matching
    from ..eval.question_scores import format_task_table

    parts = []
    for label, rows in summary["tables"].items():  # a task, or "task: file" for a real question set
        parts += [f"## {label}", "", format_task_table(label.split(":")[0], rows), ""]
    for label, why in summary.get("not_scored", {}).items():
        parts += [f"## {label}", "", f"Not scored: {why}", ""]
    for stage, record in summary.get("caption_matching", {}).items():
        parts += [f"## SugarCrepe: the {stage} stage", "", format_caption_matching(record), ""]
    if summary["forgetting"]:
        keys = sorted({k for r in summary["forgetting"].values() for k in r})
        parts += ["## Captions after each stage (does stage 2 forget stage 1?)", ""]
        parts += ["| stage | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for stage, r in summary["forgetting"].items():
            parts.append(f"| {stage} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |")
        parts.append("")
    total = sum(summary["seconds"].values())
    parts.append(
        f"Wall time: {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ")"
    )
    return "\n".join(parts) + "\n"
