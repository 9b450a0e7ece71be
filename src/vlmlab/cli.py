"""`vlmlab ...`: one command line for training, captioning and the demo."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path


def _config(args):
    from .config import load_config

    overrides = list(args.set or [])
    if getattr(args, "output_dir", None):
        overrides.append(f"train.output_dir={args.output_dir}")
    path = getattr(args, "config", None)
    if path is not None:  # a file, or a recipe's name: `vlmlab train photo-captions`
        from .analysis.recipes import find_recipe

        path = find_recipe(path, "config")
    return load_config(path, overrides)


def cmd_train(args) -> None:
    from .train.loop import train

    train(_config(args), resume=args.resume, overwrite=args.overwrite)


def cmd_demo(args) -> None:
    """Trains on the embedded defaults, then reloads the run from disk and shows its held-out captions."""
    from .app.demo import caption_report
    from .train.loop import train

    run_dir = train(_config(args), resume=True)  # a finished demo run is reused; one with another config is refused
    caption_report(run_dir, "test", args.num_images)


def cmd_captions(args) -> None:
    from .app.demo import caption_report
    from .run.lock import run_lock
    from .run.record import check_out_dir

    if args.out_dir:
        check_out_dir(args.out_dir, args.run_dir, [f"captions_{args.split}.json"], args.overwrite)
    with run_lock(args.out_dir or args.run_dir, create=bool(args.out_dir)):  # writes captions_SPLIT.json there
        caption_report(args.run_dir, args.split, args.num_images, args.out_dir)


EVAL_COMMANDS = ("captions", "questions", "retrieval")


def _is_stage1(run_dir: str) -> bool:
    """A BLIP-2 stage-1 run (train.stage qformer): it has a Q-Former and its heads, no captioner."""
    from .config import ConfigError, load_config

    path = Path(run_dir) / "config.yaml"
    try:
        return path.is_file() and load_config(path).train.stage == "qformer"
    except ConfigError:  # not a run this check can read: the command itself reports it
        return False


def _with_eval_command(argv: list[str]) -> list[str]:
    """`vlmlab eval RUN ...`, without an evaluator, as before: `eval retrieval` for a stage-1 run, `eval captions`
    for any other. A word after `eval` that names an evaluator is one (a run folder so named: ./captions)."""
    if len(argv) < 2 or argv[0] != "eval" or argv[1] in EVAL_COMMANDS or argv[1].startswith("-"):
        return argv
    return ["eval", "retrieval" if _is_stage1(argv[1]) else "captions", *argv[1:]]


def _refuse_stage1(run_dir: str, evaluator: str) -> None:
    from .config import ConfigError

    if _is_stage1(run_dir):
        raise ConfigError(
            f"{run_dir} is a stage-1 (qformer) run: it has no {evaluator} to score; `vlmlab eval retrieval {run_dir}`"
        )


def _check_out_dir(args, outputs: list[str]) -> None:
    """--out-dir that is another run's folder, or already holds these outputs: only with --overwrite."""
    from .config import ConfigError
    from .run.record import check_out_dir

    if args.out_dir:
        check_out_dir(args.out_dir, args.run_dir, outputs, args.overwrite)
    elif args.overwrite:
        raise ConfigError("--overwrite applies to --out-dir; the results in RUN_DIR itself are always replaced")


def cmd_eval_captions(args) -> None:
    from .analysis.baselines import train_baselines
    from .config import ConfigError
    from .eval.captioning import check_caption_eval, evaluate_run
    from .eval.reranking import check_rerank
    from .run.lock import run_lock

    if args.candidates is not None and not args.rerank:
        raise ConfigError("--candidates applies to --rerank; give both or neither")
    candidates = 5 if args.candidates is None else args.candidates
    if args.rerank:  # bad settings fail before a lock or a model
        check_rerank(args.rerank, candidates)
    _refuse_stage1(args.run_dir, "captioner")
    sugarcrepe = ["sugarcrepe.json", "sugarcrepe.md"] if args.sugarcrepe else []
    _check_out_dir(args, ["eval.json", "eval.md", "contact_sheet.png"] + sugarcrepe)
    if args.sugarcrepe:  # refused now, not after the captions
        from .eval.caption_matching import check_caption_matching

        check_caption_matching(args.run_dir, args.sugarcrepe)
    kwargs = {
        "num_beams": args.beams,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
    }
    with run_lock(args.out_dir or args.run_dir, create=bool(args.out_dir)):  # eval.json, eval.md, baselines/
        check_caption_eval(args.run_dir, args.rerank, candidates)  # before a baseline trains for nothing
        baselines = None  # the blind and frozen-connector runs, trained here: scoring never trains
        if not args.no_baselines:
            baselines = train_baselines(args.run_dir, train_missing=not args.no_train_baselines)
        evaluate_run(
            args.run_dir,
            args.data,
            args.split,
            baselines=baselines,
            retrieval_k=args.retrieval_k,
            contact_images=args.contact_images,
            out_dir=args.out_dir,
            rerank=args.rerank,
            num_candidates=candidates,
            **{k: v for k, v in kwargs.items() if v},
        )
        if args.sugarcrepe:  # beside the captions: the same run's caption likelihood on hard negatives
            from .eval.caption_matching import evaluate_caption_matching

            blind = (baselines or {}).get("blind")
            evaluate_caption_matching(args.run_dir, args.sugarcrepe, blind_run=blind, out_dir=args.out_dir)


