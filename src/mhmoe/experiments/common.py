"""What the reproductions share: the models of the comparison, the models × seeds driver, aggregation over seeds,
paired statistics, curves, and writing results.json / results.md.

The models (NAME in results.json), sized from a base model configuration (its `ffn.moe` gives E, top-k and the
expert hidden F); every one trains on the same batches for the same number of steps per seed.

The paper's models, in two parts: `part="core"` is v2's comparison at equal FLOPs per token, `part="params"` v1's
at equal parameters (its MH-MoE costs about H× the expert FLOPs, so it is a part of its own):
    dense                FFN hidden `ffn.hidden` in every block                                  (core, params)
    smoe                 softmax top-k SMoE, E experts of hidden F, in every `moe_every`-th block (core)
    xmoe                 the same with the X-MoE router                                          (core, params)
    mhmoe_flops          MH-MoE (X-MoE router, H = 4), hidden solved for equal FLOPs per token and E raised for
                         about equal total parameters (v2)                                      (core)
    mhmoe_params         MH-MoE (X-MoE router, H = 4), same E and top-k, hidden solved for equal total parameters
                         (v1)                                                                    (params)
The controls (`part="controls"`): `mhmoe_flops` against `xmoe` changes three things at once (the head split, the
granularity — H·K expert calls of smaller experts instead of K — and X-MoE's routing dimension 16/H); each control
changes one, all at equal FLOPs per token and about equal parameters, all with the softmax router of `smoe`:
    smoe_fine            fine-grained SMoE at MH-MoE's granularity: E·H experts, top-(K·H), hidden for equal FLOPs
    mhmoe_flops_softmax  `mhmoe_flops` with the softmax router (the router of its SMoE baseline)
    mhmoe_h1             MH-MoE with H = 1: head and merge layers only, no split
    mhmoe_nohm           MH-MoE with H = 4 and no head or merge layer: the split alone
The controls part includes `smoe`, their reference in the paired statistics (`paired_table`); `all` is every model
once. Parts run into the same output folder share their common models (finished runs are reused).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from mhmoe.analysis.compare import metric_curve as metric_curve  # re-exported for the experiments
from mhmoe.analysis.stats import paired_difference
from mhmoe.errors import DataError
from mhmoe.io import atomic_write, write_json, write_text
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.routers import RouterConfig
from mhmoe.models.cost import Cost, SizeMatchError, fine_grained_smoe, flops_matched_mhmoe, params_matched_mhmoe
from mhmoe.models.ffn import FFNConfig, FFNKind

MH_HEADS = 4
Curve = list[tuple[float, float]]  # (x, y) points, x in tokens (or input positions)


@dataclass
class Variant:
    name: str
    matching: str  # "baseline", "params" (v1) or "flops" (v2)
    ffn: FFNConfig


Part = Literal["core", "params", "controls", "heads", "all"]
PARTS: tuple[str, ...] = get_args(Part)
CORE = ("dense", "smoe", "xmoe", "mhmoe_flops")
PARAMS = ("dense", "xmoe", "mhmoe_params")
CONTROLS = ("smoe", "smoe_fine", "mhmoe_flops_softmax")  # granularity, at one router (softmax)
HEADS = ("smoe", "mhmoe_flops_softmax", "mhmoe_h1", "mhmoe_nohm")  # the head split and the head / merge layers
PART_MODELS = {
    "core": CORE,
    "params": PARAMS,
    "controls": CONTROLS,
    "heads": HEADS,
    "all": tuple(dict.fromkeys(CORE + PARAMS + CONTROLS + HEADS)),
}
BASELINES = ("smoe", "xmoe", "smoe_fine")  # the sparse baselines a model is compared with (the best one)
# (model, its control, what the pair isolates): every model but one thing the same, FLOPs per token equal
ATTRIBUTION = (
    ("mhmoe_flops_softmax", "smoe", "MH-MoE against SMoE, both with the softmax router"),
    ("mhmoe_flops_softmax", "smoe_fine", "what MH-MoE adds to SMoE of the same granularity (experts and sizes)"),
    (
        "mhmoe_flops_softmax",
        "mhmoe_h1",
        "splitting into 4 heads (at equal FLOPs: 4× the expert calls), given the layers",
    ),
    ("mhmoe_flops_softmax", "mhmoe_nohm", "the head and merge layers, given the split into 4 heads"),
    ("mhmoe_flops", "mhmoe_flops_softmax", "the X-MoE router against softmax, given MH-MoE"),
    ("mhmoe_flops", "xmoe", "MH-MoE against X-MoE, both with the X-MoE router"),
)


def variants(d_model: int, ffn: FFNConfig, part: Part = "core") -> list[Variant]:
    """The models of the comparison (module doc), from a base model's width and FFN section."""
    moe = ffn.moe

    def ffn_of(kind: FFNKind, config: MoEConfig) -> FFNConfig:
        return FFNConfig(kind=kind, hidden=ffn.hidden, activation=ffn.activation, moe_every=ffn.moe_every, moe=config)

    def flops_matched(base: MoEConfig, heads: int) -> MoEConfig:
        return sized(flops_matched_mhmoe, d_model, base, num_heads=heads, top_k=K, experts_multiple=4)

    K = moe.top_k
    base = dataclasses.replace(moe.routed_part(), num_shared_experts=0, shared_expert_hidden=None)
    smoe = dataclasses.replace(base, router=RouterConfig(kind="softmax"))
    xmoe = dataclasses.replace(base, router=RouterConfig(kind="xmoe"))
    unprojected = dataclasses.replace(smoe, multi_head_layers=0, merge_layers=0)
    models = {
        "dense": Variant("dense", "baseline", ffn_of("dense", smoe)),
        "smoe": Variant("smoe", "baseline", ffn_of("smoe", smoe)),
        "xmoe": Variant("xmoe", "baseline", ffn_of("smoe", xmoe)),
        "mhmoe_params": Variant(
            "mhmoe_params",
            "params",
            ffn_of("mhmoe", sized(params_matched_mhmoe, d_model, xmoe, num_heads=MH_HEADS)),
        ),
        "mhmoe_flops": Variant("mhmoe_flops", "flops", ffn_of("mhmoe", flops_matched(xmoe, MH_HEADS))),
    }
    if part in ("controls", "heads", "all"):
        fine = sized(fine_grained_smoe, d_model, smoe, granularity=MH_HEADS)
        models.update(
            smoe_fine=Variant("smoe_fine", "flops", ffn_of("smoe", fine)),
            mhmoe_flops_softmax=Variant("mhmoe_flops_softmax", "flops", ffn_of("mhmoe", flops_matched(smoe, MH_HEADS))),
            mhmoe_h1=Variant("mhmoe_h1", "flops", ffn_of("mhmoe", flops_matched(smoe, 1))),
            mhmoe_nohm=Variant("mhmoe_nohm", "flops", ffn_of("mhmoe", flops_matched(unprojected, MH_HEADS))),
        )
    return [models[name] for name in PART_MODELS[part]]


