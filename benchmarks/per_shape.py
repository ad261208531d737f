"""The command line of the per-shape scripts in this folder (activation_memory.py, expert_gemms_cpu.py): pick
benchmark shapes, measure each, print its table rows as they come, write the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mhmoe.bench.layer import DEFAULT_SHAPES, SHAPES


def main(
    description: str,
    header: str,
    measure: Callable[..., dict],
    row: Callable[[dict], str],
    repeats: int | None = None,
) -> None:
    """measure(name[, repeats]) -> {"results": [...], ...} for one shape; row(result) -> its table cells after
    the shape's. repeats: offer --repeats with this default and pass it on to measure."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES["cpu"]), help="comma-separated shape names")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args()
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    if repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    report = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads())
    report["benchmarks"] = []
    print(header)
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        bench = measure(name) if repeats is None else measure(name, args.repeats)
        report["benchmarks"].append(bench)
        for result in bench["results"]:
            print(f"| {name} | {row(result)} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
