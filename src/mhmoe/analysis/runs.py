"""Reading finished language-model runs back: the model at its latest checkpoint, evaluation (also per language),
and the routing analysis of a run directory."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.analysis.plots import plot_activation_heatmap, plot_divergence_histogram, plot_head_usage
from mhmoe.analysis.routing import LayerRouting, expert_shares, head_usage, subtoken_divergence, summarize
from mhmoe.data import eval_batches
from mhmoe.data.multilingual import bits_per_byte, languages_of, split_key, target_bytes, token_byte_lengths
from mhmoe.io import notice, write_json
from mhmoe.layers.moe import MoELayer
from mhmoe.models.gpt import GPT
from mhmoe.train.checkpoint import load_model_weights, read_json, run_checkpoint
from mhmoe.train.config import RunConfig
from mhmoe.train.lm import check_data, data_path, evaluate, prepare_data
from mhmoe.train.loop import autocast_for, resolve_device


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: GPT
    tokenizer: Any
    splits: dict[str, np.ndarray]
    device: torch.device
    step: int


def load_run(run_dir: Path, progress: bool = False) -> LoadedRun:
    """The model of a run directory at its latest checkpoint, with its tokenizer and data. The held-out splits
    must be the ones it was trained with (by sha256, `check_data`); a run whose checkpoint recorded no digests
    (older mhmoe) gets a line saying they could not be checked."""
    config, checkpoint = run_checkpoint(run_dir)
    cfg = RunConfig.from_dict(config)
    device = resolve_device(cfg.train.device)
    tokenizer, splits = prepare_data(cfg, run_dir, progress)
    state = read_json(checkpoint / "state.json", "trainer state")
    held_out = sorted(name for name in splits if not name.startswith("train"))
    if not check_data(state.get("data_sha256"), splits, held_out, data_path(cfg)):
        notice(f"{checkpoint} records no digest of its data (older mhmoe): the held-out data was not checked")
    model = GPT(cfg.model)
    load_model_weights(checkpoint, model)
    return LoadedRun(cfg, model.to(device).eval(), tokenizer, splits, device, state["step"])


def eval_run(run_dir: Path) -> dict:
    """Loss and perplexity on the valid and test splits; for a multilingual run also per language ("languages")
    and averaged over languages ("language_average"), with bits per byte."""
    run = load_run(run_dir)
    results: dict[str, Any] = {"step": run.step}
    for split in ("valid", "test"):
        results[split] = evaluate(run.model, run.splits[split], run.cfg, run.device)
    if run.cfg.data.multilingual:
        results["languages"] = evaluate_languages(run)
        results["language_average"] = language_averages(results["languages"])
    return results


def evaluate_languages(
    run: LoadedRun, max_batches: int = 0, splits: tuple[str, ...] = ("valid", "test")
) -> dict[str, dict]:
    """{lang: {"<split>_loss", "<split>_ppl", "<split>_bpb", "<split>_tokens", "<split>_bytes"}} of a loaded run.

    Each language's split is read from its start (`max_batches` batches, 0 = all of it); bits per byte divide
    the summed loss by the UTF-8 bytes of exactly the tokens predicted (`target_bytes`).
    """
    lengths = token_byte_lengths(run.tokenizer)
    report: dict[str, dict] = {}
    for lang in languages_of(run.splits):
        row = report.setdefault(lang, {})
        for split in splits:
            tokens = run.splits[split_key(split, lang)]
            r = evaluate(run.model, tokens, run.cfg, run.device, max_batches=max_batches)
            nbytes = target_bytes(run.tokenizer, tokens[1 : 1 + r["tokens"]], lengths)  # the targets evaluated
            row.update(
                {
                    f"{split}_loss": r["loss"],
                    f"{split}_ppl": r["ppl"],
                    f"{split}_bpb": bits_per_byte(r["loss"] * r["tokens"], nbytes),
                    f"{split}_tokens": r["tokens"],
                    f"{split}_bytes": nbytes,
                }
            )
    return report


def language_averages(per_language: dict[str, dict]) -> dict[str, float]:
    """Languages weigh equally: ppl = exp(mean loss over languages), bpb = mean bpb; plus the pooled bpb."""
    out = {}
    for split in ("val", "test"):
        key = "valid" if split == "val" else "test"
        rows = list(per_language.values())
        out[f"{split}_loss"] = statistics.fmean(r[f"{key}_loss"] for r in rows)
        out[f"{split}_ppl"] = math.exp(min(out[f"{split}_loss"], 50.0))
        out[f"{split}_bpb"] = statistics.fmean(r[f"{key}_bpb"] for r in rows)
        nats = sum(r[f"{key}_loss"] * r[f"{key}_tokens"] for r in rows)
        out[f"{split}_bpb_pooled"] = nats / (sum(r[f"{key}_bytes"] for r in rows) * math.log(2))
    return out


@torch.no_grad()
def collect_routing(run: LoadedRun, tokens: np.ndarray, max_batches: int = 20) -> list:
    """Per MoE layer, the routing of every (sub-)token in the first `max_batches` held-out batches."""
    moe_blocks = [(i + 1, b.ffn) for i, b in enumerate(run.model.blocks) if isinstance(b.ffn, MoELayer)]
    per_layer: list[list] = [[] for _ in moe_blocks]
    for x, _ in eval_batches(tokens, run.cfg.train.batch_size, run.cfg.model.seq_len, max_batches=max_batches):
        with autocast_for(run.cfg.train.precision, run.device):
            out = run.model(x.to(run.device))
        for stats_list, stats in zip(per_layer, out.routing):
            stats_list.append(stats)
    layers = []
    for (block, layer), stats_list in zip(moe_blocks, per_layer, strict=True):
        layers.append(LayerRouting.from_stats(stats_list, layer.num_heads, layer.num_experts, f"block {block}"))
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
    write_json(out_dir / "analysis.json", report)
    return report
