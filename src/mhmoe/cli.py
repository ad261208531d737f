"""The `mhmoe` command line.

    mhmoe bench layer [--device cpu|cuda] [--dtype ...] [--shapes NAME,...|all] [--repeats N] [--json FILE]
    mhmoe sizes       the PAPER.md §4 presets with their exact parameter counts and FLOPs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _bench_layer(args: argparse.Namespace) -> int:
    import torch

    from mhmoe.bench import DEFAULT_SHAPES, SHAPES, bench_shape, environment, format_table

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mhmoe: --device cuda given but no CUDA device is available")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = _parse_shapes(args.shapes, DEFAULT_SHAPES[device.type], SHAPES)
    report = dict(environment=environment(device), dtype=str(dtype).removeprefix("torch."), benchmarks=[])
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        report["benchmarks"].append(bench_shape(name, device, dtype, args.repeats))
    print(format_table(report))
    if args.json:
        _write_json_atomically(Path(args.json), report)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _parse_shapes(spec: str | None, default: list[str], known: dict) -> list[str]:
    if spec is None:
        return default
    names = list(known) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"mhmoe: unknown shape(s) {unknown}; choose from {sorted(known)} or 'all'")
    return names


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _sizes(args: argparse.Namespace) -> int:
    from mhmoe.accounting import layer_cost, presets

    print("| preset | layer | experts | top-k | expert hidden | heads | params total | params active | GFLOPs/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (kind, kw) in presets().items():
        c = layer_cost(kind, kw)
        hidden = kw.get("expert_hidden", kw.get("hidden"))
        print(
            f"| {name} | {kind} | {kw.get('num_experts', '-')} | {kw.get('top_k', '-')} | {hidden} | "
            f"{kw.get('num_heads', '-')} | {c.params_total:,} | {c.params_active:,} | {c.flops_per_token / 1e9:.4f} |"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhmoe", description="Multi-Head Mixture-of-Experts for PyTorch")
    verbs = parser.add_subparsers(dest="verb", required=True)

    bench = verbs.add_parser("bench", help="benchmarks")
    bench_verbs = bench.add_subparsers(dest="what", required=True)
    layer = bench_verbs.add_parser("layer", help="time MoE/MH-MoE layers against dense-eq and the loop")
    layer.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    layer.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    layer.add_argument("--shapes", help="comma-separated shape names, or 'all' (default: the device's set)")
    layer.add_argument("--repeats", type=int, default=5)
    layer.add_argument("--json", help="also write the results to this JSON file")
    layer.set_defaults(run=_bench_layer)

    sizes = verbs.add_parser("sizes", help="parameter counts and FLOPs of the paper's presets")
    sizes.set_defaults(run=_sizes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        raise SystemExit(f"mhmoe: --repeats must be >= 1, got {args.repeats}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