def sized(solver: Callable[..., MoEConfig], d_model: int, base: MoEConfig, **options: Any) -> MoEConfig:
    """The solver's sizes with expert_hidden a multiple of 32, or of 16 or 8 where 32 cannot meet the match within
    its tolerance (toy widths); where the solver also rounds the expert count (`experts_multiple`) and no hidden
    multiple meets the match, any expert count is tried last (H = 1 at equal FLOPs raises 8 experts to 9). The
    last SizeMatchError when none can."""
    attempts = [dict(hidden_multiple=multiple) for multiple in (32, 16, 8)]
    if options.get("experts_multiple", 1) != 1:
        attempts += [dict(hidden_multiple=multiple, experts_multiple=1) for multiple in (32, 16, 8)]
    for attempt in attempts:
        try:
            return solver(d_model, base, **{**options, **attempt})
        except SizeMatchError as error:
            last = error
    raise last


def variant_seeds(
    base: Any, variant: Variant, seeds: int, out: Path, progress: JobProgress | None = None
) -> Iterator[tuple[int, Any, Path]]:
    """(seed, config, run directory) of each seed of a variant: the shared budget `base` (any run configuration
    with model.ffn and train.seed) with the variant's FFN and the seed; each run is announced on stdout, with the
    job's progress when given."""
    for seed in range(seeds):
        cfg = copy.deepcopy(base)
        cfg.model.ffn = copy.deepcopy(variant.ffn)
        cfg.train.seed = seed
        run_dir = out / "runs" / f"{variant.name}-seed{seed}"
        where = f"{variant.name} (seed {seed}) -> {run_dir}"
        print(f"== {progress.start(run_dir) if progress else ''}{where}", flush=True)
        yield seed, cfg, run_dir


