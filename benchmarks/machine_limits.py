"""What a benchmark ran on and the most that machine can do: shared by the benchmark scripts.

A samples/s figure is read beside the CPU (model, the flags that decide its speed, threads) and beside the
measured matmul peak: MFU = achieved FLOP/s / that peak, the share of the machine a step uses. The peak is
measured here (a timed square GEMM), not taken from a datasheet: with 2 threads on a shared VM the datasheet
figure says little.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmlab.analysis.results import check_record, git_commit, machine
from vlmlab.run.hardware import SPEED_FLAGS, cpu_info

REPO = Path(__file__).resolve().parent.parent


def hardware_line() -> str:
    cpu = cpu_info()
    flags = " ".join(f for f in SPEED_FLAGS if f in cpu.flags) or "none of " + " ".join(SPEED_FLAGS)
    return f"{cpu.describe()}; flags: {flags}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def gemm_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 8) -> float:
    """GFLOP/s of the best of `repeats` n x n x n matmuls in `dtype`: the limit MFU is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm up (and let oneDNN pick its kernel)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def counted_flops(fn) -> int:
    """FLOPs torch counts for one call of fn (matmuls, convolutions, attention: what MFU is about)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def command_line() -> str:
    """How this benchmark was started, less its --record NAME and --note TEXT (those name and annotate the record;
    the rest reproduces the figures)."""
    args, kept = sys.argv[1:], []
    while args:
        arg = args.pop(0)
        if arg in ("--record", "--note"):
            args.pop(0)
        elif not arg.startswith(("--record=", "--note=")):
            kept.append(arg)
    script = Path(sys.argv[0]).resolve().relative_to(REPO)
    return " ".join(["OMP_NUM_THREADS=" + str(torch.get_num_threads()), "python", str(script), *kept])


def write_record(name: str, kind: str, title: str, figures: dict, values: dict, notes: str = "") -> Path:
    """results/NAME.json, written by the benchmark itself (source "run"): the figures are never typed."""
    record = {
        "name": name,
        "kind": kind,
        "title": title,
        "command": command_line(),
        "commit": git_commit(REPO),
        "date": date.today().isoformat(),
        "machine": machine(),
        "source": "run",
        "figures": figures,
        "values": values,
    }
    if notes:
        record["notes"] = notes
    path = REPO / "results" / f"{name}.json"
    check_record(record, path)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path
