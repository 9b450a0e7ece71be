"""Training loop on HF accelerate: one process by default, `accelerate launch` unchanged for more.

Only the connector and LoRA adapters learn. Each step: cached image tokens -> visual tokens ->
[visual][prompt][caption][END] -> cross-entropy on the caption and its END.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import Config, save_config
from .data.pairs import CaptionPairs, SplitFeatures, collate_pairs, load_split_features
from .features import FeatureCache
from .language_model import cache_dir
from .vlm import VLM, build_vlm, format_parameter_table

CHECKPOINT = "checkpoint"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "training_state.pt"


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed permutation with no fixed point: every image is paired with another one (n >= 2)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


@torch.no_grad()
def validation_loss(
    model: VLM,
    split: SplitFeatures,
    batch_size: int,
    max_batches: int | None,
    image_order=None,
    no_image: bool = False,
):
    """Mean caption NLL per token over the first batches of a split (fixed order).

    image_order: optional permutation of the split's images: caption i is scored under image
    image_order[row(i)], e.g. a derangement to measure how much the true image helps.
    no_image: score the captions with no visual tokens at all.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pairs = split.pairs[: (max_batches * batch_size) if max_batches else None]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [r if image_order is None else image_order[r] for r, _ in chunk]
        tokens = None if no_image else split.features[rows].float()
        sums, counts = model(tokens, model.text_batch([c for _, c in chunk]), reduction="sum_per_sample")
        total += sums.sum().item()
        count += counts.sum().item()
    model.train(was_training)
    return total / max(count, 1)


def save_checkpoint(run_dir: Path, model: VLM, optimizer, scheduler, step: int) -> None:
    """Writes checkpoint/ via a temporary folder and a rename, so a crash never leaves half a checkpoint."""
    final = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), tmp / TRAINABLE_FILE, metadata={"step": str(step)})
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        },
        tmp / STATE_FILE,
    )
    old = run_dir / (CHECKPOINT + ".old")
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    if old.exists():
        shutil.rmtree(old)


def load_trainable(run_dir: Path, model: VLM) -> None:
    path = Path(run_dir) / CHECKPOINT / TRAINABLE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {path})")
    model.load_trainable_state_dict(load_file(path))


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
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def build_optimizer(model: VLM, cfg: Config):
    t = cfg.train
    connector = [] if model.blind else [p for p in model.connector.parameters() if p.requires_grad]
    lora = [p for n, p in model.lm.named_parameters() if p.requires_grad]
    groups = [g for g in ({"params": connector, "lr": t.lr}, {"params": lora, "lr": t.lora_lr}) if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the connector is frozen and LoRA is off")
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


def train(cfg: Config, resume: bool = False) -> Path:
    """Trains a run into cfg.train.output_dir and returns that directory."""
    t = cfg.train
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(t.seed)
    run_dir = Path(t.output_dir)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    model = build_vlm(cfg)
    if main:
        print(format_parameter_table(model.parameter_table()))
    cache = FeatureCache(cache_dir() / "features", model.vision)
    with accelerator.main_process_first():  # rank 0 fills the cache; the others then only read it
        data = load_split_features(cfg, cache, splits=("train", "val"))
    train_split, val_split = data["train"], data["val"]
    if not train_split.pairs:
        raise ValueError(f"no training pairs in {cfg.data.datasets}")
    if main:
        print(
            f"train: {len(train_split.samples)} images, {len(train_split.pairs)} captions; "
            f"val: {len(val_split.samples)} images, {len(val_split.pairs)} captions"
        )
    val_order = derangement(len(val_split.samples), seed=t.seed) if len(val_split.samples) >= 2 else None

    loader = DataLoader(
        CaptionPairs(train_split), batch_size=t.batch_size, shuffle=True, collate_fn=collate_pairs, drop_last=True
    )
    if len(loader) == 0:
        raise ValueError(f"train.batch_size {t.batch_size} exceeds the {len(train_split.pairs)} training pairs")
    optimizer = build_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    vlm: VLM = accelerator.unwrap_model(model)

    step = 0
    if resume and (run_dir / CHECKPOINT / STATE_FILE).exists():
        load_trainable(run_dir, vlm)
        state = torch.load(run_dir / CHECKPOINT / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        step = state["step"]
        if main:
            print(f"resumed from {run_dir / CHECKPOINT} at step {step}")
    elif resume and main:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch")

    metrics_path = run_dir / "metrics.jsonl"
    if main and step == 0:
        metrics_path.write_text("")

    def log(record: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

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

    if step == 0:
        evaluate_and_log(0)
    model.train()
    batches_per_epoch = len(loader)
    epoch, skip = divmod(step * t.grad_accum, batches_per_epoch)
    progress = tqdm(total=t.max_steps, initial=step, desc="training", unit="step", disable=not main)
    running, running_n, started = 0.0, 0, time.time()
    while step < t.max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for image_tokens, captions in epoch_loader:
            with accelerator.accumulate(model):
                loss = model(image_tokens, vlm.text_batch(captions))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += loss.item()
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.time() - started
                record = {
                    "step": step,
                    "train_loss": running / running_n,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": running_n * t.batch_size * accelerator.num_processes / max(elapsed, 1e-9),
                }
                log(record)
                progress.set_postfix(loss=f"{record['train_loss']:.3f}")
                running, running_n, started = 0.0, 0, time.time()
            if step % t.eval_every == 0 or step == t.max_steps:
                evaluate_and_log(step)
            if main and (step % t.save_every == 0 or step == t.max_steps):
                save_checkpoint(run_dir, vlm, optimizer, scheduler, step)
            accelerator.wait_for_everyone()
            if step >= t.max_steps:
                break
        epoch += 1
    progress.close()
    if main:
        plot_losses(metrics_path, run_dir / "loss.png")
        print(f"run saved to {run_dir}")
    accelerator.end_training()
    return run_dir


def load_run(run_dir: str | Path) -> VLM:
    """A trained run directory -> VLM ready to caption (frozen parts rebuilt, trained weights loaded)."""
    from .config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = build_vlm(cfg)
    load_trainable(run_dir, model)
    return model.eval()

