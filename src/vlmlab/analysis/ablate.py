"""Controlled ablations: one base config, variants that each flip a few keys, N seeds each.

`vlmlab ablate SUITE` trains every (variant, seed) into OUT/<variant>/seed<k>/, evaluates each on the same
split with `vlmlab eval`'s code (no baselines: the variants are each other's baselines), and writes
OUT/results.csv (one row per run), OUT/results.md (mean +- std over seeds) and plots. Finished runs and
evaluations are skipped on a rerun, so an interrupted suite continues where it stopped. With `--records DIR`
each finished arm is also recorded in DIR (arm_records.py): committed, those records let the suite continue on
another machine, a few arms at a time, without training the recorded arms again.
"""

from __future__ import annotations

import collections
import csv
import functools
import gc
import io
import json
import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import Config, ConfigError, apply_settings, load_config, write_atomic
from ..eval.captioning import ATTRIBUTE_COLUMNS
from ..eval.metrics import cider_per_image
from ..run.hardware import training_device
from ..train.precision import resolve_precision
from .arm_records import arm_record_path, read_arm_record, recorded_precision, val_curve, write_arm_record
from .baselines import finished_step, stale_keys
from .recipes import find_recipe

# (column, key in eval.json's model row, higher is better)
MAIN_METRICS = [
    ("CIDEr-D", "CIDEr-D", True),
    ("BLEU-4", "BLEU-4", True),
    ("NLL true", "nll_true", False),
    ("visual gain", "visual_information_gain", True),
    ("changed by swap", "swap_changed_share", True),
]
ATTRIBUTE_METRICS = [(name, key, True) for name, key in ATTRIBUTE_COLUMNS]  # synthetic world only
# Q-Former runs only (eval.json "attention"): is the attention selective, are the queries different?
ATTENTION_METRICS = [
    ("attn entropy", "attn_entropy", False),
    ("attn uniform", "attn_entropy_uniform", False),
    ("attn max weight", "attn_max_weight", True),
    ("query corr", "attn_query_correlation", False),
    ("attn on objects", "attn_object_mass", True),  # scenes with known boxes (synthetic world)
    ("objects read", "attn_objects_covered", True),  # scenes with two or more objects
    ("objects read if alike", "attn_objects_covered_alike", False),  # all queries on one object
]


@dataclass
class Suite:
    name: str
    path: Path
    base: str | None = None
    overrides: dict = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    split: str = "test"
    contact_images: int = 8
    descriptions: dict[str, str] = field(default_factory=dict)  # variant -> what it tests (for the report)

    def config(self, variant: str, seed: int, out_dir: Path) -> Config:
        """The base config, the suite's overrides, the variant's settings, then seed and output dir."""
        base = None if self.base is None else find_recipe(self.base, "config", self.path.parent)
        try:
            cfg = apply_settings(load_config(base), self.overrides or {})
            settings = dict(self.variants[variant] or {})
            pretrain = settings.pop("pretrain", None)
            apply_settings(cfg, settings)
            apply_settings(cfg, {"train.seed": seed, "train.output_dir": str(arm_dir(out_dir, variant, seed))})
            if pretrain is not None:  # the run starts from its stage-1 run (a variant's `pretrain:`)
                cfg.train.init_from = str(self.pretrain_config(variant, seed, out_dir).train.output_dir)
        except ConfigError as e:
            raise ConfigError(f"suite {self.name!r}, variant {variant!r}: {e}") from e
        return cfg

    def pretrain_config(self, variant: str, seed: int, out_dir: Path) -> Config | None:
        """A variant's `pretrain: {dotted.key: value}` -> the BLIP-2 stage-1 run (train.stage qformer) it starts
        from: the base, the suite's overrides, the variant's connector.* settings, then the pretrain settings."""
        settings = dict(self.variants[variant] or {})
        pretrain = settings.pop("pretrain", None)
        if pretrain is None:
            return None
        if not isinstance(pretrain, dict):
            raise ConfigError(f"suite {self.name!r}, variant {variant!r}: 'pretrain' must map dotted keys to values")
        base = None if self.base is None else find_recipe(self.base, "config", self.path.parent)
        cfg = apply_settings(load_config(base), self.overrides or {})
        apply_settings(cfg, {k: v for k, v in settings.items() if k.startswith(("connector.", "vision.", "data."))})
        if cfg.connector.type == "xattn":  # stage 1 trains the Q-Former that the cross-attention blocks read
            cfg.connector.type = "qformer"
        apply_settings(cfg, {"train.stage": "qformer", **pretrain})
        return apply_settings(cfg, {"train.seed": seed, "train.output_dir": str(stage1_dir(out_dir, variant, seed))})


