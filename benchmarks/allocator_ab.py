"""Training-step time with the CLI's allocator settings (`mhmoe.train.allocator`) and with glibc's defaults.

    python benchmarks/allocator_ab.py --out benchmarks/results/NAME.json [--pairs 3] [--repeats 5] [--preset cpu]

The setting is per process and cannot be undone inside one, so each measurement is a separate
`mhmoe bench train --no-loop` process, default and tuned alternating (`--pairs` times each), so that a
noisy machine slows both alike. Writes every run's table rows and the per-setting medians of ms/step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_bench(tuned: bool, preset: str, repeats: int) -> dict:
    env = dict(os.environ, MHMOE_TUNE_MALLOC="1" if tuned else "0")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        cmd = [sys.executable, "-m", "mhmoe", "bench", "train", "--no-loop", "--preset", preset]
        cmd += ["--repeats", str(repeats), "--json", str(path)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    runs = []
    for i in range(args.pairs):
        for tuned in (False, True):
            print(f"[{i + 1}/{args.pairs}] {'tuned' if tuned else 'glibc default'} ...", file=sys.stderr, flush=True)
            report = run_bench(tuned, args.preset, args.repeats)
            runs.append(dict(tuned=tuned, allocator=report["environment"]["allocator"], results=report["results"]))
    medians = {}
    for tuned in (False, True):
        for r in runs[0]["results"]:
            key = f"{r['variant']}/{r['impl']}/{'tuned' if tuned else 'default'}"
            medians[key] = statistics.median(
                x["ms"]
                for run in runs
                if run["tuned"] == tuned
                for x in run["results"]
                if (x["variant"], x["impl"]) == (r["variant"], r["impl"])
            )
    print("| variant | impl | ms/step glibc default | ms/step tuned | speed-up |")
    print("|---|---|---:|---:|---:|")
    for r in runs[0]["results"]:
        a, b = (medians[f"{r['variant']}/{r['impl']}/{s}"] for s in ("default", "tuned"))
        print(f"| {r['variant']} | {r['impl']} | {a:.1f} | {b:.1f} | {a / b:.2f}× |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(preset=args.preset, pairs=args.pairs, medians_ms=medians, runs=runs), indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