def cmd_eval_questions(args) -> None:
    """VQA accuracy, POPE and multiple choice, each beside its controls."""
    from .eval.question_scores import evaluate_task
    from .run.lock import run_lock

    _refuse_stage1(args.run_dir, "answerer")
    _check_out_dir(args, [f"eval_{args.task}.json", f"eval_{args.task}.md"])
    with run_lock(args.out_dir or args.run_dir, create=bool(args.out_dir)):
        evaluate_task(
            args.run_dir,
            args.task,
            args.questions,
            args.images,
            args.blind,
            args.limit,
            args.out_dir,
            unseen_only=args.unseen_only,
        )


def cmd_eval_retrieval(args) -> None:
    """A stage-1 run: recall vs chance, ITM, attention (and SugarCrepe by ITM); a caption run: SugarCrepe by
    its caption likelihood, the one image-text match it has."""
    from .config import ConfigError
    from .run.lock import run_lock

    if not args.sugarcrepe and (args.images or args.limit is not None):
        raise ConfigError("--images and --limit apply to --sugarcrepe; give it or leave them out")
    if args.blind and (not args.sugarcrepe or _is_stage1(args.run_dir)):
        raise ConfigError("--blind applies to a caption run's --sugarcrepe (the blind LM row)")
    if _is_stage1(args.run_dir):
        from .eval.retrieval import evaluate_stage1_run

        _check_out_dir(args, ["eval.json", "eval.md"])
        with run_lock(args.out_dir or args.run_dir, create=bool(args.out_dir)):
            evaluate_stage1_run(
                args.run_dir, args.split or "test", args.sugarcrepe, args.images, args.limit, args.out_dir
            )
        return
    if not args.sugarcrepe:
        raise ConfigError(
            f"{args.run_dir} is no stage-1 run: it has no retrieval heads, only its caption likelihood, scored on "
            "SugarCrepe with --sugarcrepe DIR (its captions: `vlmlab eval captions`)"
        )
    if args.split:
        raise ConfigError("--split applies to a stage-1 run's recall; SugarCrepe has its own images")
    from .eval.caption_matching import check_caption_matching, evaluate_caption_matching

    _check_out_dir(args, ["sugarcrepe.json", "sugarcrepe.md"])
    check_caption_matching(args.run_dir, args.sugarcrepe, args.blind)  # before the lock and any model
    with run_lock(args.out_dir or args.run_dir, create=bool(args.out_dir)):  # sugarcrepe.json
        evaluate_caption_matching(
            args.run_dir, args.sugarcrepe, args.images, args.blind, args.limit, args.out_dir
        )  # fmt: skip


def cmd_ablate(args) -> None:
    from .analysis.ablate import load_suite, run_suite

    suite = load_suite(args.suite)
    if args.seeds:
        suite.seeds = [int(x) for x in args.seeds.split(",")]
    only = args.only.split(",") if args.only else None
    run_suite(
        suite, args.out_dir, only=only, records=args.records, table_only=args.table_only, precision=args.precision
    )


def cmd_inspect(args) -> None:
    from .analysis.inspect import inspect_run
    from .run.lock import run_lock

    with run_lock(args.run_dir, create=False):  # writes RUN_DIR/inspect (or --out-dir)
        png, result = inspect_run(args.run_dir, args.image, args.out_dir, args.top_k, args.layer)
    print(f"caption: {result.caption}")
    for q, tokens in enumerate(result.nearest):
        print(f"visual token {q:2d}: " + "  ".join(f"{t!r} {c:.2f}" for t, c in tokens))
    print(f"heat maps: {png}")


def cmd_report(args) -> None:
    from .analysis.report import build_report

    print(f"report: {build_report(args.runs_dir, args.out, args.inspect_images)}")


