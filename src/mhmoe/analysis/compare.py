"""`mhmoe compare RUN...`: finished runs side by side, from what each run folder already holds (config.json,
summary.json, metrics.jsonl): a table, and their validation curves in one figure. No model is loaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mhmoe.analysis.plots import plot_curves
from mhmoe.errors import DataError

Curve = list[tuple[float, float]]


def metric_curve(run_dir: Path, key: str = "val_loss") -> Curve:
    """(tokens, value) of every metrics.jsonl record of a run that has `key`."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [(r["tokens"], r[key]) for r in records if key in r]


SUMMARY_NUMBERS = (
    "step",
    "tokens_seen",
    "train_seconds",
    "params_total",
    "params_active",
)  # what every table row shows


def run_row(run_dir: Path) -> dict:
    """What the table shows of one run (summary.json written by a finished run, config.json), checked: a damaged
    file is a DataError naming it."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        what = "a run folder that has not finished" if (run_dir / "config.json").exists() else "not a run folder"
        raise DataError(f"{run_dir} has no summary.json ({what}); compare finished runs of `mhmoe train`")
    summary = _json_object(summary_path)
    wrong = [
        k for k in SUMMARY_NUMBERS if isinstance(summary.get(k), bool) or not isinstance(summary.get(k), (int, float))
    ]
    optional = ("val_ppl", "test_ppl", "val_bpb", "test_bpb", "val_tokens", "test_tokens", "train_cpu_seconds")
    wrong += [k for k in optional if summary.get(k) is not None and not isinstance(summary[k], (int, float))]
    if wrong:
        raise DataError(f"{summary_path} is damaged ({', '.join(wrong)}: not a number); run `mhmoe eval {run_dir}` "
                        "for its held-out numbers, or train it again")  # fmt: skip
    config = _json_object(run_dir / "config.json")
    try:
        ffn, data = config["model"]["ffn"], config.get("data", {})
        moe = ffn.get("moe") or {}
        kind = ffn.get("kind")
    except (KeyError, TypeError, AttributeError):
        raise DataError(
            f"{run_dir / 'config.json'} is damaged (no model.ffn); restore it from a checkpoint's run/ copy"
        ) from None
    layer = "dense" if kind == "dense" else f"{kind} {moe.get('num_experts')}×{moe.get('top_k')}"
    if kind == "mhmoe":
        layer += f" H={moe.get('num_heads')}"
    return {"run": run_dir.name, "layer": layer, "tokenizer": _tokenizer(run_dir, data), **summary}


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path} is not valid JSON ({str(e)[:80]}): it is damaged") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object: it is damaged")
    return data


def _tokenizer(run_dir: Path, data: Any) -> str:
    """Which tokenizer a run used: "byte", or its kind and the sha256 of the tokenizer.json the run keeps (two BPE
    tokenizers of one size trained on different text are different tokenizers)."""
    name = str(data.get("tokenizer", "bpe")) if isinstance(data, dict) else "bpe"
    saved = run_dir / "tokenizer.json"
    if name == "byte" or not saved.is_file():
        return name
    return f"{Path(name).name} {hashlib.sha256(saved.read_bytes()).hexdigest()[:8]}"


def _cell(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compare_table(run_dirs: list[Path]) -> str:
    """A markdown table of the runs: model, size, tokens, held-out perplexities and bits per byte (with the tokens
    they cover), wall and CPU training time; and, when the runs' tokenizers differ, a line saying that their
    perplexities do not compare (per token of different tokens) and bits per byte do."""
    lines = [
        "| run | layer | tokenizer | params total | params active | step | tokens | val ppl | test ppl "
        "| val bits/byte | test bits/byte | held-out tokens | train s | train CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [run_row(run_dir) for run_dir in run_dirs]
    for r in rows:
        held_out = f"{_cell(r.get('val_tokens'), ',')} / {_cell(r.get('test_tokens'), ',')}"
        lines.append(
            f"| {r['run']} | {r['layer']} | {r['tokenizer']} | {r['params_total'] / 1e6:.2f} M "
            f"| {r['params_active'] / 1e6:.2f} M | {r['step']} | {r['tokens_seen']:,} | {_cell(r.get('val_ppl'), '.2f')} "
            f"| {_cell(r.get('test_ppl'), '.2f')} | {_cell(r.get('val_bpb'), '.4f')} | {_cell(r.get('test_bpb'), '.4f')} "
            f"| {held_out} | {r['train_seconds']:.0f} | {_cell(r.get('train_cpu_seconds'), '.0f')} |"
        )
    tokenizers = sorted({r["tokenizer"] for r in rows})
    if len(tokenizers) > 1:
        lines += ["", f"The runs use different tokenizers ({'; '.join(tokenizers)}): their perplexities are per token "
                  "of different tokens and do not compare; compare bits per byte."]  # fmt: skip
        older = [r["run"] for r in rows if r.get("val_bpb") is None]
        if older:
            lines.append(f"{', '.join(older)} recorded no bits per byte (older mhmoe): `mhmoe eval RUN` measures it.")
    return "\n".join(lines)


def plot_validation_curves(run_dirs: list[Path], path: Path) -> Path:
    """The runs' validation loss against training tokens, one line per run."""
    curves = {Path(d).name: metric_curve(d) for d in run_dirs}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        raise DataError("none of the runs has validation records in metrics.jsonl; nothing to plot")
    return plot_curves(curves, path, f"validation loss of {len(curves)} runs")
