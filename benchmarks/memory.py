"""Resident memory of a training run over its steps: the peak, and whether it grows.

    python benchmarks/memory.py [CONFIG.yaml] [--set key=value ...] [--steps 120]

Trains the config (default: the embedded demo config) into a scratch folder with a log record every
10 steps (the training log carries `rss_mb` and `peak_rss_mb`), then prints RSS per logged step, the
peak, and the growth from the first quarter of the run to its end. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vlmlab.config import load_config
from vlmlab.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            *args.set,
            f"train.max_steps={args.steps}",
            "train.log_every=10",
            f"train.eval_every={args.steps}",
            f"train.save_every={args.steps}",
            f"train.output_dir={out}",
        ]
        cfg = load_config(args.config, overrides)
        started = time.time()
        train(cfg)
        records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [(r["step"], r["rss_mb"], r["peak_rss_mb"]) for r in records if "rss_mb" in r]
    print(
        f"\nconfig: {args.config or 'embedded defaults'} {' '.join(args.set)}; {args.steps} steps "
        f"in {time.time() - started:.0f} s"
    )
    print(f"{'step':>6} {'RSS MiB':>9} {'peak MiB':>9}")
    for step, rss, peak in rows:
        print(f"{step:>6} {rss:>9.1f} {peak:>9.1f}")
    quarter = next(r for r in rows if r[0] >= args.steps // 4)
    print(f"peak resident memory: {rows[-1][2]:.1f} MiB")
    print(
        f"RSS growth from step {quarter[0]} to step {rows[-1][0]}: {rows[-1][1] - quarter[1]:+.1f} MiB "
        f"({(rows[-1][1] - quarter[1]) / max(rows[-1][0] - quarter[0], 1) * 100:+.2f} MiB per 100 steps)"
    )


if __name__ == "__main__":
    main()
