"""Generation and question-scoring speed: captions (greedy / beams, one image at a time / batched) and POPE-style
yes/no scores, on real photos, against the forward pass's FLOP limit.

    OMP_NUM_THREADS=2 python benchmarks/generation_throughput.py [RECIPE.yaml | RUN_DIR] [--set key=value ...]
        [--data 'coco:$VLMLAB_DATA/coco2017-mini'] [--images 16] [--record NAME]

A RUN_DIR (a trained run) gives real captions; a recipe gives its untrained model (LoRA starts at zero, so the
LM writes as the base model does from a random connector): the speed is the same arithmetic. Image tokens are
encoded once, outside the timings. Arms:
- caption, greedy / 8 beams, batch 1 / batched: VLM.generate_from_tokens, HF generate with its KV cache (the
  counted FLOPs are one forward per position; transformers 5 ignores `use_cache=False` there, so there is no
  no-cache arm to compare);
- yes/no score, batch 1 / batched: VLM.reply_logprobs, one forward pass per question (how POPE is ranked), from
  the image's path as `vlmlab eval --task pope` asks it (reading and encoding the photo included).
Per arm: images/s, generated tokens/s (tokens of the returned text + END), GFLOP per image (torch's FLOP
counter on the first call) and MFU against the measured float32 GEMM peak. Batched captions are compared with
the batch-1 ones (same settings): a lever that changes outputs is not a speed-up. Asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from machine_limits import gemm_peak, hardware_line, write_record
from vlmlab.config import expand_data_root, load_config
from vlmlab.data.formats import load_captions, load_image
from vlmlab.model.vlm import build_vlm

QUESTION = [{"role": "user", "content": "<image>\nIs there a person in the image? Answer with yes or no."}]


def load_model(source: str, overrides: list[str]):
    if Path(source, "config.yaml").exists():
        from vlmlab.run import load_run

        return load_run(source)
    return build_vlm(load_config(source, overrides))


def timed(fn, batches: list) -> tuple[float, list, int]:
    """(seconds, outputs, FLOPs of the first batch) of fn over the batches, in order."""
    with FlopCounterMode(display=False) as counter:
        first = fn(batches[0])
    flops = counter.get_total_flops()
    start = time.perf_counter()
    out = list(first) + [x for batch in batches[1:] for x in fn(batch)]
    seconds = (time.perf_counter() - start) * len(batches) / max(1, len(batches) - 1)  # the first was counted
    return seconds, out, flops * len(batches)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", nargs="?", default="recipes/photo-captions.yaml", help="a recipe or a run folder")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--data", default="coco:$VLMLAB_DATA/coco2017-mini", help="$VLMLAB_DATA: the data root")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--record", metavar="NAME", help="write the figures to results/NAME.json")
    args = parser.parse_args()
    print(hardware_line(), flush=True)
    peak = gemm_peak(torch.float32)
    print(f"GEMM peak (1024^3 matmul): float32 {peak:.1f} GFLOP/s")

    model = load_model(args.source, args.set).eval()
    samples = load_captions(expand_data_root(args.data, "--data"))["test"][: args.images]
    with torch.no_grad():
        tokens = model.encode_images([load_image(s.image_path) for s in samples])
    n, b = len(samples), args.batch
    one = [tokens[i : i + 1] for i in range(n)]
    batched = [tokens[i : i + b] for i in range(0, n, b)]

    def captions(beams: int):
        return functools.partial(model.generate_from_tokens, num_beams=beams)

    def yes_no(images):  # image paths: reply_logprobs reads and encodes them, as `vlmlab eval --task pope` does
        return model.reply_logprobs(images, [QUESTION] * len(images), [["yes", "Yes"], ["no", "No"]]).tolist()

    paths = [s.image_path for s in samples]
    arms = {
        "caption, greedy, batch 1": (captions(1), one),
        f"caption, greedy, batch {b}": (captions(1), batched),
        "caption, 8 beams, batch 1": (captions(8), one),
        f"caption, 8 beams, batch {b}": (captions(8), batched),
        "yes/no score, batch 1 (image read + encoded)": (yes_no, [paths[i : i + 1] for i in range(n)]),
        f"yes/no score, batch {b} (image read + encoded)": (yes_no, [paths[i : i + b] for i in range(0, n, b)]),
    }
    rows, outputs = {}, {}
    print("| arm | images/s | tokens/s | GFLOP/image | MFU |\n| --- | --- | --- | --- | --- |")
    for name, (fn, batches) in arms.items():
        seconds, out, flops = timed(fn, batches)
        outputs[name] = out
        generated = sum(len(model.tokenizer(c)["input_ids"]) + 1 for c in out) if name.startswith("caption") else n
        rows[name] = {
            "images/s": round(n / seconds, 2),
            "tokens/s": round(generated / seconds, 1),
            "GFLOP/image": round(flops / n / 1e9, 3),
            "MFU": round(flops / seconds / (peak * 1e9), 4),
        }
        print(f"| {name} | " + " | ".join(str(v) for v in rows[name].values()) + " |", flush=True)
    same = {
        f"greedy batch {b} = batch 1": outputs[f"caption, greedy, batch {b}"] == outputs["caption, greedy, batch 1"],
        f"8 beams batch {b} = batch 1": outputs[f"caption, 8 beams, batch {b}"] == outputs["caption, 8 beams, batch 1"],
    }
    margins = torch.tensor(outputs[f"yes/no score, batch {b} (image read + encoded)"]) - torch.tensor(
        outputs["yes/no score, batch 1 (image read + encoded)"]
    )
    for check, equal in same.items():
        print(f"{check}: {'identical captions' if equal else 'CAPTIONS DIFFER'}")
    print(f"yes/no log-probs, batch {b} vs 1: max |diff| {float(margins.abs().max()):.2e}")
    print("e.g.:", outputs["caption, greedy, batch 1"][0], "|", outputs["caption, 8 beams, batch 1"][0])
    if args.record:
        write_record(
            args.record,
            "benchmark",
            f"Captioning and yes/no scoring speed on {n} photos ({args.source}, "
            f"{model.num_visual_tokens} visual tokens), against the float32 GEMM peak.",
            {"generation": rows, "GEMM peak (GFLOP/s)": {"1024^3 matmul": {"float32": round(peak, 1)}}},
            {check: int(equal) for check, equal in same.items()},
            notes="1 in the values: the arms' captions are identical; tokens/s counts the returned text + END.",
        )


if __name__ == "__main__":
    main()