PRECISION_SETTING = {"float32": "no", "bf16": "bf16", "auto": "auto"}  # vlmlab ablate --precision -> the config's


def _refuse_a_precision_the_records_lack(records: Path, suite: Suite, setting: str, here: str) -> None:
    """A new arm would train in `here` (from the suite's train.mixed_precision on this machine) while every arm
    recorded so far trained in another: refused unless --precision says which one is meant, since `auto` is
    float32 on one CPU and bf16 on another and a gap between such arms includes the precision's."""
    recorded = {
        recorded_precision(json.loads(path.read_text()))
        for variant in suite.variants
        for path in sorted((records / variant).glob("seed*.json"))
    } - {None}
    if recorded and here not in recorded:
        raise ConfigError(
            f"the arms recorded in {records} trained in {', '.join(sorted(recorded))}; here "
            f"train.mixed_precision={setting!r} "
            f"means {here}: pass --precision {sorted(recorded)[0]} to train new arms as they did "
            f"(or --precision {here} to mix precisions knowingly; the table names each arm's)"
        )


def arm_dir(out_dir: Path, variant: str, seed: int) -> Path:
    """Where a suite trains one arm (variant x seed)."""
    return Path(out_dir) / variant / f"seed{seed}"


def stage1_dir(out_dir: Path, variant: str, seed: int) -> Path:
    """Where a pretrain variant's BLIP-2 stage-1 run for that arm trains, beside the arm."""
    return Path(out_dir) / variant / f"seed{seed}-stage1"


def load_suite(spec: str | Path) -> Suite:
    """A suite file, or a shipped recipe's name (`roles` -> recipes/suite-roles.yaml)."""
    path = find_recipe(str(spec), "suite")
    tree = yaml.safe_load(path.read_text()) or {}
    allowed = {"name", "base", "overrides", "variants", "seeds", "split", "contact_images", "descriptions"}
    if not isinstance(tree, dict) or set(tree) - allowed:
        raise ConfigError(f"{path}: a suite is a mapping of {sorted(allowed)}; unknown: {sorted(set(tree) - allowed)}")
    if not isinstance(tree.get("variants"), dict) or not tree["variants"]:
        raise ConfigError(f"{path}: 'variants' must map variant names to {{dotted.key: value}} settings")
    if not isinstance(tree.get("overrides") or {}, dict):
        raise ConfigError(f"{path}: overrides map dotted keys to values, e.g. {{train.max_steps: 600}}, as variants "
                          f"do; a `- key=value` list is the command line's --set form")  # fmt: skip
    suite = Suite(path=path, **{"name": path.stem, **tree})
    if not suite.seeds or not all(isinstance(s, int) for s in suite.seeds):
        raise ConfigError(f"{path}: 'seeds' must be a non-empty list of integers")
    for variant in suite.variants:  # every variant's config is checked before anything trains
        suite.config(variant, suite.seeds[0], Path("."))
    return suite


