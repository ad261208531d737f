"""`mhmoe reproduce english`: Dense vs SMoE vs X-MoE vs MH-MoE under one budget (docs/paper-notes.md §5).

The five models of `mhmoe.experiments.common`, trained on the same batches for the same tokens per seed; each run
is then evaluated and its routing analysed on held-out text (and on an unseen corpus with `ood`: the papers
measured activation on another distribution, docs/paper-notes.md §7). Writes results.json, results.md,
val_curves.png and heatmaps/ in `out`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.analysis.plots import plot_curves
from mhmoe.analysis.routing import DEFAULT_ACTIVATION_THRESHOLD
from mhmoe.analysis.runs import analyze_run, load_run
from mhmoe.data import Corpus, data_cache_dir, load_documents, tokenize_corpus
from mhmoe.experiments.common import (
    Variant,
    copy_figure,
    effective_cell,
    experts_cell,
    fmt,
    mean_of,
    metric_curve,
    model_fields,
    run_fields,
    run_variants,
    seed_stats,
    split_bands,
    variants,
    write_results,
)
from mhmoe.models.gpt import gpt_cost
from mhmoe.train.config import RunConfig, apply_overrides, preset
from mhmoe.train.lm import train

ANALYSIS_KEYS = ("activation_ratio", "effective_experts", "effective_fraction")


def base(quick: bool, gpu: bool) -> RunConfig:
    """The shared budget, from the `gpu` / `cpu` presets (their model sizes; the variants set the FFNs).

    quick: minutes on 2 CPU cores (pipeline demo, docs/paper-notes.md §7); gpu: one H200, ~10 M tokens per model.
    """
    if gpu:
        return apply_overrides(preset("gpu"), [
            "model.ffn.moe.num_experts=8", "train.batch_size=64", "train.max_steps=320", "train.warmup_steps=30",
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
        "model.ffn.moe.expert_hidden=1024", "data.vocab_size=8192", "train.max_steps=2000", "train.warmup_steps=100",
        "train.lr=1.5e-3", "train.eval_every=200", "train.eval_batches=20", "train.checkpoint_every=500",
    ])  # fmt: skip


def models(cfg: RunConfig) -> list[Variant]:
    return variants(cfg.model.d_model, cfg.model.ffn)


def ood_tokens(path: str, tokenizer: Any) -> dict[str, np.ndarray]:
    """All text of another corpus (never trained on), however small, tokenized with the run's tokenizer."""
    if not path:
        return {}
    corpus = Corpus(train=[], valid=[], test=load_documents(path), source=str(path))
    return {"ood": tokenize_corpus(corpus, tokenizer, data_cache_dir(), progress=False)["test"]}


def loaded_data(run_dir: Path) -> dict | None:
    """The record of the data a run used (source, content hash, sizes), from its summary.json."""
    return json.loads((run_dir / "summary.json").read_text()).get("data")


