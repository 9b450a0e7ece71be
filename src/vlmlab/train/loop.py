"""Training loop on HF accelerate: one process by default, `accelerate launch` unchanged for more.

Only the connector and LoRA adapters learn. Each step: cached image tokens -> visual tokens ->
[visual][prompt][caption][END] -> cross-entropy on the caption and its END.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import STAGES, Config, ConfigError, append_whole, write_atomic
from ..data.batching import LengthBucketBatchSampler, pair_lengths
from ..data.features import FeatureCache
from ..data.formats import SkipReport
from ..data.pairs import (
    SKIP_LOG,
    CaptionPairs,
    SplitFeatures,
    collate_pairs,
    load_conversation_features,
    load_split_features,
)
from ..data.retrieval_prompt import CaptionDatastore, with_retrieved_captions
from ..model.language_model import cache_dir
from ..model.nll import derangement, validation_loss
from ..model.vlm import VLM, build_vlm, format_parameter_table
from ..run.checkpoint import (
    STATE_FILE,
    CheckpointError,
    find_checkpoint,
    load_trainable_from,
    restore_rng,
    save_checkpoint,
    truncate_metrics,
    verify_checkpoint,
)
from ..run.hardware import device_description, training_device
from ..run.lifecycle import TrainingStart, training_run
from ..run.record import METRICS_FILE, MODEL_INFO_FILE, git_commit
from .precision import Precision, resolve_precision
from .stages import initialise_from

MAX_SKIPPED_IN_A_ROW = 20


def memory_mb() -> dict:
    """This process's resident memory now and at its peak, in MiB (Linux; the peak alone elsewhere)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mb": round(peak, 1)}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    shuffled = [(r["step"], r["val_loss_shuffled_images"]) for r in records if "val_loss_shuffled_images" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (val, "val", "o-"), (shuffled, "val, images shuffled", "x--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("caption NLL per token (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(out_png, lambda path: fig.savefig(path, dpi=100))
    plt.close(fig)