def cmd_results(args) -> int:
    """Renders RESULTS.md from results/*.json, checks it (--check: exit 2 when stale), or adds a record."""
    from .analysis.results import RecordError, add_record, check_page, write_page

    try:
        if args.action == "pair":
            from .analysis.ablate import format_pair, pair_arm_records

            try:
                print(format_pair(pair_arm_records(args.reference, args.other)))
            except (OSError, ValueError, KeyError) as e:
                raise RecordError(str(e)) from e
        elif args.action == "add":
            path = add_record(args.source, args.name, args.results_dir, args.run_command, args.overwrite)
            print(f"results: wrote {path}; run `vlmlab results` to render {args.page}")
        elif args.check:
            stale = check_page(args.results_dir, args.page)
            if stale:
                print(f"vlmlab results: {stale}", file=sys.stderr)
                return 2
            print(f"results: {args.page} matches {args.results_dir}/")
        else:
            print(f"results: wrote {write_page(args.results_dir, args.page)}")
    except RecordError as e:
        print(f"vlmlab results: error: {e}", file=sys.stderr)
        return 2
    return 0


def _one_line(text: str) -> str:
    """A caption as one line of the plain output: backslash, newline, CR and tab written as \\ \\n \\r \\t."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def cmd_caption(args) -> int:
    """Captions each image it can read; each one it cannot is named on stderr; exit 1 if any failed."""
    from .data.formats import load_image
    from .run import load_run

    model = load_run(args.run_dir)
    kwargs = {k: v for k, v in (("num_beams", args.beams), ("max_new_tokens", args.max_new_tokens)) if v}
    failed = 0

    def fail(path: str, e: Exception) -> None:
        nonlocal failed
        failed += 1
        text = str(e) if path in str(e) else f"{path}: {e}"
        print(f"vlmlab caption: skipped {text} ({type(e).__name__})", file=sys.stderr)

    def emit(path: str, caption: str) -> None:
        print(
            json.dumps({"image": path, "caption": caption}) if args.json else f"{_one_line(path)}\t{_one_line(caption)}"
        )

    for start in range(0, len(args.images), 16):
        batch = []
        for path in args.images[start : start + 16]:
            try:
                batch.append((path, load_image(path)))
            except Exception as e:  # noqa: BLE001 - any failure to read one image: report it, go on with the rest
                fail(path, e)
        try:
            captions = model.caption([image for _, image in batch], **kwargs) if batch else []
        except Exception:  # noqa: BLE001 - one image the model cannot take must not cost the others
            captions = None
        for i, (path, image) in enumerate(batch):
            if captions is None:
                try:
                    emit(path, model.caption([image], **kwargs)[0])
                except Exception as e:  # noqa: BLE001
                    fail(path, e)
            else:
                emit(path, captions[i])
        sys.stdout.flush()
    if failed:
        print(f"vlmlab caption: {failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args) -> None:
    from .analysis.export import export_run

    out = export_run(args.run_dir, args.out_dir, args.dtype, args.command, args.records, args.overwrite, args.row)
    print(
        f"exported {args.run_dir} -> {out} (model card: {out / 'README.md'}); load it with `vlmlab caption {out} IMAGE`"
    )


def cmd_zoo(args) -> None:
    """One line per released model: name, stage, data, the model's headline figures from its card's records."""
    from .run.release import read_card, zoo_dir, zoo_names

    names = zoo_names()
    if not names:
        print(f"no models in {zoo_dir()}")
    for name in names:
        front, _ = read_card(zoo_dir() / name / "README.md")
        figures = [  # the first two metrics of the first two tables (a chat model: VQA, then POPE)
            f"{result['dataset']['name'] + ' ' if len(entry['results']) > 1 else ''}{m['name']} {m['value']:.3g}"
            for entry in front.get("model-index") or []
            for result in entry["results"][:2]
            for m in result["metrics"][:2]
        ]
        print(
            f"zoo:{name}\t{' '.join(front.get('tags', [])[2:])}\t{', '.join(front.get('datasets', []))}\t"
            f"{'; '.join(figures) or 'no recorded figures'}"
        )


def cmd_params(args) -> None:
    from .model.vlm import build_vlm, format_parameter_table

    model = build_vlm(_config(args))
    print(format_parameter_table(model.parameter_table()))
    print(f"connector {model.cfg.connector.type!r}: {model.num_visual_tokens} visual tokens per image")
    if hasattr(model.connector, "layer_ids"):  # xattn
        print(
            f"  the LLM reads {model.connector.num_queries} Q-Former outputs through gated cross-attention before "
            f"decoder layers {model.connector.layer_ids}"
        )


def cmd_synth(args) -> None:
    from .config import ConfigError
    from .data.synthetic import generate_world

    try:
        path = generate_world(
            args.out_dir, n_images=args.n, seed=args.seed, max_objects=args.max_objects, occlusion=args.occlusion
        )
    except ValueError as e:  # a parameter generate_world refuses (before it touches the folder): one line
        raise ConfigError(str(e)) from e
    print(f"wrote {path}")


def cmd_serve(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError as e:  # gradio is the optional `app` extra
        raise FileNotFoundError(f"vlmlab serve needs the app extra (pip install -e '.[app]'): {e}") from e
    from .app.web import serve

    serve(args.run_dir or served_by_default(), host=args.host, port=args.port)


SERVED_FIRST = ("photo-chat", "photo-captioner", "demo")  # what `vlmlab serve` shows with no run: the zoo's first


def served_by_default() -> Path:
    """The zoo's photo chat model (no training first), else its next model, else the demo run."""
    from .run.release import zoo_dir, zoo_names

    present = [name for name in SERVED_FIRST if name in zoo_names()]
    return zoo_dir() / present[0] if present else demo_run_dir()


