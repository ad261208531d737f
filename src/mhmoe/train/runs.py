"""Reading finished runs back: evaluation and routing analysis of a run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.errors import CheckpointError
from mhmoe.layers.moe import SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.models.gpt import GPT
from mhmoe.train.checkpoint import latest_checkpoint, load_model_weights, write_text_atomically
from mhmoe.train.config import RunConfig
from mhmoe.train.trainer import autocast_for, evaluate, prepare_data, resolve_device


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: GPT
    tokenizer: Any
    splits: dict[str, np.ndarray]
    device: torch.device
    step: int


def load_run(run_dir: Path, progress: bool = False) -> LoadedRun:
    """The model of a run directory at its latest checkpoint, with its tokenizer and data."""
    config = run_dir / "config.json"
    if not config.exists():
        raise CheckpointError(
            f"{run_dir} is not an mhmoe run directory (no config.json); pass the --out of a train run"
        )
    cfg = RunConfig.from_dict(json.loads(config.read_text()))
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first")
    device = resolve_device(cfg.train.device)
    tokenizer, splits = prepare_data(cfg, run_dir, progress)
    model = GPT(cfg.model)
    load_model_weights(checkpoint, model)
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    return LoadedRun(cfg, model.to(device).eval(), tokenizer, splits, device, step)


def eval_run(run_dir: Path) -> dict:
    run = load_run(run_dir)
    results = {"step": run.step}
    for split in ("valid", "test"):
        results[split] = evaluate(run.model, run.splits[split], run.cfg, run.device)
    return results


@torch.no_grad()
def collect_routing(run: LoadedRun, tokens: np.ndarray, max_batches: int = 20) -> list:
    """Per MoE layer, the routing of every (sub-)token in the first `max_batches` held-out batches."""
    from mhmoe.analysis import LayerRouting
    from mhmoe.data import eval_batches

    moe_blocks = [(i + 1, b.ffn) for i, b in enumerate(run.model.blocks) if isinstance(b.ffn, (SparseMoE, MHMoE))]
    per_layer: list[list] = [[] for _ in moe_blocks]
    for x, _ in eval_batches(tokens, run.cfg.train.batch_size, run.cfg.model.seq_len, max_batches=max_batches):
        with autocast_for(run.cfg, run.device):
            out = run.model(x.to(run.device))
        for stats_list, stats in zip(per_layer, out.routing):
            stats_list.append(stats)
    layers = []
    for (block, layer), stats_list in zip(moe_blocks, per_layer, strict=True):
        heads = layer.num_heads if isinstance(layer, MHMoE) else 1
        layers.append(LayerRouting.from_stats(stats_list, heads, layer.num_experts, f"block {block}"))
    return layers


def analyze_run(
    run_dir: Path,
    out_dir: Path | None = None,
    other: dict[str, np.ndarray] | None = None,
    max_batches: int = 20,
    run: LoadedRun | None = None,
) -> dict:
    """Routing metrics and plots on held-out text: the run's validation split, plus `other` named
    token arrays (e.g. another genre or language, tokenized with the run's tokenizer)."""
    from mhmoe.analysis import expert_shares, head_usage, subtoken_divergence, summarize
    from mhmoe.plots import plot_activation_heatmap, plot_divergence_histogram, plot_head_usage

    run = run or load_run(run_dir)
    out_dir = out_dir or run_dir / "analysis"
    if not run.model.moe_layers():
        return {"step": run.step, "note": "dense model: no routing to analyse"}
    report: dict = {"step": run.step}
    for name, tokens in {"valid": run.splits["valid"], **(other or {})}.items():
        layers = collect_routing(run, tokens, max_batches)
        shares = np.stack([expert_shares(layer) for layer in layers])
        names = [layer.name for layer in layers]
        report[name] = summarize(layers)
        plot_activation_heatmap(shares, out_dir / f"heatmap-{name}.png", f"expert share per layer ({name})", names)
        if layers[0].num_heads > 1:
            plot_head_usage(
                head_usage(layers[-1]),
                out_dir / f"head-usage-{name}.png",
                f"expert share per MH-MoE head, {names[-1]} ({name})",
            )
            divergence = {n: subtoken_divergence(layer) for n, layer in zip(names, layers)}
            plot_divergence_histogram(
                divergence, out_dir / f"divergence-{name}.png", f"distinct experts per token's sub-tokens ({name})"
            )
    write_text_atomically(out_dir / "analysis.json", json.dumps(report, indent=1) + "\n")
    return report
