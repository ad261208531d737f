"""Reading finished language-model runs back: the model at its latest checkpoint, evaluation (also per language),
and the routing analysis of a run directory."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.analysis.plots import plot_activation_heatmap, plot_divergence_histogram, plot_head_usage
from mhmoe.analysis.routing import LayerRouting, expert_shares, head_usage, subtoken_divergence, summarize
from mhmoe.data import eval_batches, load_tokenizer
from mhmoe.data.multilingual import bits_per_byte, languages_of, split_key, target_bytes, token_byte_lengths
from mhmoe.errors import DataError
from mhmoe.io import notice, write_json
from mhmoe.layers.moe import MoELayer
from mhmoe.models.gpt import GPT
from mhmoe.train.checkpoint import load_model_weights, read_json, run_checkpoint
from mhmoe.train.config import RunConfig
from mhmoe.train.lm import check_data, data_path, evaluate, prepare_data, with_bits_per_byte
from mhmoe.train.loop import autocast_for, resolve_device


@dataclass
class LoadedRun:
    """A run read back: its configuration, the model at the latest checkpoint (in eval mode, on the run's
    device), its tokenizer, the tokenized splits ({} when loaded with data=False) and the checkpoint's step."""

    cfg: RunConfig
    model: GPT
    tokenizer: Any
    splits: dict[str, np.ndarray]
    device: torch.device
    step: int


def load_run(run_dir: str | Path, progress: bool = False, data: bool = True) -> LoadedRun:
    """The model of a run directory at its latest checkpoint, with its tokenizer and (data=True) its tokenized
    splits; `mhmoe.load_run`. The held-out splits must be the ones it was trained with (by sha256, `check_data`);
    a run whose checkpoint recorded no digests (older mhmoe) gets a line saying they could not be checked.
    data=False needs only the run folder (enough for `model.generate`):

        run = mhmoe.load_run("runs/mine", data=False)
        ids = torch.tensor([run.tokenizer.encode("To be")], device=run.device)
        print(run.tokenizer.decode(run.model.generate(ids, 20, temperature=0.8, top_p=0.9)[0].tolist()))
    """
    run_dir = Path(run_dir)
    with run_checkpoint(run_dir) as (config, checkpoint):  # held while read: a training run does not prune it
        cfg = RunConfig.from_dict(config)
        state = read_json(checkpoint / "state.json", "trainer state")
        model = GPT(cfg.model)
        load_model_weights(checkpoint, model)
    device = resolve_device(cfg.train.device)
    if data:
        tokenizer, splits, _ = prepare_data(cfg, run_dir, progress)
        held_out = sorted(name for name in splits if not name.startswith("train"))
        if not check_data(state.get("data_sha256"), splits, held_out, data_path(cfg)):
            notice(f"{checkpoint} records no digest of its data (older mhmoe): the held-out data was not checked")
    else:
        tokenizer, splits = saved_tokenizer(cfg, run_dir), {}
    return LoadedRun(cfg, model.to(device).eval(), tokenizer, splits, device, state["step"])


def saved_tokenizer(cfg: RunConfig, run_dir: Path) -> Any:
    """The run's tokenizer without its data: tokenizer.json in the run, or the one data.tokenizer names."""
    if (run_dir / "tokenizer.json").exists():
        return load_tokenizer(run_dir / "tokenizer.json")
    if cfg.data.tokenizer == "bpe":
        raise DataError(f"{run_dir} has no tokenizer.json (its BPE tokenizer is made when it starts training)")
    return load_tokenizer(cfg.data.tokenizer)


def eval_run(run_dir: Path, max_batches: int = 0, progress: bool = False) -> dict:
    """Loss, perplexity and bits per byte on the valid and test splits (`mhmoe.train.lm.evaluate`: all of each
    split, or its first `max_batches` batches, as train.final_eval_batches does in training; `with_bits_per_byte`);
    for a multilingual run also per
    language ("languages") and averaged over languages ("language_average"), with bits per byte."""
    run = load_run(run_dir, progress=progress)
    results: dict[str, Any] = {"step": run.step, "max_batches": max_batches}
    for split in ("valid", "test"):
        tokens = run.splits[split]
        result = evaluate(run.model, tokens, run.cfg, run.device, max_batches, progress, split)
        results[split] = with_bits_per_byte(result, tokens, run.tokenizer)
    if run.cfg.data.multilingual:
        results["languages"] = evaluate_languages(run, max_batches)
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


RELATIVE_SHARE_MAX = 3.0  # the top of every routing heat map's colour scale (3 × the uniform share; more saturates)
RELATIVE_SHARE_LABEL = "expert share × E (1 = uniform)"