def demo_run_dir() -> Path:
    """The demo run (embedded defaults), trained first if it is absent or unfinished (tqdm shows the progress);
    a finished one is reused, as `vlmlab demo` does."""
    from .config import load_config
    from .train.loop import train

    cfg = load_config(None)
    if not (Path(cfg.train.output_dir) / "config.yaml").exists():
        print(f"vlmlab serve: no demo run at {cfg.train.output_dir}; training it first (minutes on a CPU)")
    return Path(train(cfg, resume=True))


def cmd_make_tasks(args) -> None:
    from .data.make_tasks import check_out_folder, check_task_options, make_tasks

    cfg = _config(args)
    if args.data:
        from .config import apply_settings

        apply_settings(cfg, {"data.datasets": args.data})
    if args.objects_min_captions is not None and not args.objects_from_captions:
        from .config import ConfigError

        raise ConfigError("--objects-min-captions applies to --objects-from-captions; give both or neither")
    min_captions = 2 if args.objects_min_captions is None else args.objects_min_captions
    check_task_options(args.objects_from_captions, min_captions, args.vqa_turns, args.counts_from_captions)
    check_out_folder(args.out_dir, args.overwrite)
    summary = make_tasks(
        cfg,
        args.out_dir,
        objects_from_captions=args.objects_from_captions,
        min_captions=min_captions,
        presence_from_boxes=args.presence_from_boxes,
        vqa_turns=args.vqa_turns,
        counts_from_captions=args.counts_from_captions,
    )
    for name, count in summary["files"].items():
        print(f"{count:>7}  {Path(args.out_dir) / name}")
    print(f"images: {summary['images']}; {summary['split_check']}")
    if args.objects_from_captions:
        print(f"of which objects named by captions only: {summary['objects_from_captions']}")
    if args.presence_from_boxes:
        print(f"stage-3 questions about the photos with boxes only: {summary['presence_from_boxes']}")
    if args.counts_from_captions:
        print(f"count questions from captions, by answer: {summary['counts_from_captions']}")


def cmd_presence_probe(args) -> None:
    from .data.features import FeatureCache
    from .eval.presence_probe import presence_probe
    from .eval.question_scores import read_questions, task_test_files
    from .model.language_model import cache_dir
    from .model.vision import build_vision_encoder

    cfg = _config(args)
    questions = [q for f in task_test_files(args.pope, "pope") for q in read_questions(f)[1]]
    cache = FeatureCache(cache_dir() / "features", build_vision_encoder(cfg.vision.name, cfg.vision.image_size))
    rows = [presence_probe(cfg, questions, source, cache, args.min_captions) for source in args.labels]
    cols = ["labels", "training photos", "positives per photo", "auc", "accuracy", "f1", "yes_ratio"]
    print(f"linear probe on frozen {cfg.vision.name} features; {len(questions)} POPE questions from {args.pope}")
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def cmd_chat(args) -> int:
    """A prompt too long for the run's LM is refused, not cut: the answer would be to another question."""
    from .data.formats import load_image
    from .data.grounded_questions import VQA_SUFFIX
    from .model.context import PromptTooLong
    from .run import load_run

    image = None if args.image.lower() == "none" else load_image(args.image)  # an unreadable one: before the model
    model = load_run(args.run_dir)
    kwargs = {"max_new_tokens": args.max_new_tokens}

    def phrased(question: str) -> str:  # --short: as `vlmlab eval questions` asks, and the vqa stage trains
        return question + VQA_SUFFIX if args.short else question

    if args.questions_file:
        lines = Path(args.questions_file).read_text().splitlines()
        numbered = [(n, q.strip()) for n, q in enumerate(lines, 1) if q.strip()]
        convs = [[{"role": "user", "content": "<image>\n" + phrased(q)}] for _, q in numbered]
        try:
            answers = model.chat_batch([image] * len(convs), convs, **kwargs)
        except PromptTooLong as e:
            raise PromptTooLong(f"{args.questions_file}: line {numbered[e.row][0]}: {e}") from e
        for (_, q), a in zip(numbered, answers):
            print(json.dumps({"question": q, "answer": a}))
        return 0
    if args.question:
        print(model.chat(image, [{"role": "user", "content": "<image>\n" + phrased(args.question)}], **kwargs))
        return 0
    messages: list[dict] = []
    print(f"chatting with {args.run_dir} about {args.image}; an empty line ends the session")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        asked = messages + [{"role": "user", "content": ("<image>\n" if not messages else "") + phrased(text)}]
        try:
            reply = model.chat(image, asked, **kwargs)
        except PromptTooLong as e:  # the session goes on without this turn
            print(f"vlmlab chat: {e}; this turn is not asked", file=sys.stderr)
            continue
        messages = asked + [{"role": "assistant", "content": reply}]
        print(f"vlm> {reply}")
    return 0


