"""The default job's training step idle and beside a busy neighbour, at the old and the new thread defaults.

    python benchmarks/contention.py --out benchmarks/results/NAME.json [--rounds 7] [--model mhmoe_flops]
        [--variants old,new,one] [--neighbours N]

The step is one full training step (forward, backward, AdamW) of a model of `mhmoe reproduce english --quick`
(`mhmoe.bench.train_step.lm_step`). How OpenMP threads wait is fixed when torch loads, so each variant is its
own worker process, started with its environment and thread count and kept alive; the driver asks the workers
for one step each in turn (round-robin, the order rotating every round), so that whatever else the machine does
slows every variant alike. Before anything is timed, every worker's loss and parameters after one step must
agree with the first worker's (float32: thread counts change the order of sums).

Two phases: "idle" (no neighbour of ours; the load the machine already has is recorded) and "busy" (`--neighbours`
processes, default one per core, each spinning on the CPU, each ending on its own after a bounded time).
Reported per variant and phase: median wall and CPU seconds per step; the medians over rounds of the ratio
variant / old of the same round; and busy / idle (the ratio of the phase medians, since phases are not paired).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NEIGHBOUR_CAP_S = 3 * 3600  # a neighbour ends by itself at the latest after this (if this script is killed)
SPIN_BURNER = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"


def variants(cores: int) -> dict[str, dict[str, Any]]:
    """What each variant sets: the old defaults (libgomp's spinning wait, all cores), the new ones (what the
    `mhmoe` command line sets: `mhmoe.train.threads.openmp_defaults`, all cores) and the issue's work-around
    (one thread), plus spin-count variants for exploring."""
    from mhmoe.train.threads import openmp_defaults

    new = openmp_defaults({})
    return {
        "old": dict(env={}, threads=cores),
        "new": dict(env=new, threads=cores),
        "one": dict(env={}, threads=1),
        "spin10k": dict(env={"GOMP_SPINCOUNT": "10000"}, threads=cores),
    }


# ------------------------------------------------------------------------------------------------ worker


def worker(model: str, threads: int) -> None:
    """Build the step, answer 'check' with the loss and a parameter checksum, and 'step' with wall and CPU s."""
    import torch

    from mhmoe.bench.train_step import lm_step

    torch.set_num_threads(threads)
    step, parameters = lm_step(model)
    loss = float(step().detach())
    checksum = [float(p.detach().double().sum()) for p in parameters()]
    print(json.dumps(dict(loss=loss, checksum=checksum, threads=torch.get_num_threads(), omp=_omp_env())), flush=True)
    for _ in range(2):  # warm-up
        step()
    for line in sys.stdin:
        if line.strip() != "step":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        print(json.dumps(dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)), flush=True)


def _omp_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}


# ------------------------------------------------------------------------------------------------ driver


class Worker:
    def __init__(self, name: str, spec: dict, model: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
        env.update(spec["env"])
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--threads", str(spec["threads"])]
        self.name = name
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready: dict | None = None

    def read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} ended (status {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def check(workers: list[Worker]) -> float:
    """Every worker's first loss and parameters agree with the first worker's; returns the largest relative
    difference."""
    for w in workers:
        w.ready = w.read()
    first = workers[0].ready
    assert first is not None
    err = 0.0
    for w in workers[1:]:
        assert w.ready is not None
        pairs = [(w.ready["loss"], first["loss"])] + list(zip(w.ready["checksum"], first["checksum"], strict=True))
        err = max([err] + [abs(a - b) / max(abs(b), 1e-6) for a, b in pairs])
    if err > 1e-4:
        raise RuntimeError(f"the variants' first steps differ by {err:.1e} (relative): not the same computation")
    return err


def phase(workers: list[Worker], rounds: int) -> dict[str, list[dict]]:
    """`rounds` steps of each worker, round-robin, the order rotated every round."""
    steps: dict[str, list[dict]] = {w.name: [] for w in workers}
    for r in range(rounds):
        for i in range(len(workers)):
            w = workers[(i + r) % len(workers)]
            steps[w.name].append(w.step())
    return steps


def burners(count: int, seconds: float) -> list[subprocess.Popen]:
    """`count` processes spinning on the CPU, each ending by itself after `seconds` at the latest."""
    return [subprocess.Popen([sys.executable, "-S", "-c", SPIN_BURNER, str(seconds)]) for _ in range(count)]


def summarise(steps: dict[str, list[dict]], baseline: str) -> dict[str, dict]:
    out = {}
    for name, rows in steps.items():
        ratios = [r["wall"] / b["wall"] for r, b in zip(rows, steps[baseline], strict=True)]
        cpu_ratios = [r["cpu"] / b["cpu"] for r, b in zip(rows, steps[baseline], strict=True)]
        out[name] = dict(
            wall_s=statistics.median(r["wall"] for r in rows),
            cpu_s=statistics.median(r["cpu"] for r in rows),
            wall_vs_old=statistics.median(ratios),
            cpu_vs_old=statistics.median(cpu_ratios),
        )
    return out


def hardware() -> dict:
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if "model name" in line),
        platform.processor() or platform.machine(),
    )
    parallel = torch.__config__.parallel_info()
    return dict(
        cpu=model,
        cores=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        openmp=next((line.strip() for line in parallel.splitlines() if line.startswith("OpenMP")), "none"),
        parallel_backend=next((line.split(":")[1].strip() for line in parallel.splitlines() if "backend" in line), ""),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", default="mhmoe_flops", help="a model of `reproduce english --quick`")
    parser.add_argument("--variants", default="old,new,one")
    parser.add_argument("--neighbours", type=int, default=0, help="busy processes beside (0: one per core)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.model, args.threads)
    cores = os.cpu_count() or 1
    specs = variants(cores)
    names = args.variants.split(",")
    if names[0] != "old" or any(n not in specs for n in names):
        parser.error(f"--variants: 'old' first, then any of {sorted(specs)}")
    neighbours = args.neighbours or cores
    workers = [Worker(name, specs[name], args.model) for name in names]
    report: dict[str, Any] = dict(hardware=hardware(), model=args.model, rounds=args.rounds, neighbours=neighbours)
    report["variants"] = {n: specs[n] for n in names}
    try:
        report["max_rel_difference"] = check(workers)
        report["ready"] = {w.name: dict(threads=w.ready["threads"], omp=w.ready["omp"]) for w in workers if w.ready}
        results: dict[str, Any] = {}
        for name in ("idle", "busy"):
            print(f"{name} ...", file=sys.stderr, flush=True)
            load_before = os.getloadavg()
            spinning = burners(neighbours, seconds=NEIGHBOUR_CAP_S) if name == "busy" else []
            try:
                time.sleep(1.0 if spinning else 0.0)
                steps = phase(workers, args.rounds)
            finally:
                for p in spinning:
                    p.kill()
                    p.wait()
            results[name] = dict(
                load_before=load_before, load_after=os.getloadavg(), steps=steps, summary=summarise(steps, "old")
            )
        report["results"] = results
    finally:
        for w in workers:
            w.close()
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


def table(report: dict) -> str:
    lines = [
        "| variant | idle s/step | idle CPU s | busy s/step | busy CPU s | busy / idle | × old idle | × old busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    idle, busy = (report["results"][p]["summary"] for p in ("idle", "busy"))
    for name in idle:
        i, b = idle[name], busy[name]
        lines.append(
            f"| {name} | {i['wall_s']:.2f} | {i['cpu_s']:.2f} | {b['wall_s']:.2f} | {b['cpu_s']:.2f} | "
            f"{b['wall_s'] / i['wall_s']:.1f} | {i['wall_vs_old']:.2f} | {b['wall_vs_old']:.2f} |"
        )
    loads = {p: report["results"][p]["load_before"][0] for p in ("idle", "busy")}
    lines.append(f"\nload average (1 min) before: idle phase {loads['idle']:.1f}, busy phase {loads['busy']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