def model_label(run_dir: Path, cfg: RunConfig) -> str:
    """The name of a run's model for figure titles: its folder and its MoE layer, e.g.
    "mhmoe_flops-seed0 (mhmoe, 12 experts, top-2, H=4)"."""
    ffn = cfg.model.ffn
    if ffn.kind == "dense":
        return f"{Path(run_dir).name} (dense)"
    heads = f", H={ffn.moe.num_heads}" if ffn.kind == "mhmoe" else ""
    return f"{Path(run_dir).name} ({ffn.kind}, {ffn.moe.num_experts} experts, top-{ffn.moe.top_k}{heads})"


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
        if layer.config.per_head_experts:  # each head's own pool, its experts numbered 0..E-1 as in a shared pool
            stats_list = [s._replace(top_experts=s.top_experts % layer.num_experts) for s in stats_list]
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
    token arrays (e.g. another genre or language, tokenized with the run's tokenizer; the name labels its plots).
    Returns {"step": ..., name: {"tokens": tokens routed, **`summarize`}} (`format_analysis` prints it).

    Heat maps show each expert's share × E (1 = the uniform share 1/E) on one fixed colour scale, 0 to
    RELATIVE_SHARE_MAX, so that the heat maps of models with different expert counts compare by eye."""
    run = run or load_run(run_dir)
    out_dir = out_dir or run_dir / "analysis"
    if not run.model.moe_layers():
        return {"step": run.step, "note": "dense model: no routing to analyse"}
    report: dict = {"step": run.step}
    model = model_label(run_dir, run.cfg)
    for name, tokens in {"valid": run.splits["valid"], **(other or {})}.items():
        layers = collect_routing(run, tokens, max_batches)
        relative = np.stack([expert_shares(layer) * layer.num_experts for layer in layers])
        names = [layer.name for layer in layers]
        report[name] = {"tokens": layers[0].num_tokens, **summarize(layers)}
        text = "validation split" if name == "valid" else name
        plot_activation_heatmap(relative, out_dir / f"heatmap-{name}.png", f"{model}: expert share per layer, {text}",
                                names, RELATIVE_SHARE_LABEL, vmax=RELATIVE_SHARE_MAX)  # fmt: skip
        if layers[0].num_heads > 1:
            plot_head_usage(
                head_usage(layers[-1]) * layers[-1].num_experts,
                out_dir / f"head-usage-{name}.png",
                f"{model}: expert share per MH-MoE head, {names[-1]}, {text}",
                RELATIVE_SHARE_LABEL,
                vmax=RELATIVE_SHARE_MAX,
            )
            divergence = {n: subtoken_divergence(layer) for n, layer in zip(names, layers)}
            plot_divergence_histogram(
                divergence,
                out_dir / f"divergence-{name}.png",
                f"{model}: distinct experts per token's sub-tokens, {text}",
            )
    write_json(out_dir / "analysis.json", report)
    return report


def format_analysis(report: dict, run_dir: Path, cfg: RunConfig, max_batches: int) -> str:
    """`analyze_run`'s report on the run in `run_dir` (configuration `cfg`) as a table a person reads (`mhmoe
    analyze`; `--json` prints the report itself): a column per text, each figure labelled with what it counts."""
    texts = [name for name in report if name not in ("step", "note")]
    head = f"{model_label(run_dir, cfg)}, step {report['step']}"
    if not texts:
        return f"{head}: {report.get('note', 'nothing analysed')}"
    ffn, first = cfg.model.ffn, report[texts[0]]
    heads = ffn.moe.num_heads if ffn.kind == "mhmoe" else 1
    item = "sub-token" if heads > 1 else "token"
    rows: list[tuple[str, Callable[[dict], str] | None]] = [  # (label, its cell from a text's summary; None: heading)
        ("tokens routed", lambda r: f"{r['tokens']:,}"),
        (f"effective experts (exp entropy of the expert shares), of {ffn.moe.num_experts}", None),
        (f"  pooled over the {heads} heads" if heads > 1 else "  all routed assignments", _effective("")),
    ]
    if heads > 1:
        rows.append(("  each head's own, mean over heads", _effective("_head")))
    rows += [
        (
            f"layers' experts chosen by > {first['threshold']:.0%} of {item}s (activation ratio)",
            _share("activation_ratio"),
        ),
        (f"experts chosen above {first['relative_fraction']:.0%} of the uniform rate", None),
        (f"  per {item}", _share("activation_relative")),
    ]
    if heads > 1:
        rows += [
            ("  per token (any of its sub-tokens)", _share("activation_relative_token")),
            (f"distinct experts per token (divergence; in brackets: {heads} independent heads)", None),
            ("  over all choices", _pair("divergence_mean", "divergence_chance")),
            ("  over first choices", _pair("divergence_top1", "divergence_top1_chance")),
        ]
    rows.append(("effective experts per MoE layer" + (", pooled over heads" if heads > 1 else ""), None))
    rows += [(f"  {layer['name']}", _layer(i)) for i, layer in enumerate(first["per_layer"])]
    cells = [[label, *("" if cell is None else cell(report[t]) for t in texts)] for label, cell in rows]
    header = ["", *("validation split" if t == "valid" else t for t in texts)]
    widths = [
        max(len(line[c]) for line in [header, *cells] if line[1:] != [""] * len(texts)) for c in range(len(header))
    ]
    lines = [f"{head}: routing of the first {max_batches} held-out batches of each text"]
    for line in [header, *cells]:
        lines.append(
            "  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:]))]).rstrip()
        )
    return "\n".join(lines)


def _effective(suffix: str) -> Callable[[dict], str]:
    return lambda r: f"{r['effective_experts' + suffix]:.2f} ({r['effective_fraction' + suffix]:.0%})"


def _pair(key: str, chance: str) -> Callable[[dict], str]:
    return lambda r: f"{r[key]:.2f} ({r[chance]:.2f})"


def _share(key: str) -> Callable[[dict], str]:
    return lambda r: f"{r[key]:.0%}"


def _layer(i: int) -> Callable[[dict], str]:
    return lambda r: f"{r['per_layer'][i]['effective_experts']:.2f}"
