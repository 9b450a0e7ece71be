"""Training throughput on REAL captions: the step's variants side by side in one process, against the limit.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [RECIPE.yaml] [--set key=value ...]
        [--data 'coco:$VLMLAB_DATA/coco2017-val'] [--images 400] [--steps 20] [--compile] [--record NAME]

Arms (one optimizer step each, on the same model):
- naive: the seed-style step: the frozen encoder runs in the loop on pixels, every caption padded to
  data.max_caption_tokens, logits on every position (HF's `labels=` path);
- current: cached image tokens, random batches padded to their longest caption, logits only where a
  token is supervised (vlm.py), i.e. `data.batch_by_length: false`;
- bucketed: the same step on batches of similar caption length (data/batching.py, `data.batch_by_length: true`);
- bucketed, bf16 autocast: under CPU bf16 autocast (fast only where the CPU runs bfloat16 natively:
  AVX512-BF16 / AMX; `train.mixed_precision: auto` picks it only there, train/precision.py);
- bucketed, fused AdamW: the optimizer's fused CPU kernel instead of its foreach one;
- bucketed, torch.compile (--compile): the model's forward compiled by inductor (dynamic shapes).

The arms are timed round-robin (one step of each in turn) so that load from other processes hits all alike.
Printed first: the CPU (model, the flags that set its speed), threads, and the measured float32 and bfloat16
GEMM peaks. Per arm: samples/s, GFLOP per sample (torch's FLOP counter on one forward + backward), MFU
(achieved FLOP/s over the peak of the arm's precision, or float32's where higher), the share of computed token
positions that are real, and the ratio to the naive step. Then whether each lever keeps the step exact (same
loss, gradients and update as the bucketed step). --record NAME writes results/NAME.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from machine_limits import gemm_peak, hardware_line, write_record
from vlmlab.config import expand_data_root, load_config
from vlmlab.data.batching import LengthBucketBatchSampler, pair_lengths
from vlmlab.data.formats import load_captions, load_image
from vlmlab.model.language_model import base_causal_lm
from vlmlab.model.sequence import IGNORE_INDEX, build_training_batch, caption_token_ids
from vlmlab.model.vlm import build_vlm
from vlmlab.train.loop import build_optimizer


def naive_step(model, pixels, captions, width: int):
    """Encoder in the loop, every row padded to `width` text tokens, the vocabulary head on every position."""
    cfg = model.cfg
    ids = [caption_token_ids(model.tokenizer, c, cfg.lm.chat_format, cfg.data.max_caption_tokens) for c in captions]
    text = build_training_batch(model.prompt_ids, ids, model.specials.end_id, model.specials.pad_id)
    pad = width - text.input_ids.shape[1]
    text.input_ids = torch.nn.functional.pad(text.input_ids, (0, pad), value=model.specials.pad_id)
    text.attention_mask = torch.nn.functional.pad(text.attention_mask, (0, pad), value=0)
    text.labels = torch.nn.functional.pad(text.labels, (0, pad), value=IGNORE_INDEX)
    with torch.no_grad():
        image_tokens = model.vision(pixels.float())
    embeds, mask, labels = model._embed(model.visual_tokens(image_tokens), text)
    return base_causal_lm(model.lm)(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss, text


def forward_backward(model, name: str, forward, rows: list, pairs: list, pixels, features, width: int):
    """One arm's loss on the batch of pair indices `rows`, backpropagated; returns the text batch it ran."""
    captions = [pairs[j][1] for j in rows]
    if name == "naive":
        loss, text = naive_step(model, pixels[[pairs[j][0] for j in rows]], captions, width)
    else:
        text = model.text_batch(captions)
        loss = forward(features[[pairs[j][0] for j in rows]], text)
    loss.backward()
    return text