class JobProgress:
    """The overall line of a job of several runs: "run i of N", the time elapsed, and the time left, estimated as
    the mean wall time of the runs trained so far times the runs still to train (a run already finished in the
    output folder is reused in a moment, so it counts as neither)."""

    def __init__(self, run_dirs: Sequence[Path], clock: Callable[[], float] = time.monotonic) -> None:
        self.total = len(run_dirs)
        self.to_train = {d for d in run_dirs if not (d / "summary.json").is_file()}
        self.clock = clock
        self.begun = clock()
        self.index = 0
        self.trained_seconds: list[float] = []
        self._current: tuple[Path, float] | None = None

    def start(self, run_dir: Path) -> str:
        """Close the previous run and open `run_dir`'s; returns the progress text to print before it."""
        self._close()
        self.index += 1
        self._current = (run_dir, self.clock())
        elapsed = self._current[1] - self.begun
        left = len(self.to_train)
        if not left:
            estimate = "nothing left to train"
        elif self.trained_seconds:
            estimate = f"about {clock_time(statistics.mean(self.trained_seconds) * left)} left"
        else:
            estimate = "time left known after the first run"
        return f"run {self.index} of {self.total} ({clock_time(elapsed)} elapsed, {estimate}): "

    def _close(self) -> None:
        if self._current is not None and self._current[0] in self.to_train:
            self.to_train.discard(self._current[0])
            self.trained_seconds.append(self.clock() - self._current[1])


