"""The training loop of BLIP-2 stage 1 (train.stage = qformer): the Q-Former alone on image-caption pairs.

No LLM in the step (only its embedding table, frozen), so this is a plain single-process loop: cached image
tokens -> ITC / ITM / ITG (model/qformer_stage1.py) -> AdamW, on the GPU where there is one (as the caption
loop). Its run folder is an ordinary run: the lock, config.yaml, metrics.jsonl (one key per loss), and a
checkpoint by save_checkpoint whose `connector.*` tensors a caption run loads with `train.init_from`
(train/stages.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import Config, ConfigError, append_whole, write_atomic
from ..data.features import FeatureCache
from ..data.pairs import SplitFeatures, load_split_features
from ..model.language_model import cache_dir
from ..model.qformer_stage1 import QFormerStage1, build_stage1
from ..run.checkpoint import STATE_FILE, load_trainable_from, restore_rng, save_checkpoint, truncate_metrics
from ..run.hardware import device_description, training_device
from ..run.lifecycle import training_run
from ..run.record import METRICS_FILE
from .precision import Precision


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """The pair order of one epoch, from (seed, epoch) alone: a resume finds its place by counting."""
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_of(split: SplitFeatures, indices: list[int]) -> tuple[torch.Tensor, list[str], list[str]]:
    rows = [split.pairs[i][0] for i in indices]
    captions = [split.pairs[i][1] for i in indices]
    return split.features[rows].float(), captions, [split.samples[r].image_id for r in rows]


@torch.no_grad()
def validation_losses(model: QFormerStage1, split: SplitFeatures, batch_size: int, batches: int) -> dict[str, float]:
    """Mean of each stage-1 loss over the first `batches` batches of the validation pairs (fixed order, but
    ITM's negatives are sampled: seeded here so two evaluations of one model agree)."""
    if len(split.pairs) < 2:
        return {}
    model.eval()
    state = torch.get_rng_state()
    torch.manual_seed(0)
    sums: dict[str, float] = {}
    n = 0
    for start in range(0, min(len(split.pairs), batch_size * batches), batch_size):
        indices = list(range(start, min(start + batch_size, len(split.pairs))))
        if len(indices) < 2:
            break
        out = model(*batch_of(split, indices))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        n += 1
    torch.set_rng_state(state)
    model.train()
    return {f"val_{k}": v / n for k, v in sums.items()}


def train_stage1(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Trains a stage-1 run into cfg.train.output_dir; returns that directory."""
    t = cfg.train
    if t.init_from is not None:
        raise ConfigError("train.stage 'qformer' starts from scratch: train.init_from must be null")
    if cfg.vision.unfreeze_last:
        raise ConfigError("train.stage 'qformer' reads cached features: vision.unfreeze_last must be 0")
    with training_run(cfg, resume, overwrite) as start:
        random.seed(t.seed)
        np.random.seed(t.seed)
        model, vision = build_stage1(cfg)
        device = training_device()
        model.to(device)  # the frozen embedding table too: every batch is moved to the model's device
        print(f"device: {device_description(device)}; precision: float32")
        data = load_split_features(cfg, FeatureCache(cache_dir() / "features", vision), splits=("train", "val"))
        train_split, val_split = data["train"], data["val"]
        if len(train_split.pairs) < t.batch_size:
            raise ValueError(f"train.batch_size {t.batch_size} exceeds the {len(train_split.pairs)} training pairs")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
        step = 0
        if start.checkpoint is not None:
            load_trainable_from(start.checkpoint, model)
            state = torch.load(start.checkpoint / STATE_FILE, weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng(state["rng"])  # ITM draws its hard negatives from torch's (CUDA's on a GPU)
            step = state["step"]
            truncate_metrics(start.run_dir / METRICS_FILE, step)
            print(f"resumed from {start.checkpoint} at step {step}")
        else:
            torch.manual_seed(t.seed)
        start.clear_previous_run()
        total = sum(p.numel() for p in model.parameters())
        info = {
            "total_params": total,
            "trainable_params": sum(p.numel() for p in params),
            "stage": "qformer",
            "device": device_description(device),
            "precision": Precision(t.mixed_precision, "no", "stage 1 trains in float32").as_record(),
        }
        start.write_record(info)
        print(
            f"stage 1: {len(train_split.pairs)} training pairs, {info['trainable_params']:,} trainable parameters; "
            f"losses: {', '.join(k for k in ('itc', 'itm', 'itg') if getattr(cfg.qformer_stage1, k))}"
        )
        fit_stage1(cfg, model, optimizer, scheduler, train_split, val_split, step)
    return start.run_dir


def fit_stage1(cfg, model, optimizer, scheduler, train_split, val_split, step: int) -> None:
    t = cfg.train
    run_dir = Path(t.output_dir)
    metrics = run_dir / METRICS_FILE
    if step == 0:
        write_atomic(metrics, "")

    def log(record: dict) -> None:
        append_whole(metrics, json.dumps(record) + "\n")

    per_epoch = len(train_split.pairs) // t.batch_size
    if step == 0 and val_split.pairs:
        log({"step": 0, **validation_losses(model, val_split, t.batch_size, t.eval_batches)})
    model.train()
    running: dict[str, float] = {}
    running_n, started = 0, time.time()
    progress = tqdm(total=t.max_steps, initial=step, desc="stage 1", unit="step")
    while step < t.max_steps:
        epoch, into = divmod(step, per_epoch)
        order = epoch_order(len(train_split.pairs), t.seed, epoch)
        indices = order[into * t.batch_size : (into + 1) * t.batch_size]
        out = model(*batch_of(train_split, indices))
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(
                f"non-finite stage-1 loss at step {step + 1}: { ({k: v.item() for k, v in out.items()}) }"
            )
        optimizer.zero_grad()
        out["loss"].backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        progress.update(1)
        for k, v in out.items():
            running[k] = running.get(k, 0.0) + v.item()
        running_n += 1
        if step % t.log_every == 0 or step == t.max_steps:
            record = {"step": step, "train_loss": running.pop("loss") / running_n}
            record.update({f"train_{k}": v / running_n for k, v in running.items()})
            record["temperature"] = model.stage1.temperature.item()
            record["lr"] = scheduler.get_last_lr()[0]
            record["samples_per_s"] = running_n * t.batch_size / max(time.time() - started, 1e-9)
            log(record)
            progress.set_postfix(loss=f"{record['train_loss']:.3f}")
            running, running_n, started = {}, 0, time.time()
        if (step % t.eval_every == 0 or step == t.max_steps) and val_split.pairs:
            record = {"step": step, **validation_losses(model, val_split, t.batch_size, t.eval_batches)}
            log(record)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k != "step"))
        if step % t.save_every == 0 or step == t.max_steps:
            epoch_now, into_now = divmod(step, per_epoch)
            data_state = {"batches_per_epoch": per_epoch, "epoch": epoch_now, "batches_into_epoch": into_now}
            save_checkpoint(run_dir, model, optimizer, scheduler, step, data_state)
    progress.close()
    print(f"stage-1 run saved to {run_dir}")