def run_suite(
    suite: Suite,
    out_dir: str | Path | None = None,
    only: list[str] | None = None,
    records: str | Path | None = None,
    table_only: bool = False,
    precision: str | None = None,
) -> Path:
    """Trains and evaluates what is missing (neither in OUT nor recorded in `records`), records each finished arm
    there, then writes the results; returns the output folder. `table_only` trains nothing: the tables are built
    from the arms already evaluated or recorded, so a study whose arms have unequal seed counts can still be
    tabled (each row says how many seeds it averages). `precision` (float32 | bf16 | auto) replaces every arm's
    train.mixed_precision: a study begun in float32 continues in float32 on a CPU where `auto` means bf16."""
    from accelerate.state import AcceleratorState

    from ..eval.captioning import evaluate_run
    from ..eval.retrieval import evaluate_stage1_run
    from ..train.loop import train

    out = Path(out_dir or Path("runs") / "ablate" / suite.name)
    if only and set(only) - set(suite.variants):
        raise ConfigError(
            f"unknown variants {sorted(set(only) - set(suite.variants))}; the suite has {list(suite.variants)}"
        )
    variants = [v for v in suite.variants if not only or v in only]
    arms = [
        (v, seed, suite.config(v, seed, out), suite.pretrain_config(v, seed, out))
        for v in variants
        for seed in suite.seeds
    ]
    if precision is not None:
        for config in (c for _, _, main, stage1 in arms for c in (main, stage1) if c is not None):
            config.train.mixed_precision = PRECISION_SETTING[precision]
    here = None if table_only or not arms else resolve_precision(arms[0][2].train.mixed_precision, training_device())
    recorded = {  # every record read and checked before anything trains
        (v, seed): read_arm_record(arm_record_path(records, v, seed), cfg, suite.split, stage1, here and here.used)
        for v, seed, cfg, stage1 in arms
        if records is not None
    }  # fmt: skip
    if here is not None and records is not None and precision is None:
        _refuse_a_precision_the_records_lack(Path(records), suite, arms[0][2].train.mixed_precision, here.used)
    out.mkdir(parents=True, exist_ok=True)
    described = {
        "name": suite.name,
        "split": suite.split,
        "seeds": suite.seeds,
        "variants": suite.variants,
        "descriptions": suite.descriptions,
        "base": suite.base,
        "overrides": suite.overrides,
    }
    write_atomic(out / "suite.json", json.dumps(described, indent=1))
    if table_only:
        missing = [f"{v} seed {seed}" for v, seed, _, _ in arms if arm_results(out, v, seed, records) is None]
        if missing:
            print(f"[{suite.name}] not in the table (neither evaluated in {out} nor recorded): {', '.join(missing)}")
        write_results(suite, out, variants, records)
        return out
    for variant, seed, cfg, stage1 in arms:
        run_dir = Path(cfg.train.output_dir)
        label = f"[{suite.name}] {variant}, seed {seed}"
        if recorded.get((variant, seed)) is not None and not _evaluated(run_dir):
            print(f"{label}: recorded already ({arm_record_path(records, variant, seed)}); not trained again")
            continue
        if stage1 is not None:  # BLIP-2 stage 1 first: the run below starts from it (train.init_from)
            stage1_dir = Path(stage1.train.output_dir)
            if finished_step(stage1_dir) == stage1.train.max_steps and stale_keys(stage1, stage1_dir) == []:
                print(f"{label}, stage 1: trained already ({stage1_dir})")
            else:
                print(f"{label}, stage 1: training into {stage1_dir}")
                train(stage1, resume=True)
            if not _evaluated(stage1_dir):
                evaluate_stage1_run(stage1_dir, split=suite.split)  # what stage 1 learned, on its own
        changed = stale_keys(cfg, run_dir)  # None: nothing saved there yet
        if finished_step(run_dir) == cfg.train.max_steps and changed == []:
            print(f"{label}: trained already ({run_dir})")
        else:
            if changed:
                raise ConfigError(
                    f"{run_dir} holds a run with another config (differs in {changed}); "
                    "move it away or use another output folder"
                )
            print(f"{label}: training into {run_dir}")
            AcceleratorState._reset_state()  # each run builds its own Accelerator
            train(cfg, resume=True)
        if not _evaluated(run_dir):
            evaluate_run(run_dir, split=suite.split, baselines=None, contact_images=suite.contact_images)
        if records is not None and recorded.get((variant, seed)) is None:
            path = write_arm_record(
                arm_record_path(records, variant, seed), suite.name, variant, seed, cfg, run_dir, stage1
            )
            print(f"{label}: recorded in {path}")
        gc.collect()
    write_results(suite, out, variants, records)
    return out


