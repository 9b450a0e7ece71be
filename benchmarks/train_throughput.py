"""Training throughput on REAL captions, three steps side by side in one process, in samples/s.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [CONFIG.yaml] [--set key=value ...]
        [--data 'coco:$VLMLAB_DATA/coco2017-val'] [--images 400] [--steps 20]

- naive: the seed-style step: the frozen encoder runs in the loop on pixels, every caption padded to
  data.max_caption_tokens, logits on every position (HF's `labels=` path);
- current: cached image tokens, random batches padded to their longest caption, logits only where a
  token is supervised (vlm.py), i.e. `data.batch_by_length: false`;
- bucketed: the same step on batches of similar caption length (data/batching.py, `data.batch_by_length: true`);
- bucketed, bf16 autocast: that step under CPU bf16 autocast (`train.mixed_precision: bf16`; fast only where
  the CPU has bf16 instructions, e.g. AVX512-BF16 / AMX).

The three are timed round-robin (one step of each in turn) so that load from other processes hits all
alike. For each: samples/s, the share of computed token positions that are real (visual + prompt + caption
+ END, not padding), and the ratio to the naive step. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="recipes/photos-mini.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data", default="coco:$VLMLAB_DATA/coco2017-val", help="$VLMLAB_DATA: the data root")
    parser.add_argument("--images", type=int, default=400, help="training images whose captions are batched")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    model = build_vlm(cfg).train()
    optimizer = build_optimizer(model, cfg)
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
    batches = {
        "naive": [order[i : i + b] for i in range(0, len(order) - b + 1, b)],
        "current": [order[i : i + b] for i in range(0, len(order) - b + 1, b)],
        "bucketed": list(LengthBucketBatchSampler(lengths, b, seed=cfg.train.seed)),
    }
    batches["bucketed, bf16 autocast"] = batches["bucketed"]  # train.mixed_precision=bf16 (CPU autocast)
    width = len(model.prompt_ids) + cfg.data.max_caption_tokens + 1
    num_visual = model.num_visual_tokens

    print(f"encoded {len(samples)} images; timing {args.warmup} + {args.steps} steps per arm", flush=True)
    times = {k: [] for k in batches}
    real = dict.fromkeys(batches, 0)
    computed = dict.fromkeys(batches, 0)
    for i in range(args.warmup + args.steps):
        for name, arm in batches.items():
            rows, captions = arm[i % len(arm)], [pairs[j][1] for j in arm[i % len(arm)]]
            start = time.perf_counter()
            if name == "naive":
                loss, text = naive_step(model, pixels[[pairs[j][0] for j in rows]], captions, width)
            else:
                text = model.text_batch(captions)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in name):
                    loss = model(features[[pairs[j][0] for j in rows]], text)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                real[name] += int(text.attention_mask.sum()) + b * num_visual
                computed[name] += text.input_ids.numel() + b * num_visual

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {b}, {args.steps} timed steps per arm; "
        f"{len(pairs)} real captions of {len(samples)} {args.data} training images; "
        f"{num_visual} visual tokens + prompt {len(model.prompt_ids)}; frozen encoder {encode_rate:.1f} images/s"
    )
    rate = {k: b * len(v) / sum(v) for k, v in times.items()}
    print("| step | samples/s | real tokens / computed | x naive |\n| --- | --- | --- | --- |")
    for name in batches:
        print(f"| {name} | {rate[name]:.2f} | {real[name] / computed[name]:.3f} | {rate[name] / rate['naive']:.2f} |")
    print(f"bucketed / current: {rate['bucketed'] / rate['current']:.2f}x")


if __name__ == "__main__":
    main()