def cmd_lmms_tasks(args) -> None:
    from .integrations.lmms_eval.task_yamls import write_lmms_tasks

    names = write_lmms_tasks(args.tasks_dir, args.out_dir)
    print(f"wrote {', '.join(names)} to {args.out_dir}; run e.g.")
    print(
        f"  python -m lmms_eval --model vlmlab --model_args run=RUN_DIR --tasks {names[0]} --include_path {args.out_dir}"
    )


def cmd_chain(args) -> None:
    from .analysis.chain import load_chain, run_chain
    from .config import ConfigError

    use = {}
    for item in args.use:
        stage, sep, model = item.partition("=")
        if not sep or not stage or not model:
            raise ConfigError(f"--use {item!r}: STAGE=MODEL, e.g. caption=zoo:photo-captioner")
        use[stage] = model
    run_chain(load_chain(args.chain), args.out_dir, use)


def cmd_prepare(args) -> None:
    from .model.language_model import SMOLLM2_NAME, smollm2_dir

    print(f"{SMOLLM2_NAME}: {smollm2_dir()}")


OVERWRITE_HELP = (
    "let --out-dir be another run's folder, or one that already holds these results (refused without it); "
    "their files of the same names are replaced"
)


class _OtherEvaluatorsFlag(argparse.Action):
    """A flag of another `vlmlab eval` evaluator: refused by name, with the evaluators it belongs to."""

    def __init__(self, option_strings, dest, homes=(), **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.homes = homes

    def __call__(self, parser, namespace, values, option_string=None):
        where = " or ".join(f"`vlmlab eval {home}`" for home in self.homes)
        parser.error(f"{option_string} does not apply to `{parser.prog}`; it is a flag of {where}")


def add_eval_parsers(sub) -> None:
    """`vlmlab eval captions|questions|retrieval`: one evaluator each, each with only the flags it reads."""
    p = sub.add_parser(
        "eval",
        help="score a run: captions (metrics, probes, baselines), questions (VQA / POPE / multiple choice) or "
        "retrieval (stage 1, SugarCrepe)",
        description="Score a run with one evaluator. `vlmlab eval RUN [...]` without one is `eval retrieval` for a "
        "stage-1 run and `eval captions` for any other.",
    )
    evaluators = p.add_subparsers(dest="evaluator", required=True, metavar="{" + ",".join(EVAL_COMMANDS) + "}")

    p = evaluators.add_parser(
        "captions",
        help="caption metrics, image-dependence probes and baselines on a split; "
        "writes eval.json, eval.md, contact_sheet.png",
    )
    p.add_argument("run_dir")
    p.add_argument("--data", action="append", metavar="SPEC", help="FORMAT:PATH (default: the run's own data)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--repetition-penalty", type=float)
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--no-baselines", action="store_true", help="only the run itself: no blind / frozen / retrieval rows"
    )
    which.add_argument(
        "--no-train-baselines",
        action="store_true",
        help="use the blind and frozen-connector baselines only if already trained (RUN_DIR/baselines/)",
    )
    p.add_argument("--retrieval-k", type=int, help="neighbours for the retrieval baseline (default: tuned on val)")
    p.add_argument(
        "--rerank",
        choices=["mbr", "neighbours"],
        help="choose each caption among --candidates beams: 'mbr' by agreement with the other candidates, "
        "'neighbours' by agreement with the nearest training images' captions (eval/reranking.py)",
    )
    p.add_argument("--candidates", type=int, help="beam candidates per image for --rerank (default 5)")
    p.add_argument("--contact-images", type=int, default=16, help="images on contact_sheet.png (0: none)")
    p.add_argument(
        "--sugarcrepe",
        metavar="DIR",
        help="also SugarCrepe ($VLMLAB_DATA/questions/sugar-crepe) by the run's caption likelihood, beside the "
        "swapped-image, no-image and blind-LM rows, on photos it never trained on: sugarcrepe.json / .md",
    )
    p.add_argument("--out-dir", help="write eval.json, eval.md, contact_sheet.png here (default: RUN_DIR)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_eval_captions)

    p = evaluators.add_parser(
        "questions", help="VQA accuracy, POPE or multiple choice, each beside its controls; writes eval_TASK.json/.md"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--task",
        required=True,
        choices=["vqa", "pope", "mmbench"],
        help="vqa (VQA accuracy), pope, mmbench (multiple choice, CircularEval)",
    )
    p.add_argument(
        "--questions",
        action="append",
        metavar="FILE",
        help="question file(s): VQA v2 *_questions.json, A-OKVQA json, POPE jsonl, MMBench tsv "
        "(default: the run's data.tasks test files)",
    )
    p.add_argument("--images", help="image folder for --questions (POPE's COCO_val2014_ names map to COCO-2017 ids)")
    p.add_argument("--blind", metavar="RUN_DIR", help="the blind run of the same recipe (connector.type none)")
    p.add_argument(
        "--unseen-only",
        action="store_true",
        help="leave out the questions about photos in the run's training split (COCO photos matched by id)",
    )
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out-dir", help="write eval_TASK.json and .md here (default: RUN_DIR)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_eval_questions)

    p = evaluators.add_parser(
        "retrieval",
        help="a stage-1 run: image-text recall vs chance, ITM accuracy, attention; SugarCrepe by ITM, or by the "
        "caption likelihood of a caption run",
    )
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["train", "val", "test"], help="stage-1 runs: the split scored (default test)")
    p.add_argument(
        "--sugarcrepe",
        metavar="DIR",
        help="SugarCrepe folder ($VLMLAB_DATA/questions/sugar-crepe): does ITM (stage-1 runs) or the caption "
        "likelihood (caption runs: sugarcrepe.json) prefer the true caption over its hard negative, per category",
    )
    p.add_argument("--images", help="SugarCrepe's images (default: coco2017-val/val2017 beside its folder)")
    p.add_argument("--blind", metavar="RUN_DIR", help="caption runs: the blind LM (connector.type none) beside it")
    p.add_argument("--limit", type=int, help="SugarCrepe: only the first N items per category")
    p.add_argument("--out-dir", help="write the results here (default: RUN_DIR)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_eval_retrieval)

    # each evaluator refuses the others' flags by name (argparse has no public way to read a parser's flags back)
    flags = {name: {f for a in q._actions for f in a.option_strings} for name, q in evaluators.choices.items()}
    for name, q in evaluators.choices.items():
        for flag in sorted(set().union(*flags.values()) - flags[name]):
            q.add_argument(flag, action=_OtherEvaluatorsFlag, homes=[h for h in EVAL_COMMANDS if flag in flags[h]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p, required: bool):
        p.add_argument(
            "config",
            nargs=None if required else "?",
            help="YAML config, or a recipe's name (recipes/NAME.yaml); default: the embedded demo",
        )
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.lr=3e-4")
        p.add_argument("--output-dir", help="shorthand for --set train.output_dir=...")

    p = sub.add_parser("train", help="train a captioning VLM from a config")
    with_config(p, required=True)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in the output folder (removed only once the new run is set up)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train on the synthetic world and show image-dependent captions")
    with_config(p, required=False)
    p.add_argument("--num-images", type=int, default=8)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("caption", help="caption images with a trained run")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--beams", type=int, help="beam size (default: the run's generate.num_beams)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("captions", help="caption a split of a run's data: true vs swapped image, NLL true vs shuffled")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--out-dir", help="write captions_SPLIT.json here (default: RUN_DIR; needed for a zoo model)")
    p.add_argument("--overwrite", action="store_true", help="let --out-dir be another run's folder or replace")
    p.set_defaults(func=cmd_captions)

    add_eval_parsers(sub)

    p = sub.add_parser("make-tasks", help="write conversation / VQA / POPE / multiple-choice files from annotations")
    p.add_argument("out_dir")
    with_config(p, required=False)
    p.add_argument("--data", action="append", metavar="SPEC", help="FORMAT:PATH (default: the config's data)")
    p.add_argument(
        "--objects-from-captions",
        action="store_true",
        help="training photos without boxes: questions about the COCO objects their captions name (test: boxes only)",
    )
    p.add_argument(
        "--objects-min-captions",
        type=int,
        metavar="N",
        help="with --objects-from-captions: an object counts as present when N of the captions name it (default 2)",
    )
    p.add_argument(
        "--counts-from-captions",
        action="store_true",
        help="with --objects-from-captions: stage-3 'How many' questions wherever N captions agree on a number "
        "('two dogs'); every other file unchanged",
    )
    p.add_argument(
        "--presence-from-boxes",
        action="store_true",
        help="stage-3 questions about photos with boxes only, presence asked POPE's way (3 settings)",
    )
    p.add_argument(
        "--vqa-turns",
        type=int,
        default=1,
        metavar="K",
        help="stage-3 conversations ask K questions of one photo each, LLaVA-1.5's way (default 1)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an OUT that is not empty (refused without it, an earlier make-tasks output included): "
        "its files of the same names are replaced, the others left",
    )
    p.set_defaults(func=cmd_make_tasks)

    p = sub.add_parser(
        "presence-probe", help="can presence be read from the frozen features? a linear probe scored on POPE"
    )
    with_config(p, required=False)
    p.add_argument("--pope", required=True, metavar="TASKS_DIR", help="a make-tasks folder: its POPE test files")
    p.add_argument("--labels", nargs="+", choices=["captions", "boxes"], default=["captions", "boxes"])
    p.add_argument("--min-captions", type=int, default=1, help="captions labels: how many captions must name it")
    p.set_defaults(func=cmd_presence_probe)

    p = sub.add_parser("chat", help="ask a run about an image (one question, or interactive without one)")
    p.add_argument("run_dir")
    p.add_argument("image", help="an image file, or 'none' for no image")
    p.add_argument("question", nargs="?", help="omit for a multi-turn session (empty line or EOF ends it)")
    p.add_argument("--questions-file", help="answer every question of a file (one per line) about the image")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--short",
        action="store_true",
        help="ask for a short answer, as `vlmlab eval questions` asks and the vqa stage trains (LLaVA-1.5's "
        "'Answer the question using a single word or number.'); a vqa-stage model answers best so",
    )
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("lmms-tasks", help="lmms-eval task YAMLs over a make-tasks folder (for --include_path)")
    p.add_argument("tasks_dir", help="a `vlmlab make-tasks` folder")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_lmms_tasks)

    p = sub.add_parser("chain", help="train caption -> instruct -> vqa stages, then score VQA / POPE / multiple choice")
    p.add_argument(
        "chain",
        help="a chain YAML file, or a recipe's name (recipes/chain-NAME.yaml): synthetic, photos-hour",
    )
    p.add_argument("--out-dir", default=None, help="default: runs/chain/<chain name>")
    p.add_argument(
        "--use",
        action="append",
        default=[],
        metavar="STAGE=MODEL",
        help="a stage (caption, blind/vqa, ...) already trained and exported: its release (a folder, zoo:NAME, "
        "hf:ORG/NAME), checked to be that stage, stands in for its run; the stages after it start from it",
    )
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("ablate", help="train and evaluate every variant of a suite x seeds; tables and plots")
    p.add_argument(
        "suite",
        help="a suite YAML file, or a recipe's name (recipes/suite-NAME.yaml): roles, qformer-stages",
    )
    p.add_argument("--out-dir", default=None, help="default: runs/ablate/<suite name>")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the suite's, e.g. 0,1,2")
    p.add_argument("--only", default=None, help="comma-separated variants to run (the rest are left as they are)")
    p.add_argument(
        "--records",
        default=None,
        help="a folder of arm records (e.g. results/ablate/SUITE): each finished arm is recorded there; an arm "
        "recorded there with the same settings is not trained again (commit them to finish a study across machines)",
    )
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: table the arms already evaluated in OUT or recorded in --records (rows whose seeds are "
        "missing average the seeds there are, and say how many)",
    )
    p.add_argument(
        "--precision",
        choices=["float32", "bf16", "auto"],
        default=None,
        help="train every arm in this precision instead of the suite's train.mixed_precision (`auto` is bf16 on a "
        "CPU with AVX512-BF16, float32 elsewhere): a study continues in the precision its records trained in",
    )
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("inspect", help="Q-Former cross-attention heat maps and nearest vocabulary tokens for an image")
    p.add_argument("run_dir")
    p.add_argument("image")
    p.add_argument("--out-dir", default=None, help="default: RUN_DIR/inspect")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--layer", type=int, default=-1, help="which Q-Former layer's attention to draw (-1: the last)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="one self-contained HTML page from an ablation suite's folder")
    p.add_argument("runs_dir", help="the folder `vlmlab ablate` wrote (results.csv, one folder per variant)")
    p.add_argument("--out", default=None, help="default: RUNS_DIR/report.html")
    p.add_argument("--inspect-images", type=int, default=2, help="attention maps per Q-Former variant")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", help="render RESULTS.md from the records in results/ (or add a record from a run)")
    p.add_argument("--check", action="store_true", help="exit 2 when RESULTS.md is not what the records render")
    p.add_argument("--results-dir", default="results", help="default: results")
    p.add_argument("--page", default="RESULTS.md", help="default: RESULTS.md")
    actions = p.add_subparsers(dest="action")
    actions.add_parser("render", help="write RESULTS.md (the default)")
    a = actions.add_parser("add", help="write results/NAME.json from a run's eval.json, chain.json or ablation folder")
    a.add_argument("source", help="a JSON that vlmlab eval / chain wrote, or the run, chain or suite folder holding it")
    a.add_argument("--name", required=True, help="the record's name: results/NAME.json")
    a.add_argument("--command", dest="run_command", default=None, help="the command that produced the run")
    a.add_argument("--overwrite", action="store_true", help="replace an existing record of that name")
    a = actions.add_parser("pair", help="two arm records paired image by image on CIDEr-D (other minus reference)")
    a.add_argument("reference", help="an arm record: results/ablate/SUITE/VARIANT/seedK.json")
    a.add_argument("other", help="another arm record over the same test images")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("params", help="print the parameter table of a config's model")
    with_config(p, required=False)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("synth", help="render the synthetic world to a folder")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=2, help="1 to 9 shapes per scene")
    p.add_argument("--occlusion", action="store_true", help="shapes larger than their cell: neighbours overlap")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("serve", help="a web page to try a run: captions, swapped image, chat, attention maps, run card")
    p.add_argument("run_dir", nargs="?", help="a run or zoo:NAME (default: the zoo's photo chat model, else the demo)")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=None, help="default: gradio's (7860, or the next free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="convert the default LM's GGUF to cached safetensors (done once)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("export", help="a finished run -> a release folder with a model card (loads anywhere)")
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="the release folder, e.g. zoo/NAME (its name is the model's)")
    p.add_argument(
        "--dtype",
        default="float16",
        help="float16 (default), bfloat16, or float32 (exact: for a stage a later one continues from)",
    )
    p.add_argument("--command", help="the command that trained the run, for the card")
    p.add_argument("--records", nargs="*", default=[], metavar="JSON", help="more result JSON for the card")
    p.add_argument(
        "--row", default="model", help="this model's row in the records' tables (a blind twin's: 'blind model')"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("zoo", help="the released models in zoo/, one line each (use them as zoo:NAME)")
    p.set_defaults(func=cmd_zoo)
    return parser


WRITES_INTO_RUN = {  # commands that write into RUN_DIR unless given --out-dir: an exported model is read-only
    "captions": "captions_SPLIT.json",
    "inspect": "inspect/",
    "eval": "eval.json and its tables",
}


def _resolve_models(args) -> None:
    """zoo:NAME / hf:ORG/NAME -> the folder, for every argument that names a run; and no command writes into an
    exported model's folder."""
    from .run.release import ReleaseError, is_release, resolve_model

    for key in ("run_dir", "blind"):
        value = getattr(args, key, None)
        if isinstance(value, str) and args.command != "export":
            setattr(args, key, str(resolve_model(value)))
    run_dir = getattr(args, "run_dir", None)
    if args.command in WRITES_INTO_RUN and run_dir and is_release(run_dir) and not getattr(args, "out_dir", None):
        raise ReleaseError(
            f"{run_dir} is an exported model, kept as released: vlmlab {args.command} writes "
            f"{WRITES_INTO_RUN[args.command]} into it; "
            + ("pass --out-dir" if hasattr(args, "out_dir") else "copy the folder and give the copy")
        )


FULL_DISK = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space, over a file-size limit, over a quota


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(_with_eval_command(sys.argv[1:] if argv is None else list(argv)))
    from PIL import UnidentifiedImageError

    from .analysis.export import ExportError
    from .data.formats import InputError, UnreadableImage
    from .run.checkpoint import CheckpointError
    from .run.lock import RunRefused
    from .run.release import ReleaseError

    # an input file no decoder reads names itself: PIL's "cannot identify image file 'PATH'", UnreadableImage
    refused = (ConfigError, InputError, UnreadableImage, UnidentifiedImageError, FileNotFoundError, RunRefused)
    refused += (ReleaseError, ExportError, CheckpointError)
    try:
        _resolve_models(args)
        return args.func(args) or 0  # a command over many inputs returns 1 when some of them failed
    except refused as e:  # a user's mistake (a setting, a file, a row of it) or a refusal: one line
        print(f"vlmlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        # the machine's fault, not the input's: every file is written whole or not at all (config.write_atomic)
        print(
            f"vlmlab {args.command}: error: {e.strerror}: {e.filename or 'a file'}; nothing half-written",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