def run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    data: str = "",
    overrides: list[str] | None = None,
    progress: bool = True,
    ood: str = "",
) -> dict:
    """Train every model for every seed, analyse routing (also on the `ood` corpus, if given), write the results."""
    cfg = base(quick, gpu)
    cfg.data.path = data
    apply_overrides(cfg, overrides or [])
    started = time.perf_counter()

    def run_seed(variant: Variant, seed: int, run_cfg: RunConfig, run_dir: Path) -> dict:
        result = train(run_cfg, run_dir, progress=progress)
        loaded = load_run(run_dir)  # once: its model, tokenizer and data serve both analyses
        other = ood_tokens(ood, loaded.tokenizer)
        analysis = analyze_run(run_dir, other=other, max_batches=8 if quick else 20, run=loaded)
        if seed == 0:
            copy_figure(run_dir / "analysis" / "heatmap-valid.png", out / "heatmaps" / f"{variant.name}.png")
        return {
            "seed": seed,
            "val_ppl": result.valid["ppl"],
            "test_ppl": result.test["ppl"],
            "val_loss": result.valid["loss"],
            "val_tokens": result.valid["tokens"],
            "test_tokens": result.test["tokens"],
            "tokens_seen": result.tokens_seen,
            "train_seconds": result.train_seconds,
            "train_cpu_seconds": result.cpu_seconds,
            "data": loaded_data(run_dir),
            "analysis": analysis.get("valid"),
            "analysis_ood": analysis.get("ood"),
            "curves": {"val_loss": metric_curve(run_dir)},
        }

    results_by_model, curves = run_variants(cfg, models(cfg), seeds, out, run_seed, aggregate)
    results = {
        "task": "english",
        "models": results_by_model,
        "budget": cfg.to_dict(),
        "data": next(iter(results_by_model.values()))["seeds"][0]["data"],  # every model read the same data
        "ood_data": ood or None,
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(out, results, table)
    mean, bands = split_bands(curves["val_loss"])
    plot_curves(mean, out / "val_curves.png", "validation loss (English)", bands=bands)
    return results


def aggregate(variant: Variant, cfg: RunConfig, runs: list[dict]) -> dict:
    """A model's results.json entry: size and cost, perplexities (mean and std over seeds), routing, the seeds."""
    entry = {**model_fields(variant, gpt_cost(cfg.model)), **seed_stats(runs, ("val_ppl", "test_ppl"))}
    entry["activation_ratio"] = mean_of(runs, "analysis", "activation_ratio")
    entry["activation_threshold"] = mean_of(runs, "analysis", "threshold")
    entry["effective_experts"] = mean_of(runs, "analysis", "effective_experts")
    entry["effective_fraction"] = mean_of(runs, "analysis", "effective_fraction")
    for key in ANALYSIS_KEYS:
        entry[f"{key}_ood"] = mean_of(runs, "analysis_ood", key)
    return {**entry, **run_fields(runs)}


def table(results: dict) -> str:
    """The results as a markdown table with a note on what each column measures."""
    ood = any(m.get("activation_ratio_ood") is not None for m in results["models"].values())
    header = (
        "| model | matching | experts × hidden | params total | params active | MFLOPs/token | val ppl | test ppl "
        "| activation | eff. experts |"
        + (" activation (ood) | eff. experts (ood) |" if ood else "")
        + " tokens/model | train s (CPU s) |"
    )
    lines = [header, "|---|---|---|" + "---:|" * (header.count("|") - 4)]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for name, m in results["models"].items():
        n = len(m["seeds"])
        extra = (
            f" {pct(m['activation_ratio_ood'])} | {effective_cell(m['effective_experts_ood'], m['effective_fraction_ood'])} |"
            if ood
            else ""
        )
        lines.append(
            f"| {name} | {m['matching']} | {experts_cell(m)} | {m['params_total'] / 1e6:.2f} M "
            f"| {m['params_active'] / 1e6:.2f} M | {m['flops_per_token'] / 1e6:.2f} "
            f"| {fmt(m['val_ppl'], m['val_ppl_std'], n)} | {fmt(m['test_ppl'], m['test_ppl_std'], n)} "
            f"| {pct(m['activation_ratio'])} | {effective_cell(m['effective_experts'], m['effective_fraction'])} |{extra} "
            f"{m['tokens_seen']:,} | {m['train_seconds']:.0f} ({_cpu_seconds(m)}) |"
        )
    seeds = len(next(iter(results["models"].values()))["seeds"])
    first = next(iter(results["models"].values()))["seeds"][0]
    scope = (
        f"perplexity over the first {first['val_tokens']:,} / {first['test_tokens']:,} tokens of the held-out "
        f"valid / test documents (train.final_eval_batches={results['budget']['train']['final_eval_batches']}; "
        "`mhmoe eval RUN --max-batches` with that number gives the same values, without it all of each split)"
        if first.get("test_tokens") and results["budget"]["train"]["final_eval_batches"]
        else "perplexity over all of the held-out valid / test documents"
    )
    note = (
        f"{seeds} seed(s){' (mean ± std)' if seeds > 1 else ''}; {scope}; activation = "
        f"share of (layer, expert) cells chosen by more than {DEFAULT_ACTIVATION_THRESHOLD:.0%} of the layer's "
        "(sub-)tokens; eff. experts = exp(entropy of the expert shares), mean over MoE layers (% of E)"
    )
    if ood:
        note += f"; (ood) = measured on {results.get('ood_data')}, text the models never saw"
    data = results.get("data")
    if data:
        note += f"; data: {data['source']} (sha256 {data['sha256'][:12]}…)"
    note += "; train s: wall time, CPU s: process CPU time of the training steps (steadier on a busy machine)"
    return "\n".join(lines + ["", note + "."])


def _cpu_seconds(model: dict) -> str:
    values = [s["train_cpu_seconds"] for s in model["seeds"] if s.get("train_cpu_seconds") is not None]
    return f"{statistics.fmean(values):.0f}" if values else "-"
