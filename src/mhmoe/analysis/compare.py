"""`mhmoe compare RUN...`: finished runs side by side, from what each run folder already holds (config.json,
summary.json, metrics.jsonl): a table, and their validation curves in one figure. No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from mhmoe.analysis.plots import plot_curves
from mhmoe.errors import DataError

Curve = list[tuple[float, float]]


def metric_curve(run_dir: Path, key: str = "val_loss") -> Curve:
    """(tokens, value) of every metrics.jsonl record of a run that has `key`."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(r["tokens"], r[key]) for r in records if key in r]


def run_row(run_dir: Path) -> dict:
    """What the table shows of one run (summary.json written by a finished run)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        what = "a run folder that has not finished" if (run_dir / "config.json").exists() else "not a run folder"
        raise DataError(f"{run_dir} has no summary.json ({what}); compare finished runs of `mhmoe train`")
    summary = json.loads(summary_path.read_text())
    ffn = json.loads((run_dir / "config.json").read_text())["model"]["ffn"]
    moe = ffn.get("moe") or {}
    layer = "dense" if ffn.get("kind") == "dense" else f"{ffn.get('kind')} {moe.get('num_experts')}×{moe.get('top_k')}"
    if ffn.get("kind") == "mhmoe":
        layer += f" H={moe.get('num_heads')}"
    return {"run": run_dir.name, "layer": layer, **summary}


def _cell(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compare_table(run_dirs: list[Path]) -> str:
    """A markdown table of the runs: model, size, tokens, held-out perplexities (with the tokens they cover),
    wall and CPU training time."""
    lines = [
        "| run | layer | params total | params active | step | tokens | val ppl | test ppl | held-out tokens "
        "| train s | train CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run_dir in run_dirs:
        r = run_row(run_dir)
        held_out = f"{_cell(r.get('val_tokens'), ',')} / {_cell(r.get('test_tokens'), ',')}"
        lines.append(
            f"| {r['run']} | {r['layer']} | {r['params_total'] / 1e6:.2f} M | {r['params_active'] / 1e6:.2f} M "
            f"| {r['step']} | {r['tokens_seen']:,} | {_cell(r.get('val_ppl'), '.2f')} | {_cell(r.get('test_ppl'), '.2f')} "
            f"| {held_out} | {r['train_seconds']:.0f} | {_cell(r.get('train_cpu_seconds'), '.0f')} |"
        )
    return "\n".join(lines)


def plot_validation_curves(run_dirs: list[Path], path: Path) -> Path:
    """The runs' validation loss against training tokens, one line per run."""
    curves = {Path(d).name: metric_curve(d) for d in run_dirs}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        raise DataError("none of the runs has validation records in metrics.jsonl; nothing to plot")
    return plot_curves(curves, path, f"validation loss of {len(curves)} runs")
