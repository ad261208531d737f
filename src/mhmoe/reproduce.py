"""`mhmoe reproduce english`: Dense vs SMoE vs X-MoE vs MH-MoE under one budget (PAPER.md §5).

Models (NAME in results.json):
    dense         FFN hidden 4·D in every block
    smoe          softmax top-k SMoE, E experts of hidden F, in every second block
    xmoe          the same with the X-MoE router
    mhmoe_params  MH-MoE (X-MoE router, H = 4), same E and top-k, hidden solved for equal total
                  parameters (v1; about H× the expert FLOPs)
    mhmoe_flops   MH-MoE (X-MoE router, H = 4), hidden solved for equal FLOPs per token and E raised
                  for about equal total parameters (v2)
Every model trains on the same batches for the same number of steps (same tokens) per seed.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mhmoe.accounting import flops_matched_mhmoe, params_matched_mhmoe
from mhmoe.models.gpt import FFNConfig, gpt_cost
from mhmoe.train.checkpoint import write_text_atomically
from mhmoe.train.config import RunConfig, apply_overrides, preset

MH_HEADS = 4


@dataclass
class Variant:
    name: str
    matching: str  # "baseline", "params" (v1) or "flops" (v2)
    ffn: FFNConfig


def english_variants(base: RunConfig) -> list[Variant]:
    """The five models, sized from `base.model` (its ffn gives E, top-k and the expert hidden F)."""
    D, f = base.model.d_model, base.model.ffn
    moe = dict(
        d_model=D, num_experts=f.num_experts, top_k=f.top_k, expert_hidden=f.expert_hidden, activation=f.activation
    )
    common = dict(
        hidden=f.hidden, activation=f.activation, moe_every=f.moe_every, balance_loss_coef=f.balance_loss_coef
    )
    params = params_matched_mhmoe({**moe, "router": "xmoe"}, num_heads=MH_HEADS, hidden_multiple=32)
    flops = flops_matched_mhmoe(
        {**moe, "router": "xmoe"}, num_heads=MH_HEADS, top_k=f.top_k, hidden_multiple=32, experts_multiple=4
    )
    moe_fields = dict(num_experts=f.num_experts, top_k=f.top_k, expert_hidden=f.expert_hidden)
    return [
        Variant("dense", "baseline", FFNConfig(kind="dense", **common)),
        Variant("smoe", "baseline", FFNConfig(kind="smoe", router="softmax", **moe_fields, **common)),
        Variant("xmoe", "baseline", FFNConfig(kind="smoe", router="xmoe", **moe_fields, **common)),
        *(
            Variant(
                f"mhmoe_{matching}",
                matching,
                FFNConfig(
                    kind="mhmoe",
                    router="xmoe",
                    num_heads=MH_HEADS,
                    **{k: sized[k] for k in ("num_experts", "top_k", "expert_hidden")},
                    **common,
                ),
            )
            for matching, sized in (("params", params), ("flops", flops))
        ),
    ]


def english_base(quick: bool, gpu: bool) -> RunConfig:
    """The shared budget, from the `gpu` / `cpu` presets (their model sizes; the variants set the FFNs).

    quick: minutes on 2 CPU cores (pipeline demo, PAPER.md §7); gpu: one H200, ~10 M tokens per model.
    """
    if gpu:
        return apply_overrides(preset("gpu"), [
            "model.ffn.num_experts=8", "train.batch_size=64", "train.max_steps=320", "train.warmup_steps=30",
            "train.lr=1.5e-3", "train.eval_every=80", "train.checkpoint_every=320", "train.log_every=20",
            "train.compile=true",
        ])  # fmt: skip
    if quick:
        return apply_overrides(preset("cpu"), [
            "train.max_steps=300", "train.warmup_steps=20", "train.lr=3e-3", "train.eval_every=75",
            "train.eval_batches=8", "train.final_eval_batches=40", "train.checkpoint_every=300",
        ])  # fmt: skip
    return apply_overrides(preset("cpu"), [
        "model.seq_len=256", "model.d_model=256", "model.n_layers=6", "model.ffn.hidden=1024",
        "model.ffn.expert_hidden=1024", "data.vocab_size=8192", "train.max_steps=2000", "train.warmup_steps=100",
        "train.lr=1.5e-3", "train.eval_every=200", "train.eval_batches=20", "train.checkpoint_every=500",
    ])  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def val_curve(run_dir: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]


def ood_tokens(path: str, tokenizer: object) -> dict[str, np.ndarray]:
    """All text of another corpus (never trained on), tokenized with the run's tokenizer."""
    if not path:
        return {}
    from mhmoe.data import data_cache_dir, load_corpus, tokenize_corpus

    splits = tokenize_corpus(load_corpus(Path(path)), tokenizer, data_cache_dir(), progress=False)
    return {"ood": np.concatenate([splits["valid"], splits["test"], splits["train"]])}


