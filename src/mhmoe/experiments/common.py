"""What the reproductions share: the five models of the comparison, the models × seeds driver, aggregation over
seeds, curves, and writing results.json / results.md.

The five models (NAME in results.json), sized from a base model configuration (its `ffn.moe` gives E, top-k and
the expert hidden F):
    dense         FFN hidden `ffn.hidden` in every block
    smoe          softmax top-k SMoE, E experts of hidden F, in every `moe_every`-th block
    xmoe          the same with the X-MoE router
    mhmoe_params  MH-MoE (X-MoE router, H = 4), same E and top-k, hidden solved for equal total parameters
                  (v1; about H× the expert FLOPs)
    mhmoe_flops   MH-MoE (X-MoE router, H = 4), hidden solved for equal FLOPs per token and E raised for about
                  equal total parameters (v2)
Every model trains on the same batches for the same number of steps per seed.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhmoe.analysis.compare import metric_curve as metric_curve  # re-exported for the experiments
from mhmoe.io import write_json, write_text
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.routers import RouterConfig
from mhmoe.models.cost import Cost, flops_matched_mhmoe, params_matched_mhmoe
from mhmoe.models.ffn import FFNConfig, FFNKind

MH_HEADS = 4
Curve = list[tuple[float, float]]  # (x, y) points, x in tokens (or input positions)


@dataclass
class Variant:
    name: str
    matching: str  # "baseline", "params" (v1) or "flops" (v2)
    ffn: FFNConfig


def variants(d_model: int, ffn: FFNConfig) -> list[Variant]:
    """The five models of the comparison (module doc), from a base model's width and FFN section."""
    moe = ffn.moe

    def ffn_of(kind: FFNKind, config: MoEConfig) -> FFNConfig:
        return FFNConfig(kind=kind, hidden=ffn.hidden, activation=ffn.activation, moe_every=ffn.moe_every, moe=config)

    base = dataclasses.replace(moe.routed_part(), num_shared_experts=0, shared_expert_hidden=None)
    smoe = dataclasses.replace(base, router=RouterConfig(kind="softmax"))
    xmoe = dataclasses.replace(base, router=RouterConfig(kind="xmoe"))
    params = params_matched_mhmoe(d_model, xmoe, num_heads=MH_HEADS, hidden_multiple=32)
    flops = flops_matched_mhmoe(
        d_model, xmoe, num_heads=MH_HEADS, top_k=moe.top_k, hidden_multiple=32, experts_multiple=4
    )
    return [
        Variant("dense", "baseline", ffn_of("dense", smoe)),
        Variant("smoe", "baseline", ffn_of("smoe", smoe)),
        Variant("xmoe", "baseline", ffn_of("smoe", xmoe)),
        Variant("mhmoe_params", "params", ffn_of("mhmoe", params)),
        Variant("mhmoe_flops", "flops", ffn_of("mhmoe", flops)),
    ]


def variant_seeds(base: Any, variant: Variant, seeds: int, out: Path) -> Iterator[tuple[int, Any, Path]]:
    """(seed, config, run directory) of each seed of a variant: the shared budget `base` (any run configuration
    with model.ffn and train.seed) with the variant's FFN and the seed; each run is announced on stdout."""
    for seed in range(seeds):
        cfg = copy.deepcopy(base)
        cfg.model.ffn = copy.deepcopy(variant.ffn)
        cfg.train.seed = seed
        run_dir = out / "runs" / f"{variant.name}-seed{seed}"
        print(f"== {variant.name} (seed {seed}) -> {run_dir}", flush=True)
        yield seed, cfg, run_dir


RunSeed = Callable[[Variant, int, Any, Path], dict]  # (variant, seed, config, run dir) -> the seed's record
Aggregate = Callable[[Variant, Any, list[dict]], dict]  # (variant, config, seed records) -> results.json entry


def run_variants(
    base: Any, models: Sequence[Variant], seeds: int, out: Path, run_seed: RunSeed, aggregate: Aggregate
) -> tuple[dict[str, dict], dict[str, dict[str, tuple[Curve, list]]]]:
    """Train and analyse every model for every seed; returns ({name: aggregate}, {curve key: {name: (mean curve,
    band)}}). A seed's record holds "curves": {key: points} (left out of the aggregate's "seeds")."""
    results: dict[str, dict] = {}
    curves: dict[str, dict[str, tuple[Curve, list]]] = {}
    for variant in models:
        runs, cfg = [], base
        for seed, cfg, run_dir in variant_seeds(base, variant, seeds, out):
            runs.append(run_seed(variant, seed, cfg, run_dir))
        results[variant.name] = aggregate(variant, cfg, runs)
        for key in runs[0]["curves"]:
            points = [r["curves"][key] for r in runs]
            if all(points):
                curves.setdefault(key, {})[variant.name] = mean_curve(points)
    return results, curves


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
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def write_results(out: Path, results: dict, table: Callable[[dict], str]) -> None:
    """results.json and results.md (the table) in `out`."""
    write_json(out / "results.json", results)
    write_text(out / "results.md", table(results) + "\n")


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


def effective_cell(value: float | None, fraction: float | None) -> str:
    return "-" if value is None or fraction is None else f"{value:.2f} ({100 * fraction:.0f}%)"


def split_bands(curves: dict[str, tuple[Curve, list]]) -> tuple[dict[str, Curve], dict[str, list]]:
    """{name: (mean, band)} -> ({name: mean}, {name: band}), as `plot_curves` takes them."""
    return {k: v[0] for k, v in curves.items()}, {k: v[1] for k, v in curves.items()}