def build_optimizer(model: VLM, cfg: Config, fused: bool | None = None):
    """AdamW over what trains, one learning rate per part; fused=True: torch's fused kernel (benchmarks compare)."""
    t = cfg.train
    named = [] if model.blind else [(n, p) for n, p in model.connector.named_parameters() if p.requires_grad]
    # xattn's tanh gates start at 0 and Adam moves a scalar by about its lr per step: at train.lr they could not
    # open past ~0.01 in the lab's 150 steps (measured: docs/ablations-and-qformer.md), so they get their own
    gates = [p for n, p in named if n.endswith("_gate")]
    connector = [p for n, p in named if not n.endswith("_gate")]
    lora = [p for n, p in model.lm.named_parameters() if p.requires_grad]
    vision = [p for p in model.vision.parameters() if p.requires_grad]
    groups = [
        {"params": connector, "lr": t.lr},
        {"params": gates, "lr": t.gate_lr, "weight_decay": 0.0},
        {"params": lora, "lr": t.lora_lr},
        {"params": vision, "lr": t.vision_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the connector is frozen and LoRA is off")
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=fused)


@dataclass
class Session:
    """Everything a training run holds once set up: what `fit` steps and `resume_from` restores."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # as accelerate prepared it (DDP-wrapped under several processes)
    vlm: VLM  # the same model unwrapped
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_split: SplitFeatures
    val_split: SplitFeatures
    val_order: list[int] | None  # a derangement of the validation images: the shuffled-image probe
    precision: Precision  # what train.mixed_precision resolved to on this device
    running_loss: tuple[float, int] = (0.0, 0)  # (sum, steps) of the train-loss log window; restored on resume
    skipped: SkipReport = field(default_factory=SkipReport)  # inputs left out; written by record_start

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)  # per process, after sharding

    @property
    def data_layout(self) -> dict:
        return {
            "batches_per_epoch": self.batches_per_epoch,
            "num_processes": self.accelerator.num_processes,
            "train_pairs_sha1": self.train_pairs_sha1,
        }

    @functools.cached_property
    def train_pairs_sha1(self) -> str:
        """What the run trains on (image ids and captions, in order): the same config over changed files differs."""
        h = hashlib.sha1()
        for row, caption in self.train_split.pairs:
            h.update(f"{self.train_split.samples[row].image_id}\t{caption}\n".encode())
        return h.hexdigest()


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Trains a run into cfg.train.output_dir and returns that directory.

    The run folder is a record (run/lifecycle.py): its lock is held throughout; a folder holding a run is refused
    unless `resume` (the config must then match the recorded one) or `overwrite`; and nothing in it changes
    until config, data, checkpoint and resume match are known to be good.
    """
    if cfg.train.stage == "qformer":  # BLIP-2 stage 1: the Q-Former alone, its own loop
        from .stage1_loop import train_stage1

        return train_stage1(cfg, resume, overwrite)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # accelerate launch: rank 0 alone writes the folder
    with training_run(cfg, resume, overwrite, lock=rank0) as start:
        s = setup(cfg)
        step, consumed = 0, 0  # optimizer steps; micro-batches this process has taken (skipped ones included)
        if start.checkpoint is not None:
            step, consumed = resume_from(s, start.checkpoint)
        elif cfg.train.init_from is not None:  # a stage of a chain starts from the previous run's weights
            initialise_from(s.vlm, cfg.train.init_from)
        elif resume and s.main:
            print(f"--resume: no checkpoint in {s.run_dir}, starting from scratch")
        if s.main:
            record_start(s, start)
        fit(s, step, consumed)
    return s.run_dir


def record_start(s: Session, start: TrainingStart) -> None:
    """Writes what the run is (skipped_inputs.log, config.yaml, model_info.json), once it is known to be valid;
    --overwrite first removes the previous run's artefacts."""
    if start.checkpoint is not None:
        warn_precision_change(s)
    start.clear_previous_run(also=(SKIP_LOG,))
    if len(s.skipped):
        s.skipped.write(s.run_dir / SKIP_LOG)
    report_cut_captions(s)
    start.write_record({**s.vlm.model_info(), "precision": s.precision.as_record(), "commit": git_commit()})


def warn_precision_change(s: Session) -> None:
    """A run resumed in another precision than it began in (`auto` on another machine) continues, but not bit for
    bit as it would have: say so once."""
    try:
        before = json.loads((s.run_dir / MODEL_INFO_FILE).read_text()).get("precision", {}).get("used")
    except (OSError, ValueError):
        return
    if before is not None and before != s.precision.used:
        print(
            f"--resume: the run began in {before} and continues in {s.precision.used} ({s.precision.reason}); "
            "its continuation is not bit-identical to an uninterrupted run"
        )


def report_cut_captions(s: Session) -> int:
    """Training captions longer than data.max_caption_tokens are cut to it (sequence.py): counted in one line and
    each listed in the run's skipped_inputs.log, like every other input the run does not take whole."""
    limit = s.cfg.data.max_caption_tokens
    pairs = [(row, caption) for row, caption in s.train_split.pairs if isinstance(caption, str)]  # caption data
    if not pairs:
        return 0
    texts = [c.strip() if s.cfg.lm.chat_format else " " + c.strip() for _, c in pairs]  # as caption_token_ids
    ids = s.vlm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = [(row, caption, len(i)) for (row, caption), i in zip(pairs, ids) if len(i) > limit]
    log = s.run_dir / SKIP_LOG
    if log.exists():  # a resume whose data had nothing else to skip keeps the earlier log: no line twice
        kept = [line for line in log.read_text().splitlines(keepends=True) if not line.startswith("cut captions\t")]
        write_atomic(log, "".join(kept))
    if cut:
        append_whole(
            log,
            "".join(
                f"cut captions\t{s.train_split.samples[row].image_id}\t{n} tokens cut to {limit}: {caption!r}\n"
                for row, caption, n in cut
            ),
        )
        print(
            f"{len(cut)} of {len(pairs)} training captions are longer than data.max_caption_tokens = {limit} "
            f"tokens and are cut to it; each listed in {s.run_dir / SKIP_LOG}"
        )
    return len(cut)


def training_loader(cfg: Config, train_split: SplitFeatures, tokenizer) -> DataLoader:
    """Shuffled batches of training pairs; with data.batch_by_length, batches of similar caption length."""
    t = cfg.train
    if cfg.data.batch_by_length:  # each epoch's batches depend on (seed, epoch) alone: exact resume holds
        lengths = pair_lengths(tokenizer, train_split.pairs)
        sampler = LengthBucketBatchSampler(lengths, t.batch_size, seed=t.seed)
        return DataLoader(CaptionPairs(train_split), batch_sampler=sampler, collate_fn=collate_pairs)
    return DataLoader(
        CaptionPairs(train_split),
        batch_size=t.batch_size,
        shuffle=True,
        collate_fn=collate_pairs,
        drop_last=True,
        generator=torch.Generator().manual_seed(t.seed),  # its own RNG: starting an epoch leaves the global one alone
    )


def setup(cfg: Config) -> Session:
    """Accelerator, run folder, model, cached features, loader, optimizer and schedule."""
    t = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one AcceleratorState per process and refuses another mixed_precision later ("has
        # already been initialized and cannot be changed"): an ablation suite or a chain with a bf16 arm after an
        # fp32 one died on it. A single-process run owns the process, so each run starts from a fresh state.
        AcceleratorState._reset_state(reset_partial_state=True)
    # the device accelerate will train on, before the Accelerator exists (it takes the precision); building a
    # PartialState here instead made every process of `accelerate launch` its main one
    device = training_device()
    if t.mixed_precision == "fp16" and device.type == "cpu":
        # accelerate would silently train in float32: say so instead
        raise ConfigError(
            "train.mixed_precision = 'fp16' needs a GPU (fp16 autocast + loss scaling); on the CPU use 'auto' or 'no'"
        )
    precision = resolve_precision(t.mixed_precision, device)
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=precision.mode,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not steps x processes
    )
    set_seed(t.seed)
    run_dir = Path(t.output_dir)
    main = accelerator.is_main_process
    if main:
        print(f"device: {device_description(device)}; precision: {precision.used} ({precision.reason})")
    # config.yaml and model_info.json are written by record_start once the run is known to be valid

    model = build_vlm(cfg)
    if main:
        print(format_parameter_table(model.parameter_table()))
    cache = FeatureCache(cache_dir() / "features", model.vision)
    skipped = SkipReport()  # what the data left out: the run folder gets it only once the run is valid
    with accelerator.main_process_first():  # rank 0 fills the cache; the others then only read it
        stage = STAGES[cfg.train.stage]
        if stage.data != "captions":  # instruct / vqa: the stage's conversations from data.tasks
            if cfg.vision.unfreeze_last:
                raise ConfigError(
                    f"train.stage {cfg.train.stage!r} reads cached features: vision.unfreeze_last must be 0"
                )
            data = load_conversation_features(cfg, cache, stage.data)
        else:
            data = load_split_features(
                cfg,
                cache,
                splits=("train", "val"),
                log_dir=run_dir if main else None,
                pixels=cfg.vision.unfreeze_last > 0,  # tuned blocks: no cached features
                skipped=skipped,
            )
    if cfg.data.retrieved_captions:  # SmallCap: the nearest training images' captions in the prompt
        store = CaptionDatastore(data["train"])
        k = cfg.data.retrieved_captions
        data = {name: with_retrieved_captions(split, store.retrieve(split, k)) for name, split in data.items()}
    train_split, val_split = data["train"], data["val"]
    if not train_split.pairs:
        raise ValueError(f"no training pairs in {cfg.data.datasets}")
    if main:
        print(
            f"train: {len(train_split.samples)} images, {len(train_split.pairs)} captions; "
            f"val: {len(val_split.samples)} images, {len(val_split.pairs)} captions"
        )
    # the shuffled-image probe needs two images and a model that sees them: a blind run's would repeat val_loss
    probe = len(val_split.samples) >= 2 and not model.blind
    val_order = derangement(len(val_split.samples), seed=t.seed) if probe else None

    loader = training_loader(cfg, train_split, model.tokenizer)
    if len(loader) < accelerator.num_processes:
        raise ValueError(
            f"train.batch_size {t.batch_size} x {accelerator.num_processes} process(es) exceeds the "
            f"{len(train_split.pairs)} training pairs"
        )
    optimizer = build_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return Session(
        cfg,
        run_dir,
        accelerator,
        model,
        accelerator.unwrap_model(model),
        loader,
        optimizer,
        scheduler,
        train_split,
        val_split,
        val_order,
        precision,
        skipped=skipped,
    )


def resume_from(s: Session, checkpoint: Path) -> tuple[int, int]:
    """Restores weights, optimizer, schedule, RNGs and the data position; returns (step, micro-batches consumed)."""
    load_trainable_from(checkpoint, s.vlm)
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    layout = {k: v for k, v in s.data_layout.items() if k in state["data"]}  # older checkpoints lack the digest
    saved_layout = {k: state["data"][k] for k in layout}
    if saved_layout != layout:
        differing = ", ".join(
            f"{k}: recorded {saved_layout[k]!r}, now {layout[k]!r}" for k in layout if saved_layout[k] != layout[k]
        )
        raise CheckpointError(
            f"{checkpoint} was written with another data layout ({differing}): "
            "the data order cannot be continued (same data, batch size and process count are needed)"
        )
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    step = state["step"]
    consumed = state["data"]["epoch"] * s.batches_per_epoch + state["data"]["batches_into_epoch"]
    # the log window open at the checkpoint: the first train_loss logged after resuming averages the same steps
    s.running_loss = tuple(state["data"].get("running_loss", (0.0, 0)))
    if s.main:
        truncate_metrics(s.run_dir / METRICS_FILE, step)  # records after the checkpoint are redone, not duplicated
        print(f"resumed from {checkpoint} at step {step}")
    return step, consumed


def fit(s: Session, step: int, consumed: int) -> None:
    """The optimisation loop from `step` on: logging, validation probes, checkpoints."""
    t, accelerator, model, vlm, main, run_dir = s.cfg.train, s.accelerator, s.model, s.vlm, s.main, s.run_dir
    optimizer, scheduler, loader, val_split, val_order = s.optimizer, s.scheduler, s.loader, s.val_split, s.val_order
    batches_per_epoch, data_layout = s.batches_per_epoch, s.data_layout
    metrics_path = run_dir / METRICS_FILE

    if main and step == 0:
        write_atomic(metrics_path, "")
    trace_dir = os.environ.get("VLMLAB_TRACE_DATA")  # tests: which pairs each rank trained on, per step

    def log(record: dict) -> None:
        if main:
            append_whole(metrics_path, json.dumps(record) + "\n")

    def evaluate_and_log(step: int) -> None:
        if not val_split.pairs:
            return
        record = {"step": step, "val_loss": validation_loss(vlm, val_split, t.batch_size, t.eval_batches)}
        if val_order is not None:
            record["val_loss_shuffled_images"] = validation_loss(
                vlm, val_split, t.batch_size, t.eval_batches, image_order=val_order
            )
        log(record)
        if main:
            tqdm.write(
                f"step {step}: val loss {record['val_loss']:.3f}"
                + (f" (images shuffled: {record['val_loss_shuffled_images']:.3f})" if val_order else "")
            )

    def nonfinite(what: str, value: float) -> None:
        """Stops the run (the default) or, with train.on_nonfinite=skip, drops this batch's update."""
        if t.on_nonfinite == "stop":
            saved = find_checkpoint(run_dir)
            raise FloatingPointError(
                f"non-finite {what} ({value}) at step {step + 1}; no update was applied. "
                + (f"The last good checkpoint ({saved}, step {verify_checkpoint(saved)}) is intact. " if saved else "")
                + "Set train.on_nonfinite=skip to skip such batches instead."
            )
        log({"step": step + 1, "skipped_nonfinite": what, "value": value})
        if main:
            tqdm.write(f"step {step + 1}: non-finite {what} ({value}); batch skipped")

    if step == 0:
        evaluate_and_log(0)
    model.train()
    epoch, skip = divmod(consumed, batches_per_epoch)
    progress = tqdm(total=t.max_steps, initial=step, desc="training", unit="step", disable=not main)
    running, running_n, started, skipped, skipped_in_a_row = 0.0, 0, time.time(), 0, 0
    running, running_n = s.running_loss  # after a resume: the window that was open at the checkpoint
    timed_n = 0  # steps since `started`, for samples/s
    window_ok = True  # no non-finite loss among this accumulation window's micro-batches
    while step < t.max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for image_tokens, captions, indices in epoch_loader:
            consumed += 1
            with accelerator.accumulate(model):
                nll_sum, n_tokens = model(image_tokens, vlm.text_batch(captions), reduction="sum")
                totals = accelerator.reduce(torch.stack([nll_sum.detach(), n_tokens.float()]), "sum")
                global_loss = totals[0] / totals[1]  # token mean over every process's batch
                # DDP averages gradients over processes; scaled so, the update is that of one process taking
                # the whole global batch (a plain per-process mean would weight short captions differently)
                loss = nll_sum * accelerator.num_processes / totals[1]
                # every rank takes the same branch below, or DDP's gradient all-reduce would wait forever
                if torch.isfinite(global_loss):
                    accelerator.backward(loss)
                else:
                    window_ok = False
                    nonfinite("training loss", global_loss.item())
                    skipped += 1
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
                    # under fp16 the loss scaler skips overflowing steps itself (and lowers its scale)
                    if window_ok and s.precision.mode != "fp16" and not torch.isfinite(grad_norm):
                        window_ok = False
                        nonfinite("gradient norm", grad_norm.item())
                        skipped += 1
                    if window_ok:
                        optimizer.step()
                        scheduler.step()
                    optimizer.zero_grad()
            if trace_dir:
                trace = Path(trace_dir) / f"rank{accelerator.process_index}.jsonl"
                append_whole(trace, json.dumps({"step": step + 1, "pairs": indices.tolist()}) + "\n")
            if not accelerator.sync_gradients:
                continue
            if not window_ok:  # the update was dropped: this step is redone with the next batch
                window_ok = True
                skipped_in_a_row += 1
                if skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(
                        f"{skipped_in_a_row} updates in a row dropped for non-finite values at step {step + 1}: "
                        "the run is diverging, not meeting the odd bad batch; stopping"
                    )
                continue
            skipped_in_a_row = 0
            running += global_loss.item()
            running_n += 1
            timed_n += 1
            step += 1
            progress.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.time() - started
                record = {
                    "step": step,
                    "train_loss": running / running_n,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": timed_n
                    * t.batch_size
                    * t.grad_accum
                    * accelerator.num_processes
                    / max(elapsed, 1e-9),
                    **memory_mb(),
                }
                log(record)
                progress.set_postfix(loss=f"{record['train_loss']:.3f}")
                running, running_n, timed_n, started = 0.0, 0, 0, time.time()
            if step % t.eval_every == 0 or step == t.max_steps:
                evaluate_and_log(step)
            if main and (step % t.save_every == 0 or step == t.max_steps):
                epoch_now, into = divmod(consumed, batches_per_epoch)
                data_state = {
                    **data_layout,
                    "epoch": epoch_now,
                    "batches_into_epoch": into,
                    "running_loss": (running, running_n),
                }
                save_checkpoint(run_dir, vlm, optimizer, scheduler, step, data_state)
            accelerator.wait_for_everyone()
            if step >= t.max_steps:
                break
        epoch += 1
    progress.close()
    if main:
        plot_losses(metrics_path, run_dir / "loss.png")
        print(f"run saved to {run_dir}" + (f" ({skipped} batches skipped for non-finite values)" if skipped else ""))
    accelerator.end_training()