def limit(peaks: dict, dtype: str) -> float:
    """The matmul rate an arm is measured against: its precision's peak, or float32's where that is higher (a CPU
    without bfloat16 instructions multiplies bf16 far slower than float32: its bf16 'peak' is no limit)."""
    return max(peaks[dtype], peaks["float32"])


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def one_update(model, make_optimizer, forward) -> tuple[torch.Tensor, list, list]:
    """(loss, gradients, weights after one optimizer step) from the current weights, which are then put back."""
    saved = [p.detach().clone() for p in trainable(model)]
    optimizer = make_optimizer()
    loss = forward()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable(model)]
    optimizer.step()
    optimizer.zero_grad()
    after = [p.detach().clone() for p in trainable(model)]
    with torch.no_grad():
        for p, v in zip(trainable(model), saved):
            p.copy_(v)
    return loss.detach(), grads, after


def difference(a: list, b: list) -> str:
    """'identical' (bit for bit) or the largest absolute difference."""
    if all(torch.equal(x, y) for x, y in zip(a, b)):
        return "identical"
    return f"max |diff| {max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b)):.2e}"


def exactness(model, arms: dict, features, text) -> dict[str, str]:
    """Each lever's loss, gradients and first AdamW update against the bucketed float32 step on one batch, with
    dropout off so that only the arithmetic differs."""
    model.eval()
    reference = one_update(model, arms["bucketed"]["optimizer"], lambda: model(features, text))
    report = {}
    for name, arm in arms.items():
        if name in ("naive", "current", "bucketed"):
            continue
        other = one_update(model, arm["optimizer"], functools.partial(arm["forward"], features, text))
        report[name] = (
            f"loss {difference([reference[0]], [other[0]])}; gradients {difference(reference[1], other[1])}; "
            f"update {difference(reference[2], other[2])}"
        )
    model.train()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="recipes/photos-mini.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data", default="coco:$VLMLAB_DATA/coco2017-val", help="$VLMLAB_DATA: the data root")
    parser.add_argument("--images", type=int, default=400, help="training images whose captions are batched")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm (FLOPs are counted on them)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile arm (minutes to compile)")
    parser.add_argument("--record", metavar="NAME", help="write the figures to results/NAME.json")
    args = parser.parse_args()
    print(hardware_line(), flush=True)
    peaks = {"float32": gemm_peak(torch.float32), "bfloat16": gemm_peak(torch.bfloat16)}
    print(f"GEMM peak (1024^3 matmul): float32 {peaks['float32']:.1f} GFLOP/s, bfloat16 {peaks['bfloat16']:.1f}")

    cfg = load_config(args.config, args.set)
    model = build_vlm(cfg).train()
    b = cfg.train.batch_size
    samples = load_captions(expand_data_root(args.data, "--data"), seed=cfg.data.split_seed)["train"]
    samples = random.Random(0).sample(samples, min(args.images, len(samples)))
    pixels = torch.stack([model.vision.preprocess([load_image(s.image_path)])[0] for s in samples]).half()
    start = time.perf_counter()
    with torch.no_grad():
        features = torch.cat([model.vision(pixels[i : i + 32].float()) for i in range(0, len(pixels), 32)])
    encode_rate = len(samples) / (time.perf_counter() - start)
    pairs = [(row, c) for row, s in enumerate(samples) for c in s.captions]
    lengths = pair_lengths(model.tokenizer, pairs)
    order = list(range(len(pairs)))
    random.Random(cfg.train.seed).shuffle(order)
    shuffled = [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
    bucketed = list(LengthBucketBatchSampler(lengths, b, seed=cfg.train.seed))

    def bf16(feats, text):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(feats, text)

    foreach = lambda: build_optimizer(model, cfg)  # noqa: E731 - what training uses
    fused = lambda: build_optimizer(model, cfg, fused=True)  # noqa: E731
    arms = {  # name -> batches, forward, optimizer factory, precision of its matmuls
        "naive": {"batches": shuffled, "forward": None, "optimizer": foreach, "peak": "float32"},
        "current": {"batches": shuffled, "forward": model, "optimizer": foreach, "peak": "float32"},
        "bucketed": {"batches": bucketed, "forward": model, "optimizer": foreach, "peak": "float32"},
        "bucketed, bf16 autocast": {"batches": bucketed, "forward": bf16, "optimizer": foreach, "peak": "bfloat16"},
        "bucketed, fused AdamW": {"batches": bucketed, "forward": model, "optimizer": fused, "peak": "float32"},
    }
    if args.compile:
        compiled = torch.compile(model, dynamic=True)
        arms["bucketed, torch.compile"] = {
            "batches": bucketed,
            "forward": compiled,
            "optimizer": foreach,
            "peak": "float32",
        }
    for arm in arms.values():
        arm["instance"] = arm["optimizer"]()
    width = len(model.prompt_ids) + cfg.data.max_caption_tokens + 1
    num_visual = model.num_visual_tokens

    print(f"encoded {len(samples)} images; timing {args.warmup} + {args.steps} steps per arm", flush=True)
    times = {k: [] for k in arms}
    real, computed = dict.fromkeys(arms, 0), dict.fromkeys(arms, 0)
    warm_flops, warm_positions = dict.fromkeys(arms, 0), dict.fromkeys(arms, 0)
    first_step = dict.fromkeys(arms, 0.0)
    for i in range(args.warmup + args.steps):
        for name, arm in arms.items():
            rows = arm["batches"][i % len(arm["batches"])]
            counting = i < args.warmup and "compile" not in name  # inductor's kernels escape the counter
            counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
            start = time.perf_counter()
            with counter:
                text = forward_backward(model, name, arm["forward"], rows, pairs, pixels, features, width)
            if counting:
                warm_flops[name] += counter.get_total_flops()
            arm["instance"].step()
            arm["instance"].zero_grad()
            positions = text.input_ids.numel() + b * num_visual
            if i == 0:
                first_step[name] = time.perf_counter() - start  # torch.compile compiles here
            if i < args.warmup:
                warm_positions[name] += positions
            else:
                times[name].append(time.perf_counter() - start)
                real[name] += int(text.attention_mask.sum()) + b * num_visual
                computed[name] += positions

    print(
        f"batch {b}, {args.steps} timed steps per arm; {len(pairs)} real captions of {len(samples)} {args.data} "
        f"training images; {num_visual} visual tokens + prompt {len(model.prompt_ids)}; "
        f"frozen encoder {encode_rate:.1f} images/s"
    )
    rows = {}
    for name, arm in arms.items():
        rate = b * len(times[name]) / sum(times[name])
        counted = name if warm_flops[name] else "bucketed"  # the same arithmetic, run another way
        per_position = warm_flops[counted] / warm_positions[counted]
        flops = per_position * computed[name] / (b * len(times[name]))  # per sample, over the timed batches
        rows[name] = {
            "samples/s": round(rate, 2),
            "GFLOP/sample": round(flops / 1e9, 2),
            "MFU": round(rate * flops / (limit(peaks, arm["peak"]) * 1e9), 3),
            "real tokens / computed": round(real[name] / computed[name], 3),
        }
    for name in rows:
        rows[name]["x naive"] = round(rows[name]["samples/s"] / rows["naive"]["samples/s"], 2)
    print("| step | samples/s | GFLOP/sample | MFU | real tokens / computed | x naive |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(v) for v in row.values()) + " |")

    rows0 = bucketed[0]
    exact = exactness(
        model, arms, features[[pairs[j][0] for j in rows0]], model.text_batch([pairs[j][1] for j in rows0])
    )
    for name, verdict in exact.items():
        print(f"{name} vs bucketed float32: {verdict}")
    if args.record:
        write_record(
            args.record,
            "benchmark",
            f"Training step variants on {len(pairs)} real captions ({args.config}, batch {b}, {num_visual} visual "
            "tokens), timed round-robin in one process, against the measured GEMM peak.",
            {
                "training step": rows,
                "GEMM peak (GFLOP/s)": {"1024^3 matmul": {k: round(v, 1) for k, v in peaks.items()}},
            },
            {"frozen encoder images/s": round(encode_rate, 1)}
            | {f"first step, {name} (s)": round(first_step[name], 1) for name in arms if "compile" in name},
            notes="; ".join(f"{name}: {verdict}" for name, verdict in exact.items())
            + ". FLOPs counted by torch.utils.flop_counter on the warm-up steps, per computed token position.",
        )


if __name__ == "__main__":
    main()