def _evaluated(run_dir: Path) -> bool:
    """The run's eval.json exists and is newer than its checkpoint."""
    evaluated = run_dir / "eval.json"
    return evaluated.exists() and evaluated.stat().st_mtime >= (run_dir / "checkpoint").stat().st_mtime


def arm_results(out: Path, variant: str, seed: int, records: str | Path | None = None) -> dict | None:
    """What the tables need of one arm: from its run folder in OUT when evaluated there, else from its record in
    `records` (a finished arm trained on another machine); None when neither has it."""
    run_dir = arm_dir(out, variant, seed)
    if (run_dir / "eval.json").exists():
        stage1_eval = stage1_dir(out, variant, seed) / "eval.json"
        return {
            "eval": json.loads((run_dir / "eval.json").read_text()),
            "model_info": _model_info(run_dir),
            "val_curve": val_curve(run_dir),
            "stage1_eval": json.loads(stage1_eval.read_text()) if stage1_eval.exists() else None,
        }
    path = None if records is None else arm_record_path(records, variant, seed)
    if path is None or not path.exists():
        return None
    record = json.loads(path.read_text())
    return {**record, "val_curve": [tuple(point) for point in record["val_curve"]]}


def collect(suite: Suite, out: Path, variants: list[str], records: str | Path | None = None) -> list[dict]:
    """One record per finished, evaluated arm: variant, seed, parameter counts, visual tokens, every metric."""
    rows = []
    for variant in variants:
        for seed in suite.seeds:
            arm = arm_results(out, variant, seed, records)
            if arm is None:
                continue
            result = arm["eval"]
            row = next(iter(result["rows"].values()))  # the run's own row comes first, then controls / baselines
            metrics = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            metrics.update(result.get("attention") or {})  # Q-Former runs: attention statistics
            precision = recorded_precision(arm) or "unknown"  # float32 | bf16 | ...
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    **arm["model_info"],
                    "precision": precision,
                    **metrics,
                    "val_curve": arm["val_curve"],
                }
            )
    return rows


def _model_info(run_dir: Path) -> dict:
    """Parameter counts and visual tokens, as train() records them (computed once for runs made before it did)."""
    path = run_dir / "model_info.json"
    if not path.exists():
        from ..model.vlm import build_vlm

        write_atomic(path, json.dumps(build_vlm(load_config(run_dir / "config.yaml")).model_info()))
    return json.loads(path.read_text())


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std over seeds; the std of one seed is NaN: its spread is unknown, not zero."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def precision_cell(rows: list[dict]) -> str:
    """'float32', or 'float32 x2, bf16 x1' where a variant's seeds trained in different precisions."""
    counts = collections.Counter(r["precision"] for r in rows)
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{p} x{n}" for p, n in sorted(counts.items()))


