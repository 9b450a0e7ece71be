"""Training throughput of a config's model (default: the embedded demo config), in samples/s.

    python benchmarks/train_throughput.py [CONFIG.yaml] [--set key=value ...] [--steps 10]

Times full optimizer steps (connector + LoRA forward, backward through the frozen LLM, AdamW) on
image tokens from the real frozen encoder and captions from the synthetic world, after warm-up
steps. Also times feature extraction by the frozen encoder. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from vlmlab.config import load_config
from vlmlab.data.synthetic import describe_scene, render_scene, sample_scene
from vlmlab.model.vlm import build_vlm
from vlmlab.train.loop import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    model = build_vlm(cfg).train()
    optimizer = build_optimizer(model, cfg)
    b = cfg.train.batch_size
    rng = random.Random(0)
    scenes = [sample_scene(rng, cfg.data.synthetic_max_objects) for _ in range(b)]
    images = [render_scene(s) for s in scenes]
    captions = [describe_scene(s, rng) for s in scenes]

    start = time.perf_counter()
    image_tokens = model.encode_images(images)
    encode_s = time.perf_counter() - start
    text = model.text_batch(captions)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {b}")
    print(
        f"sequence: {image_tokens.shape[1]} image tokens -> {model.connector.num_visual_tokens} visual tokens "
        f"+ {text.input_ids.shape[1]} text tokens (prompt {len(model.prompt_ids)})"
    )
    print(f"frozen encoder ({cfg.vision.name}): {b / encode_s:.1f} images/s")
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(image_tokens, text)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    print(f"training: {mean:.2f} s/step, {b / mean:.2f} samples/s over {args.steps} steps (loss {loss.item():.3f})")


if __name__ == "__main__":
    main()
