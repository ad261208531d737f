"""Activation memory of every expert execution, the Triton kernels included, measured on the CPU.

    python benchmarks/activation_memory.py --out benchmarks/results/NAME.json [--shapes cpu-mhmoe-64e,...]

What autograd keeps for the backward does not depend on the device (`mhmoe.bench.saved_activation_bytes`),
so the Triton kernels' memory can be measured here, by one forward under TRITON_INTERPRET=1 (about a
minute per shape), while their speed needs a GPU. Writes MiB and the ratio to dense-eq for each shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

from mhmoe.bench import SHAPES, dense_equivalent, saved_activation_bytes  # noqa: E402

IMPLS = {  # name -> (dispatch, recompute)
    "grouped_mm": ("grouped_mm", False),
    "grouped_mm-recompute": ("grouped_mm", True),
    "triton": ("triton", False),
    "triton-recompute": ("triton", True),
}


def measure(name: str) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(shape.tokens, shape.d_model)
    reference = shape.build("reference")
    dense = saved_activation_bytes(dense_equivalent(reference, shape.d_model, shape.activation), x) / 2**20
    rows = [dict(impl="dense-eq", activation_mib=dense, activation_vs_dense=1.0)]
    for impl, (dispatch, recompute) in IMPLS.items():
        layer = shape.build(dispatch, recompute)
        layer.load_state_dict(reference.state_dict())
        mib = saved_activation_bytes(layer, x) / 2**20
        rows.append(dict(impl=impl, activation_mib=mib, activation_vs_dense=mib / dense))
    return dict(name=name, results=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="cpu-mhmoe-16e,cpu-mhmoe-64e,cpu-smoe-64e")
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args()
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    report = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, benchmarks=[])
    print("| shape | impl | activations MiB | × dense-eq |\n|---|---|---:|---:|")
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        bench = measure(name)
        report["benchmarks"].append(bench)
        for r in bench["results"]:
            print(f"| {name} | {r['impl']} | {r['activation_mib']:.1f} | {r['activation_vs_dense']:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