def metrics_present(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """The main metrics, plus the attribute scores where the runs have them (synthetic world)."""
    present = MAIN_METRICS + [m for m in ATTRIBUTE_METRICS if any(m[1] in r for r in rows)]
    return present + [m for m in ATTENTION_METRICS if any(r.get(m[1]) not in (None, "") for r in rows)]


def metric_cells(rows: list[dict], metrics, separator: str = " +- ") -> list[str]:
    """Per metric, 'mean<separator>std' over the rows (one per seed) that have a value, the mean alone where one
    seed has it (its spread is unknown, not zero), else 'n/a'."""
    cells = []
    for _, key, _ in metrics:
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        values = [v for v in values if not math.isnan(v)]  # a statistic undefined for that run (one query's corr)
        if values:
            mean, std = _mean_std(values)
            cells.append(f"{mean:.3f}{separator}{std:.3f}" if len(values) > 1 else f"{mean:.3f}")
        else:
            cells.append("n/a")
    return cells


def write_results(suite: Suite, out: Path, variants: list[str], records_dir: str | Path | None = None) -> list[dict]:
    records = collect(suite, out, variants, records_dir)
    if not records:
        return records
    metrics = metrics_present(records)
    keys = ["variant", "seed", "trainable_params", "visual_tokens"] + [key for _, key, _ in metrics]
    extra = sorted({k for r in records for k in r} - set(keys) - {"val_curve"})
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=keys + extra, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    write_atomic(out / "results.csv", table.getvalue())

    lines = [
        f"# {suite.name}: {suite.split} split, mean +- std over seeds {suite.seeds}",
        "",
        "| variant | seeds | trainable params | visual tokens | precision | "
        + " | ".join(n for n, _, _ in metrics)
        + " |",
        "|" + " --- |" * (len(metrics) + 5),
    ]
    for variant in variants:
        rows = [r for r in records if r["variant"] == variant]
        if not rows:
            continue
        cells = metric_cells(rows, metrics)
        params = rows[0].get("trainable_params")
        tokens = rows[0].get("visual_tokens")
        lines.append(
            f"| {variant} | {len(rows)} | {params:,} | {tokens} | "
            if params is not None
            else f"| {variant} | {len(rows)} | n/a | n/a | "
        )
        lines[-1] += f"{precision_cell(rows)} | " + " | ".join(cells) + " |"
    used = {r["precision"] for r in records}
    if len(used) > 1:
        lines += [
            "",
            f"**The arms trained in different precisions** ({', '.join(sorted(used))}; `auto` is bf16 on a CPU with "
            "AVX512-BF16 and float32 elsewhere): a gap between arms of different precisions includes the precision's.",
        ]
    present = [v for v in variants if any(r["variant"] == v for r in records)]
    paired = paired_rows(suite, out, present, records_dir)
    write_atomic(out / "paired.json", json.dumps({"reference": present[0], "metric": "CIDEr-D", "rows": paired}))
    lines += paired_table(present[0], paired, suite.split)
    lines += stage1_table(suite, out, variants, records_dir)
    write_atomic(out / "results.md", "\n".join(lines) + "\n")
    plot_results(records, metrics, variants, out)
    print("\n".join(lines))
    return records


def per_image_cider(arm: dict) -> dict[str, float]:
    """One arm's CIDEr-D per test image, recomputed from the captions and references its eval kept (every image's),
    keyed by file name; refused where their mean is not the CIDEr-D the eval reported (they are not what it
    scored)."""
    row = next(iter(arm["eval"]["rows"].values()))
    examples = row.get("examples") or []
    names = [Path(e["image"]).name for e in examples]
    if len(examples) != arm["eval"]["images"] or len(set(names)) != len(names):
        raise ValueError(
            f"{arm['eval']['run']}: its eval kept {len(examples)} captions (distinct names: {len(set(names))}) "
            f"for {arm['eval']['images']} images: no per-image comparison"
        )
    if row["tokenizer"] == "ptb" and shutil.which("java") is None:
        raise ValueError(f"{arm['eval']['run']}: its eval tokenized with PTB, which needs Java; none is on PATH")
    references = {n: e["references"] for n, e in zip(names, examples)}
    scores = cider_per_image(references, {n: e["caption"] for n, e in zip(names, examples)}, row["tokenizer"] == "ptb")
    if not math.isclose(statistics.fmean(scores.values()), row["CIDEr-D"], rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(
            f"{arm['eval']['run']}: per-image CIDEr-D averages {statistics.fmean(scores.values()):.6f}, "
            f"the eval reported {row['CIDEr-D']:.6f}: the kept captions are not the ones scored"
        )
    return scores


def paired_rows(suite: Suite, out: Path, variants: list[str], records: str | Path | None = None) -> dict[str, dict]:
    """Each variant minus the first (the reference), CIDEr-D image by image on the seeds both ran: the mean
    difference over images (each image's difference averaged over those seeds), its standard error over images,
    and on how many images the variant scores higher / lower.

    Both arms caption the same images, some easy and some hard: the difference per image removes what the images
    share, and its standard error says whether a gap is more than which images the split drew. It does not
    measure seed-to-seed spread (the main table's std does)."""
    scores = {
        (variant, seed): per_image_cider(arm)
        for variant in variants
        for seed in suite.seeds
        if (arm := arm_results(out, variant, seed, records)) is not None
    }
    reference, rows = variants[0], {}
    for variant in variants[1:]:
        seeds = [s for s in suite.seeds if (variant, s) in scores and (reference, s) in scores]
        if seeds:
            rows[variant] = {"seeds": seeds} | paired_difference(
                [scores[reference, s] for s in seeds], [scores[variant, s] for s in seeds]
            )
    return rows


def paired_difference(reference: list[dict[str, float]], other: list[dict[str, float]]) -> dict:
    """other minus reference, image by image on the images all of them scored: per seed pair (the lists are
    matched by position) a per-image score dict each; each image's difference is averaged over the pairs. -> the
    mean difference, its standard error over images, and on how many images `other` is higher / lower."""
    images = sorted(set.intersection(*(set(scores) for scores in reference + other)))
    diffs = [statistics.fmean(b[i] - a[i] for a, b in zip(reference, other)) for i in images]
    return {
        "images": len(images),
        "difference": statistics.fmean(diffs),
        "standard error": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan,
        "higher": sum(d > 0 for d in diffs),
        "lower": sum(d < 0 for d in diffs),
    }


def pair_arm_records(reference: str | Path, other: str | Path) -> dict:
    """Two arm records (results/ablate/SUITE/VARIANT/seedK.json) paired image by image on CIDEr-D, as the suites'
    paired tables pair their arms, for arms no one suite table holds together (the same arm in two precisions, or
    from two records folders). Refused unless both captioned the same test images."""
    arms = [json.loads(Path(p).read_text()) for p in (reference, other)]
    scores = [per_image_cider(arm) for arm in arms]
    if set(scores[0]) != set(scores[1]):
        raise ValueError(
            f"{reference} and {other} captioned different images ({len(scores[0])} and {len(scores[1])}, "
            f"{len(set(scores[0]) & set(scores[1]))} in common): a paired difference needs the same test split"
        )
    return {
        "arms": [
            {
                "record": str(path),
                "variant": f"{arm['suite']}/{arm['variant']} seed {arm['seed']}",
                "precision": recorded_precision(arm),
                "CIDEr-D": next(iter(arm["eval"]["rows"].values()))["CIDEr-D"],
            }
            for path, arm in zip((reference, other), arms)
        ]
    } | paired_difference([scores[0]], [scores[1]])


def format_pair(pair: dict) -> str:
    """pair_arm_records as a few lines of text."""
    (a, b) = pair["arms"]
    lines = [f"{name}: {arm['variant']} ({arm['precision']}), CIDEr-D {arm['CIDEr-D']:.3f}  [{arm['record']}]"
             for name, arm in (("reference", a), ("other", b))]  # fmt: skip
    lines.append(
        f"other minus reference, CIDEr-D per image over {pair['images']} images: {pair['difference']:+.3f} "
        f"+- {pair['standard error']:.3f} (standard error over images); other higher on {pair['higher']}, "
        f"lower on {pair['lower']}"
    )
    return "\n".join(lines)


def paired_table(reference: str, rows: dict[str, dict], split: str) -> list[str]:
    """Markdown lines of paired_rows."""
    if not rows:
        return []
    lines = [
        "",
        f"## Paired against {reference}: CIDEr-D per {split} image, variant minus {reference}",
        "",
        "Mean over the images of the difference (averaged over the seeds both ran), its standard error over "
        "images, and how many images each side scores higher on. Image-to-image noise only; seed-to-seed "
        "spread is the table above.",
        "",
        "| variant | seeds paired | images | difference | standard error | higher | lower |",
        "|" + " --- |" * 7,
    ]
    for variant, r in rows.items():
        lines.append(
            f"| {variant} | {','.join(map(str, r['seeds']))} | {r['images']} | {r['difference']:+.3f} | "
            f"{r['standard error']:.3f} | {r['higher']} | {r['lower']} |"
        )
    return lines


STAGE1_METRICS = [  # (column, key in a stage-1 run's eval.json, flattened)
    ("image->text R@1", "i2t_r@1"),
    ("chance", "i2t_r@1_chance"),
    ("text->image R@1", "t2i_r@1"),
    ("image->text R@5", "i2t_r@5"),
    ("ITM accuracy", "itm_accuracy"),
    ("attn entropy", "attn_entropy"),
    ("attn max weight", "attn_max_weight"),
    ("query corr", "attn_query_correlation"),
    ("attn on objects", "attn_object_mass"),
    ("objects read", "attn_objects_covered"),
]


def stage1_rows(out: Path, variants: list[str], seeds, records: str | Path | None = None) -> dict[str, list[dict]]:
    """Per variant with stage-1 runs: each seed's stage-1 eval.json, flattened (retrieval, ITM, attention)."""
    rows: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            arm = arm_results(out, variant, seed, records)
            result = None if arm is None else arm["stage1_eval"]
            if result is not None:
                flat = {**result["retrieval"], **result.get("attention", {})}
                flat |= {k: v for k, v in result.items() if k.startswith("itm_accuracy")}
                rows.setdefault(variant, []).append(flat)
    return rows


def stage1_table(suite: Suite, out: Path, variants: list[str], records: str | Path | None = None) -> list[str]:
    """Markdown lines: what each variant's stage-1 run learned before the LLM saw it (mean +- std over seeds)."""
    rows = stage1_rows(out, variants, suite.seeds, records)
    if not rows:
        return []
    metrics = [(name, key, False) for name, key in STAGE1_METRICS]
    lines = [
        "",
        f"## Stage 1 alone (the Q-Former before the LLM sees it), {suite.split} split",
        "",
        "| variant | seeds | " + " | ".join(name for name, _ in STAGE1_METRICS) + " |",
        "|" + " --- |" * (len(STAGE1_METRICS) + 2),
    ]
    for variant, runs in rows.items():
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(metric_cells(runs, metrics)) + " |")
    return lines


def plot_results(records: list[dict], metrics, variants: list[str], out: Path) -> None:
    """One bar chart per metric (mean, error bar = std over seeds) and the validation-loss curves overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [v for v in variants if any(r["variant"] == v for r in records)]
    for name, key, higher in metrics:
        values = [[r[key] for r in records if r["variant"] == v and key in r] for v in present]
        stats = [_mean_std(vs or [math.nan]) for vs in values]  # one seed: NaN std, and matplotlib draws no bar
        labels = [f"{v}\n({len(vs)} seed{'s' * (len(vs) != 1)})" for v, vs in zip(present, values, strict=True)]
        fig, ax = plt.subplots(figsize=(1.1 * len(present) + 2, 3.8))
        ax.bar(range(len(present)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(present)), labels, rotation=30, ha="right")
        ax.set_ylabel(name + (" (higher is better)" if higher else " (lower is better)"))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        write_atomic(out / f"bar_{key.replace('-', '_')}.png", functools.partial(fig.savefig, dpi=100))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for v in present:
        curves = [r["val_curve"] for r in records if r["variant"] == v and r["val_curve"]]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
        ax.plot(steps, mean, "o-", label=v, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation caption NLL per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(out / "val_loss.png", functools.partial(fig.savefig, dpi=100))
    plt.close(fig)