def variant_seeds(base: Any, variant: Variant, seeds: int, out: Path) -> Iterator[tuple[int, Any, Path]]:
    """(seed, config, run directory) of each seed of a variant: the shared budget `base` (a RunConfig or a
    MaskedRunConfig) with the variant's FFN and the seed; each run is announced on stdout."""
    for seed in range(seeds):
        cfg = copy.deepcopy(base)
        cfg.model.ffn = copy.deepcopy(variant.ffn)
        cfg.train.seed = seed
        run_dir = out / "runs" / f"{variant.name}-seed{seed}"
        print(f"== {variant.name} (seed {seed}) -> {run_dir}", flush=True)
        yield seed, cfg, run_dir


def copy_figure(source: Path, target: Path) -> None:
    """A figure a run wrote, copied into the results folder (if the run made it)."""
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def reproduce_english(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    data: str = "",
    overrides: list[str] | None = None,
    progress: bool = True,
    ood: str = "",
) -> dict:
    """Train every variant for every seed, analyse routing (also on the `ood` corpus, if given: PAPER.md §7
    measures activation on text from another distribution), write results.json / results.md / plots."""
    from mhmoe.plots import plot_curves
    from mhmoe.train.runs import analyze_run, load_run
    from mhmoe.train.trainer import train

    base = english_base(quick, gpu)
    base.data.path = data
    apply_overrides(base, overrides or [])
    started = time.perf_counter()
    models: dict[str, dict] = {}
    curves, bands = {}, {}
    for variant in english_variants(base):
        runs = []
        for seed, cfg, run_dir in variant_seeds(base, variant, seeds, out):
            result = train(cfg, run_dir, progress=progress)
            run = load_run(run_dir)  # once: its model, tokenizer and data serve both analyses
            other = ood_tokens(ood, run.tokenizer)
            analysis = analyze_run(run_dir, other=other, max_batches=8 if quick else 20, run=run)
            runs.append(
                {
                    "seed": seed,
                    "val_ppl": result.val_ppl,
                    "test_ppl": result.test_ppl,
                    "val_loss": result.val_loss,
                    "tokens_seen": result.tokens_seen,
                    "train_seconds": result.train_seconds,
                    "analysis": analysis.get("valid"),
                    "analysis_ood": analysis.get("ood"),
                    "curve": val_curve(run_dir),
                }
            )
        models[variant.name] = aggregate_runs(variant, cfg, runs)
        curves[variant.name], bands[variant.name] = mean_curve([r["curve"] for r in runs])
        copy_figure(
            out / "runs" / f"{variant.name}-seed0" / "analysis" / "heatmap-valid.png",
            out / "heatmaps" / f"{variant.name}.png",
        )
    results = {
        "task": "english",
        "models": models,
        "budget": base.to_dict(),
        "ood_data": ood or None,
        "wall_seconds": time.perf_counter() - started,
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomically(out / "results.md", results_table(results) + "\n")
    plot_curves(curves, out / "val_curves.png", "validation loss (English)", bands=bands)
    return results


def aggregate_runs(variant: Variant, cfg: RunConfig, runs: list[dict]) -> dict:
    cost = gpt_cost(cfg.model)
    val_mean, val_std = mean_std([r["val_ppl"] for r in runs])
    test_mean, test_std = mean_std([r["test_ppl"] for r in runs])

    def mean_of(key: str, which: str = "analysis") -> float | None:
        values = [r[which][key] for r in runs if r.get(which)]
        return statistics.fmean(values) if values else None

    return {
        "matching": variant.matching,
        "params_total": cost.params_total,
        "params_active": cost.params_active,
        "flops_per_token": cost.flops_per_token,
        "num_experts": variant.ffn.num_experts if variant.ffn.kind != "dense" else 0,
        "expert_hidden": variant.ffn.expert_hidden if variant.ffn.kind != "dense" else variant.ffn.hidden,
        "val_ppl": val_mean,
        "val_ppl_std": val_std,
        "test_ppl": test_mean,
        "test_ppl_std": test_std,
        "activation_ratio": mean_of("activation_ratio"),
        "activation_threshold": mean_of("threshold"),
        "effective_experts": mean_of("effective_experts"),
        "effective_fraction": mean_of("effective_fraction"),
        "activation_ratio_ood": mean_of("activation_ratio", "analysis_ood"),
        "effective_experts_ood": mean_of("effective_experts", "analysis_ood"),
        "effective_fraction_ood": mean_of("effective_fraction", "analysis_ood"),
        "tokens_seen": runs[0]["tokens_seen"],
        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
        "seeds": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
    }


def mean_curve(curves: list[list[tuple[float, float]]]) -> tuple[list, list]:
    points = min(len(c) for c in curves)
    mean, band = [], []
    for i in range(points):
        xs, ys = curves[0][i][0], [c[i][1] for c in curves]
        mean.append((xs, statistics.fmean(ys)))
        band.append((xs, min(ys), max(ys)))
    return mean, band


def results_table(results: dict) -> str:
    def fmt(mean: float, std: float, seeds: int) -> str:
        return f"{mean:.2f} ± {std:.2f}" if seeds > 1 else f"{mean:.2f}"

    ood = any(m.get("activation_ratio_ood") is not None for m in results["models"].values())
    header = (
        "| model | matching | experts × hidden | params total | params active | MFLOPs/token | val ppl | test ppl "
        "| activation | eff. experts |"
        + (" activation (ood) | eff. experts (ood) |" if ood else "")
        + " tokens/model | train s |"
    )
    lines = [header, "|---|---|---|" + "---:|" * (header.count("|") - 4)]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    def eff(value: float | None, fraction: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ({100 * fraction:.0f}%)"

    for name, m in results["models"].items():
        n = len(m["seeds"])
        experts = f"{m['num_experts']} × {m['expert_hidden']}" if m["num_experts"] else f"dense {m['expert_hidden']}"
        extra = (
            f" {pct(m['activation_ratio_ood'])} | {eff(m['effective_experts_ood'], m['effective_fraction_ood'])} |"
            if ood
            else ""
        )
        lines.append(
            f"| {name} | {m['matching']} | {experts} | {m['params_total'] / 1e6:.2f} M | {m['params_active'] / 1e6:.2f} M "
            f"| {m['flops_per_token'] / 1e6:.2f} | {fmt(m['val_ppl'], m['val_ppl_std'], n)} "
            f"| {fmt(m['test_ppl'], m['test_ppl_std'], n)} | {pct(m['activation_ratio'])} "
            f"| {eff(m['effective_experts'], m['effective_fraction'])} |{extra} {m['tokens_seen']:,} | {m['train_seconds']:.0f} |"
        )
    from mhmoe.analysis import DEFAULT_ACTIVATION_THRESHOLD

    seeds = len(next(iter(results["models"].values()))["seeds"])
    note = (
        f"{seeds} seed(s){' (mean ± std)' if seeds > 1 else ''}; perplexity on held-out documents; activation = "
        f"share of (layer, expert) cells chosen by more than {DEFAULT_ACTIVATION_THRESHOLD:.0%} of the layer's "
        "(sub-)tokens; eff. experts = exp(entropy of the expert shares), mean over MoE layers (% of E)"
    )
    if ood:
        note += f"; (ood) = measured on {results.get('ood_data')}, text the models never saw"
    return "\n".join(lines + ["", note + "."])