def clock_time(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


RunSeed = Callable[[Variant, int, Any, Path], dict]  # (variant, seed, config, run dir) -> the seed's record
Aggregate = Callable[[Variant, Any, list[dict]], dict]  # (variant, config, seed records) -> results.json entry


def run_variants(
    base: Any, models: Sequence[Variant], seeds: int, out: Path, run_seed: RunSeed, aggregate: Aggregate
) -> tuple[dict[str, dict], dict[str, dict[str, tuple[Curve, list]]]]:
    """Train and analyse every model for every seed; returns ({name: aggregate}, {curve key: {name: (mean curve,
    band)}}). A seed's record holds "curves": {key: points} (left out of the aggregate's "seeds")."""
    results: dict[str, dict] = {}
    curves: dict[str, dict[str, tuple[Curve, list]]] = {}
    progress = JobProgress([out / "runs" / f"{v.name}-seed{seed}" for v in models for seed in range(seeds)])
    for variant in models:
        runs, cfg = [], base
        for seed, cfg, run_dir in variant_seeds(base, variant, seeds, out, progress):
            runs.append(run_seed(variant, seed, cfg, run_dir))
        results[variant.name] = aggregate(variant, cfg, runs)
        for key in runs[0]["curves"]:
            points = [r["curves"][key] for r in runs]
            if all(points):
                curves.setdefault(key, {})[variant.name] = mean_curve(points)
    return results, curves


class Clock:
    """Wall and CPU seconds of a run's phases, lap by lap: {"train": {"wall": s, "cpu": s}, ...}. CPU time is
    this process's (all threads), so on a busy machine it stays meaningful where wall time does not."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall": wall - self._wall, "cpu": cpu - self._cpu}
        self._wall, self._cpu = wall, cpu


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class PlannedModel:
    """One model of a reproduction's plan, per seed: its size, forward FLOPs per token and the tokens it reads."""

    name: str
    params_total: int
    flops_per_token: int  # forward; training counts 3× (forward and backward)
    steps: int
    train_tokens: int
    eval_tokens: int  # forward only: periodic and final evaluations and the routing analysis


def planned_model(name: str, cost: Cost, train: Any, per_batch: int, extra_eval_tokens: int) -> PlannedModel:
    """A model of a plan from its cost and the training budget `train` (a TrainConfig): `per_batch` tokens per
    micro-batch, every periodic and final evaluation (a whole split counted as `eval_batches`) plus
    `extra_eval_tokens` (the routing analyses)."""
    evaluations = train.max_steps // train.eval_every * train.eval_batches
    evaluations += 2 * (train.final_eval_batches or train.eval_batches)  # validation and test
    return PlannedModel(
        name=name,
        params_total=cost.params_total,
        flops_per_token=cost.flops_per_token,
        steps=train.max_steps,
        train_tokens=train.max_steps * train.grad_accum * per_batch,
        eval_tokens=evaluations * per_batch + extra_eval_tokens,
    )


@dataclass(frozen=True)
class Assumptions:
    """What a `--dry-run` time estimate assumes; none of it is measured on the machine that will run the plan.

    The defaults are for one H200 (`--gpu`): 100 TFLOP/s is a guess that no run has checked yet. `cpu()` holds
    the rates measured on the 2-core CI machine by the committed `--quick` evidence runs (results/*/README.md)."""

    tflops: float = 100.0  # sustained model FLOP/s while training, in TFLOP/s
    run_overhead_s: float = 6.0  # per run: building the model, checkpoints, figures, the routing analysis
    fixed_s: float = 30.0  # per invocation: starting up, the shared tokenizer, tokenising the data once

    @classmethod
    def cpu(cls, tflops: float | None = None) -> "Assumptions":
        """2 idle CPU cores, 2 threads: the default `reproduce english --quick` trained at 0.073 (dense) to 0.078
        (MH-MoE) TFLOP/s and took 333 s in all (2026-12-03); one thread beside another job sustains 0.026-0.042."""
        return cls(tflops=tflops or 0.075, run_overhead_s=10.0, fixed_s=30.0)

    def seconds(self, model: PlannedModel) -> float:
        flops = 3 * model.flops_per_token * model.train_tokens + model.flops_per_token * model.eval_tokens
        return flops / (self.tflops * 1e12) + self.run_overhead_s


def finished_seeds(out: Path, name: str, seeds: int) -> int:
    """How many of a model's seeds already finished in `out` (their runs are reused, not trained again)."""
    return sum((out / "runs" / f"{name}-seed{seed}" / "summary.json").is_file() for seed in range(seeds))


def plan_markdown(task: str, models: Sequence[PlannedModel], seeds: int, out: Path, assume: Assumptions) -> str:
    """The plan of a reproduction (models, steps, tokens, seeds, runs already done in `out`) and its estimated
    wall time from FLOPs at the stated assumptions."""
    lines = [
        f"plan: reproduce {task}, {len(models)} models × {seeds} seeds, output {out}",
        "",
        "| model | params total | MFLOPs/token | steps | tokens/seed | eval tokens/seed | seeds to run | est. s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = assume.fixed_s
    for m in models:
        todo = seeds - finished_seeds(out, m.name, seeds)
        seconds = todo * assume.seconds(m)
        total += seconds
        lines.append(
            f"| {m.name} | {m.params_total / 1e6:.1f} M | {m.flops_per_token / 1e6:.1f} | {m.steps} "
            f"| {m.train_tokens / 1e6:.2f} M | {m.eval_tokens / 1e6:.2f} M | {todo} | {seconds:.0f} |"
        )
    lines += [
        "",
        f"estimated wall time: {total / 60:.1f} min ({total:.0f} s), assuming {assume.tflops:g} TFLOP/s sustained "
        f"(training counts 3× the forward FLOPs), {assume.run_overhead_s:g} s per run beside the FLOPs and "
        f"{assume.fixed_s:g} s per invocation; an assumption, not a measurement (`mhmoe bench train` measures "
        "a machine's rate)",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; no spread (None) from one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def model_fields(variant: Variant, cost: Cost) -> dict:
    """What a model is: its matching, size and cost."""
    ffn = variant.ffn
    moe = ffn.kind != "dense"
    return {
        "matching": variant.matching,
        "params_total": cost.params_total,
        "params_active": cost.params_active,
        "flops_per_token": cost.flops_per_token,
        "num_experts": ffn.moe.num_experts if moe else 0,
        "expert_hidden": ffn.moe.expert_hidden if moe else ffn.hidden,
    }


def seed_stats(runs: Sequence[dict], keys: Sequence[str]) -> dict:
    """key and key_std: mean and standard deviation over the seeds that have the key (None when none has it)."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key], out[f"{key}_std"] = mean_std(values) if values else (None, None)
    return out


def mean_of(runs: Sequence[dict], which: str, key: str) -> float | None:
    """Mean over seeds of runs[i][which][key], for the seeds that have a `which` report."""
    values = [r[which][key] for r in runs if r.get(which)]
    return statistics.fmean(values) if values else None


def run_fields(runs: Sequence[dict]) -> dict:
    """Tokens per model, mean training time, and the seeds' records (without their curves)."""
    return {
        "tokens_seen": runs[0]["tokens_seen"],
        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
        "seeds": [{k: v for k, v in r.items() if k != "curves"} for r in runs],
    }


def paired_table(models: dict[str, dict], key: str, baselines: Sequence[str] = BASELINES) -> dict[str, dict]:
    """Per model, the paired per-seed difference of `key` (a log-scale value such as a mean loss, one per seed in
    each model's "seeds") to `dense` and to the best sparse baseline (lowest mean among `baselines` present):
    {model: {"vs_dense": PairedDifference dict, "vs_baseline": ..., "baseline": name}}. Seeds pair by number."""

    def per_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in models[name]["seeds"] if r.get(key) is not None}

    present = [b for b in baselines if b in models and per_seed(b)]
    best = min(present, key=lambda b: statistics.fmean(per_seed(b).values())) if present else None
    table: dict[str, dict] = {}
    for name in models:
        row: dict[str, Any] = {"baseline": best}
        for label, other in (("vs_dense", "dense"), ("vs_baseline", best)):
            if other is None or other == name or other not in models:
                continue
            a, b = per_seed(name), per_seed(other)
            seeds = sorted(set(a) & set(b))
            if seeds:
                row[label] = paired_difference([a[s] for s in seeds], [b[s] for s in seeds]).to_dict()
        table[name] = row
    return table


def attribution_table(models: dict[str, dict], key: str) -> list[dict]:
    """The pairs of `ATTRIBUTION` whose two models both ran: [{"model", "control", "isolates", "difference":
    PairedDifference dict of `key` (model − control, per seed)}]."""

    def per_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in models[name]["seeds"] if r.get(key) is not None}

    rows = []
    for model, control, isolates in ATTRIBUTION:
        if model not in models or control not in models:
            continue
        a, b = per_seed(model), per_seed(control)
        seeds = sorted(set(a) & set(b))
        if seeds:
            difference = paired_difference([a[s] for s in seeds], [b[s] for s in seeds]).to_dict()
            rows.append({"model": model, "control": control, "isolates": isolates, "difference": difference})
    return rows


def attribution_markdown(rows: list[dict], what: str) -> str:
    """The attribution pairs as markdown (empty when no pair ran: run `--part all`, or the parts into one --out)."""
    if not rows:
        return ""
    lines = [f"| model − control | isolates | {what} change | seeds to resolve 3% |", "|---|---|---:|---:|"]
    for row in rows:
        d = row["difference"]
        needed = "-" if d.get("seeds_for_3pct") is None else str(d["seeds_for_3pct"])
        lines.append(f"| {row['model']} − {row['control']} | {row['isolates']} | {_paired_cell(d)} | {needed} |")
    return "\n".join(lines)


def _paired_cell(d: dict | None) -> str:
    if not d:
        return "-"
    text = f"{d['mean_pct']:+.1f}%"
    if d["low_pct"] is not None:
        text += f" [{d['low_pct']:+.1f}, {d['high_pct']:+.1f}]"
    text += f" ({d['sign_holds']}/{d['seeds']})"
    return text + (" **resolved**" if d["resolved"] else "")


def paired_markdown(paired: dict[str, dict], what: str) -> str:
    """The paired table: per model, the mean change of perplexity against dense and the best baseline with its
    95% interval and the seeds in which its sign holds; "resolved" when the interval excludes 0; and the seeds
    that would resolve a 3% difference at the spread these seeds show (`PairedDifference.seeds_for`)."""

    cell = _paired_cell

    def seeds_for(d: dict | None) -> str:
        return "-" if not d or d.get("seeds_for_3pct") is None else str(d["seeds_for_3pct"])

    baseline = next((row["baseline"] for row in paired.values() if row.get("baseline")), None)
    versus = baseline or "best sparse baseline"
    lines = [
        f"| model | {what} vs dense | {what} vs {versus} | seeds to resolve 3% (vs dense, vs {versus}) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in paired.items():
        dense, base = row.get("vs_dense"), row.get("vs_baseline")
        lines.append(f"| {name} | {cell(dense)} | {cell(base)} | {seeds_for(dense)}, {seeds_for(base)} |")
    return "\n".join(lines)


def mean_curve(curves: Sequence[Curve]) -> tuple[Curve, list[tuple[float, float, float]]]:
    """The mean of several curves (at the points all have) and its min–max band."""
    points = min(len(c) for c in curves)
    mean, band = [], []
    for i in range(points):
        xs, ys = curves[0][i][0], [c[i][1] for c in curves]
        mean.append((xs, statistics.fmean(ys)))
        band.append((xs, min(ys), max(ys)))
    return mean, band


# ------------------------------------------------------------------------------------------------ output


def copy_figure(source: Path, target: Path) -> None:
    """A figure a run wrote, copied into the results folder (if the run made it)."""
    if source.exists():
        with atomic_write(target, "wb") as f:
            f.write(source.read_bytes())


def write_results(out: Path, results: dict, table: Callable[[dict], str]) -> None:
    """results.json and results.md (the table) in `out`."""
    write_json(out / "results.json", results)
    write_text(out / "results.md", table(results) + "\n")


def retabulate(
    out: Path,
    table: Callable[[dict], str],
    keys: Sequence[str],
    baselines: Sequence[str] = BASELINES,
    attribution: bool = True,
) -> dict:
    """The statistics and tables of a finished reproduction recomputed from its results.json (the per-seed values
    it holds), by this version of mhmoe: results.json and results.md rewritten, nothing trained or evaluated."""
    path = out / "results.json"
    if not path.is_file():
        raise DataError(f"{out} holds no results.json: run the reproduction into it first, or pass the --out that does")
    try:
        results = json.loads(path.read_text())
        models = results["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} is not a reproduction's results ({error}): restore it or run the reproduction again"
        ) from None
    results["paired"] = {key: paired_table(models, key, baselines) for key in keys}
    if attribution:
        results["attribution"] = {key: attribution_table(models, key) for key in keys}
    write_results(out, results, table)
    return results


def fmt(mean: float | None, std: float | None, seeds: int, digits: int = 2) -> str:
    """ "mean ± std" (std only with several seeds), "-" for a missing value."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 and std is not None else f"{mean:.{digits}f}"


def experts_cell(model: dict) -> str:
    return (
        f"{model['num_experts']} × {model['expert_hidden']}"
        if model["num_experts"]
        else f"dense {model['expert_hidden']}"
    )


def pct_cell(value: float | None) -> str:
    """A fraction as a whole percentage, "-" when missing."""
    return "-" if value is None else f"{100 * value:.0f}%"


def num_cell(value: float | None) -> str:
    """A number with two decimals, "-" when missing."""
    return "-" if value is None else f"{value:.2f}"


def effective_cell(value: float | None, fraction: float | None) -> str:
    return "-" if value is None or fraction is None else f"{value:.2f} ({100 * fraction:.0f}%)"


def split_bands(curves: dict[str, tuple[Curve, list]]) -> tuple[dict[str, Curve], dict[str, list]]:
    """{name: (mean, band)} -> ({name: mean}, {name: band}), as `plot_curves` takes them."""
    return {k: v[0] for k, v in curves.items()}, {k: v[1] for k, v in curves.items()}
