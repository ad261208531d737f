"""`mhmoe reproduce multimodal`: Dense vs SMoE vs X-MoE vs MH-MoE in a BEiT-3-style multiway Transformer
(docs/paper-notes.md §5).

The five models of `mhmoe.experiments.common` (dense, smoe, xmoe, mhmoe_params parameter-matched as v1,
mhmoe_flops FLOPs-matched as v2) replace the vision and the language FFNs of every second block alike. Each trains
with masked data modelling on text alone, images alone and image–caption pairs (`task.py`), on the same batches and
masks for the same number of steps per seed. Reported: masked-token perplexity on held-out text and pairs (the
paper's metric), masked-patch accuracy and loss, expert activation per modality, and the per-patch sub-token
divergence over training (docs/paper-notes.md §6). results.json has the English command's shape
("task": "multimodal") with these metrics added.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mhmoe.analysis.plots import plot_curves
from mhmoe.experiments.common import (
    PART_SPECS,
    POWER_NOTE,
    Clock,
    Part,
    PlannedModel,
    Variant,
    attribution_markdown,
    contrast_tables,
    copy_figure,
    effective_cell,
    experts_cell,
    mean_of,
    metric_curve,
    model_fields,
    num_cell,
    paired_markdown,
    pct_cell,
    planned_model,
    run_fields,
    run_variants,
    seed_stats,
    split_bands,
    variants,
    write_results,
)
from mhmoe.experiments.common import retabulate as common_retabulate
from mhmoe.experiments.multimodal.analysis import analyze_masked_run, load_masked_model
from mhmoe.experiments.multimodal.config import MaskedRunConfig, apply_masked_overrides, masked_preset
from mhmoe.experiments.multimodal.task import data_root, prepare_multimodal, train_masked
from mhmoe.experiments.plan import (
    MULTIMODAL_OVERHEADS,
    Options,
    PartSetup,
    Plan,
    Smoke,
    SmokeModel,
    dry_run_part,
    start_part,
)
from mhmoe.io import environment, write_json
from mhmoe.models.multiway import MultiwayTransformer, multiway_cost
from mhmoe.train.loop import RunResult, resolve_device

PAIRED_KEYS = ("val_loss", "test_loss", "val_pair_loss", "test_pair_loss")  # compared seed by seed
CURVES = {  # file -> (metrics.jsonl key, title)
    "val_curves.png": ("val_text_loss", "masked-token loss, held-out text"),
    "val_curves_pairs.png": ("val_pair_text_loss", "masked-token loss, held-out caption tokens of pairs"),
    "val_curves_patches.png": ("val_patch_loss", "masked-patch loss (visual tokens), held-out images"),
}


def multimodal_base(quick: bool, gpu: bool) -> MaskedRunConfig:
    """The shared budget. quick: ~15 min for all five models on 2 CPU cores (shows the pipeline, docs/paper-notes.md
    §7); gpu: one H200, one part × 5 seeds in about 5 minutes by `--dry-run`'s FLOPs estimate; neither: a longer
    CPU run."""
    if gpu:
        return masked_preset("gpu")
    base = masked_preset("cpu")
    if not quick:
        apply_masked_overrides(base, ["train.max_steps=1000", "train.warmup_steps=50", "train.eval_every=200",
                                      "train.eval_batches=10", "train.checkpoint_every=500", "data.fashion_limit=0"])  # fmt: skip
    return base


@dataclass(frozen=True)
class MaskedBudget:
    """The masked budget's record in a plan (`mhmoe.experiments.plan.StepBudget`): the preset it starts from and
    what sizing reads and changes."""

    preset: str  # masked_preset name ("cpu", "gpu")
    steps: int
    warmup_steps: int
    lr: float
    min_tokens: int = 0  # the fewest input positions per model the part may be sized down to


def setup(
    quick: bool, gpu: bool, seeds: int, overrides: Sequence[str], part: Part, options: Options
) -> tuple[PartSetup, MaskedRunConfig]:
    """The part's plan and run configuration: the budget with the overrides (train.max_steps caps the steps),
    the device and the token floor of `options`; with `gpu` sized on the device to end within
    options.budget_min."""
    cfg = apply_masked_overrides(multimodal_base(quick, gpu), list(overrides))
    if options.device:
        cfg.train.device = options.device
    t = cfg.train
    budget = MaskedBudget("gpu" if gpu else "cpu", t.max_steps, t.warmup_steps, t.lr, options.min_tokens or 0)
    plan = Plan("multimodal", PART_SPECS[part], budget, seeds, options.budget_min if gpu else 0.0)
    chosen = variants(cfg.model.d_model, cfg.model.ffn, part)
    overheads = MULTIMODAL_OVERHEADS["gpu" if gpu else "cpu"]
    planned = functools.partial(planned_models, cfg, chosen)
    return PartSetup(plan, cfg.train, chosen, masked_smoke(cfg), planned, overheads), cfg


def _rows(cfg: MaskedRunConfig) -> dict[str, int]:
    """The input positions of one row of each task: text windows of max_text_len tokens, images of P patches,
    pairs of P patches and caption_len tokens."""
    m = cfg.model
    return {"text": m.max_text_len, "image": m.num_patches, "pair": m.num_patches + cfg.data.caption_len}


def planned_models(cfg: MaskedRunConfig, chosen: Sequence[Variant]) -> list[PlannedModel]:
    """What `run` trains at cfg's steps. A step trains on `batch_size` rows of each task (`_rows`);
    evaluations read the same rows per batch, the routing analysis `analysis.max_batches` per modality."""
    m, t, row = cfg.model, cfg.train, _rows(cfg)
    per_batch = t.batch_size * sum(row[task] for task in cfg.data.task_list())
    analysis = cfg.analysis.max_batches * t.batch_size * (row["text"] + row["image"])
    return [
        planned_model(
            variant.name,
            multiway_cost(dataclasses.replace(m, ffn=variant.ffn, vocab_size=cfg.data.vocab_size + 1)),
            t,
            per_batch,
            analysis,
        )
        for variant in chosen
    ]


def masked_smoke(cfg: MaskedRunConfig) -> Smoke:
    """The smoke step of the masked budget: a multiway Transformer of the variant, one forward per task on
    random inputs of the training shapes (text windows, images with visual-token targets, image-caption
    pairs), each mask at its ratio with at least one masked position per row (a loss over none is NaN)."""
    m, d, B = cfg.model, cfg.data, cfg.train.batch_size

    def mask(shape: tuple[int, int], ratio: float, device: torch.device) -> torch.Tensor:
        chosen = torch.rand(shape, device=device) < ratio
        chosen[:, 0] = True
        return chosen

    def build(variant: Variant, device: torch.device) -> SmokeModel:
        model_cfg = dataclasses.replace(m, ffn=variant.ffn, vocab_size=d.vocab_size + 1)
        model = MultiwayTransformer(model_cfg).to(device)
        P, V = m.num_patches, model_cfg.vocab_size - 1  # ids below [MASK]

        def images() -> dict[str, torch.Tensor]:
            return {"images": torch.rand(B, m.image_size, m.image_size, m.channels, device=device) * 2 - 1,
                    "image_targets": torch.randint(0, m.codebook_size, (B, P), device=device),
                    "image_mask": mask((B, P), d.image_mask_ratio, device)}  # fmt: skip

        forwards = []
        for task in d.task_list():
            if task == "text":
                text = torch.randint(0, V, (B, m.max_text_len), device=device)
                forwards.append({"text": text, "text_mask": mask((B, m.max_text_len), d.text_mask_ratio, device)})
            elif task == "image":
                forwards.append(images())
            else:
                text = torch.randint(0, V, (B, d.caption_len), device=device)
                forwards.append({**images(), "text": text, "text_valid": torch.ones_like(text, dtype=torch.bool),
                                 "text_mask": mask((B, d.caption_len), d.pair_text_mask_ratio, device)})  # fmt: skip
        tokens = B * sum(_rows(cfg)[task] for task in d.task_list())
        return SmokeModel(model, forwards, tokens)

    return build


def plan(
    quick: bool = False, gpu: bool = False, overrides: Sequence[str] = (), part: Part = "core"
) -> list[PlannedModel]:
    """What `run` would train at the budget's steps (before any sizing)."""
    return setup(quick, gpu, 1, overrides, part, Options())[0].planned()


def dry_run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    overrides: Sequence[str] = (),
    part: Part = "core",
    options: Options = Options(),
    measure: bool = False,
) -> str:
    """The plan as `run` would size it, with its estimated time, from rates measured by the smoke step
    (`measure`) or assumed (`Options.tflops`)."""
    part_setup, _ = setup(quick, gpu, seeds, overrides, part, options)
    return dry_run_part(part_setup, out, measure, options.tflops(gpu))


def _seed_record(seed: int, result: RunResult, analysis: dict, run_dir: Path, clock: Clock) -> dict:
    def metric(split: dict, name: str, key: str) -> float | None:
        return split[name][key] if name in split else None

    by_source = sorted(name.split("@", 1)[1] for name in result.valid if name.startswith("pair_text@"))
    return {
        "seed": seed,
        "val_loss": metric(result.valid, "text", "loss"),
        "test_loss": metric(result.test, "text", "loss"),
        "val_pair_loss": metric(result.valid, "pair_text", "loss"),
        "test_pair_loss": metric(result.test, "pair_text", "loss"),
        "val_pair_ppl_by_source": {src: metric(result.valid, f"pair_text@{src}", "ppl") for src in by_source},
        "test_pair_ppl_by_source": {src: metric(result.test, f"pair_text@{src}", "ppl") for src in by_source},
        "val_ppl": metric(result.valid, "text", "ppl"),
        "test_ppl": metric(result.test, "text", "ppl"),
        "val_pair_ppl": metric(result.valid, "pair_text", "ppl"),
        "test_pair_ppl": metric(result.test, "pair_text", "ppl"),
        "val_patch_acc": metric(result.valid, "patch", "acc"),
        "test_patch_acc": metric(result.test, "patch", "acc"),
        "val_patch_loss": metric(result.valid, "patch", "loss"),
        "test_patch_loss": metric(result.test, "patch", "loss"),
        "test_pair_patch_acc": metric(result.test, "pair_patch", "acc"),
        "valid": result.valid,
        "test": result.test,
        "tokens_seen": result.tokens_seen,
        "train_seconds": result.train_seconds,
        "seconds": clock.laps,
        "analysis": analysis.get("all"),
        "analysis_vision": analysis.get("vision"),
        "analysis_language": analysis.get("language"),
        "patch_divergence": analysis.get("patch_divergence"),
        "routing_agreement": analysis.get("routing_agreement"),
        "curves": {key: metric_curve(run_dir, key) for key, _ in CURVES.values()},
    }


def run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    data: str = "",
    overrides: list[str] | None = None,
    progress: bool = True,
    part: Part = "core",
    options: Options = Options(keep_checkpoints=True),
) -> dict:
    """Train every model of `part` for every seed on one prepared data set, analyse routing per modality, write
    results.json (with paired statistics) / results.md / curves, heat maps per modality and the patch-divergence
    grids. With `gpu` the part starts with the smoke and rate step and its steps are sized to
    `options.budget_min`."""
    part_setup, cfg = setup(quick, gpu, seeds, overrides or [], part, options)
    if data:
        cfg.data.path = data
    started, load_start = time.perf_counter(), os.getloadavg()
    root = data_root(cfg)  # a missing data location is an error before anything is announced
    out.mkdir(parents=True, exist_ok=True)
    plan, rates = start_part(part_setup, out, gpu, options.keep_checkpoints)
    print(f"== preparing data from {root}", flush=True)
    prepared = prepare_multimodal(cfg, progress=progress)
    prepare_seconds = time.perf_counter() - started
    device = resolve_device(cfg.train.device)

    def run_seed(variant: Variant, seed: int, run_cfg: MaskedRunConfig, run_dir: Path) -> dict:
        clock = Clock()
        result = train_masked(run_cfg, run_dir, progress=progress, data=prepared)
        clock.lap("train")
        trained_cfg, model = load_masked_model(run_dir, device)
        analysis = analyze_masked_run(run_dir, prepared, trained_cfg, model, device)
        clock.lap("analysis")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if seed == 0:
            _copy_figures(out, variant)
        return _seed_record(seed, result, analysis, run_dir, clock)

    models, curves = run_variants(
        cfg, part_setup.variants, plan.seeds, out, run_seed, aggregate, keep_checkpoints=options.keep_checkpoints
    )
    results = {
        "task": "multimodal",
        "part": part,
        "plan": plan.to_dict(),
        "rates": [dataclasses.asdict(r) for r in rates],
        "models": models,
        **contrast_tables(models, PAIRED_KEYS + source_losses(models)),
        "budget": cfg.to_dict(),
        "data": prepared.root,
        "sources": {s.name: {k: int(len(s.indices(k))) for k in ("train", "valid", "test")} for s in prepared.sources},
        "text_tokens": {k: int(len(v)) for k, v in prepared.text.items()},
        "prepare_seconds": prepare_seconds,
        "wall_seconds": time.perf_counter() - started,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "environment": environment(device),
    }
    write_results(out, results, table)
    _plot(out, curves)
    return results


def _plot(out: Path, curves: dict) -> None:
    """The mean validation curves over seeds, with their min-max bands (`CURVES`)."""
    for name, (key, title) in CURVES.items():
        if curves.get(key):
            mean, bands = split_bands(curves[key])
            plot_curves(mean, out / name, title, xlabel="input positions", bands=bands)


def _copy_figures(out: Path, variant: Variant) -> None:
    analysis = out / "runs" / f"{variant.name}-seed0" / "analysis"
    for source, target in (
        ("heatmap-vision.png", out / "heatmaps" / f"{variant.name}-vision.png"),
        ("heatmap-language.png", out / "heatmaps" / f"{variant.name}-language.png"),
        ("divergence-patches.png", out / "divergence" / f"{variant.name}.png"),
    ):
        copy_figure(analysis / source, target)


STAT_KEYS = ("val_ppl", "test_ppl", "val_pair_ppl", "test_pair_ppl", "val_patch_acc", "test_patch_acc",
             "val_patch_loss", "test_patch_loss", "test_pair_patch_acc")  # fmt: skip


def aggregate(variant: Variant, cfg: MaskedRunConfig, runs: list[dict]) -> dict:
    """A model's results.json entry: size and cost, held-out metrics (mean and std over seeds), routing per
    modality, the patch divergence over training, the seeds."""
    entry: dict[str, Any] = model_fields(variant, multiway_cost(cfg.model))
    entry["mh_heads"] = variant.ffn.moe.num_heads if variant.ffn.kind == "mhmoe" else None
    entry.update(seed_stats(runs, STAT_KEYS))
    for suffix, which in (("", "analysis"), ("_vision", "analysis_vision"), ("_language", "analysis_language")):
        for key in ("activation_ratio", "effective_experts", "effective_fraction"):
            entry[f"{key}{suffix}"] = mean_of(runs, which, key)
    for suffix in ("_vision", "_language"):  # the measures with a baseline (mhmoe.analysis.routing.summarize)
        for key in ("activation_relative", "effective_fraction_head", "divergence_mean", "divergence_chance"):
            entry[f"{key}{suffix}"] = mean_of(runs, f"analysis{suffix}", key)
    entry["activation_threshold"] = mean_of(runs, "analysis", "threshold")
    entry["patch_divergence"] = _mean_by_step([r.get("patch_divergence") for r in runs])
    agreement = [r.get("routing_agreement") for r in runs]
    entry["routing_agreement"] = _mean_by_step(
        [{k: v["agreement"] for k, v in a.items()} if a else None for a in agreement]
    )
    entry["routing_agreement_chance"] = _mean_by_step(
        [{k: v["chance"] for k, v in a.items()} if a else None for a in agreement]
    )
    for split in ("val", "test"):
        key = f"{split}_pair_ppl_by_source"
        sources = sorted({src for r in runs for src in r.get(key, {})})
        entry[key] = {
            src: statistics.fmean(r[key][src] for r in runs if r[key].get(src) is not None) for src in sources
        }
    return {**entry, **run_fields(runs)}


def _mean_by_step(per_seed: list[dict[str, float] | None]) -> dict[str, float] | None:
    """{"step N": mean over the seeds that have it} of per-seed {"step N": value} records."""
    present = [d for d in per_seed if d]
    return {step: statistics.fmean(d[step] for d in present) for step in present[0]} if present else None


def table(results: dict) -> str:
    """The results as a markdown table with a note on what each column measures."""
    seeds = len(next(iter(results["models"].values()))["seeds"])

    def fmt(m: dict, key: str, scale: float = 1.0, digits: int = 2, pct: bool = False) -> str:
        value, std = m.get(key), m.get(f"{key}_std")
        if value is None:
            return "-"
        unit = "%" if pct else ""
        text = f"{scale * value:.{digits}f}{unit}"
        return text + (f" ± {scale * std:.{digits}f}" if seeds > 1 and std is not None else "")

    def eff(m: dict, suffix: str) -> str:
        return effective_cell(m.get(f"effective_experts{suffix}"), m.get(f"effective_fraction{suffix}"))

    header = (
        "| model | matching | experts × hidden | params total | params active | MFLOPs/token | text ppl (val) "
        "| text ppl (test) | pair ppl (val) | pair ppl (test) | patch acc (val) | patch acc (test) | patch loss (test) "
        "| eff. experts vision | eff. experts language | positions/model | train s |"
    )
    lines = [header, "|---|---|---|" + "---:|" * (header.count("|") - 4)]
    for name, m in results["models"].items():
        lines.append(
            f"| {name} | {m['matching']} | {experts_cell(m)} | {m['params_total'] / 1e6:.2f} M | {m['params_active'] / 1e6:.2f} M "
            f"| {m['flops_per_token'] / 1e6:.2f} | {fmt(m, 'val_ppl')} | {fmt(m, 'test_ppl')} | {fmt(m, 'val_pair_ppl')} "
            f"| {fmt(m, 'test_pair_ppl')} | {fmt(m, 'val_patch_acc', 100, 1, True)} "
            f"| {fmt(m, 'test_patch_acc', 100, 1, True)} | {fmt(m, 'test_patch_loss')} | {eff(m, '_vision')} "
            f"| {eff(m, '_language')} | {m['tokens_seen']:,} | {m['train_seconds']:.0f} |"
        )
    budget = results["budget"]
    note = (
        f"{seeds} seed(s){' (mean ± std)' if seeds > 1 else ''}; text / pair ppl = masked-token perplexity on "
        f"held-out text ({100 * budget['data']['text_mask_ratio']:.0f}% of tokens masked) and held-out image–caption "
        f"pairs ({100 * budget['data']['pair_text_mask_ratio']:.0f}% of caption tokens masked); patch acc / loss = "
        f"visual-token accuracy and cross-entropy on {100 * budget['data']['image_mask_ratio']:.0f}% block-masked "
        f"patches of held-out images ({budget['model']['codebook_size']} k-means codes); eff. experts = exp(entropy "
        "of the expert shares) of the vision / language FFNs on unmasked held-out images / text, mean over MoE layers "
        "(% of E); positions = patches + text tokens trained on. Pair perplexity pools two kinds of captions: "
        'Fashion-MNIST\'s are class-name templates ("a photo of a shirt"), so on those it measures class recognition; '
        "emoji captions are names in several languages (per-source values below)."
    )
    lines += ["", note, ""]
    sources = sorted({src for m in results["models"].values() for src in m.get("val_pair_ppl_by_source") or {}})
    if sources:
        lines += ["| model | " + " | ".join(f"pair ppl (val), {src}" for src in sources) + " |",
                  "|---|" + "---:|" * len(sources)]  # fmt: skip
        for name, m in results["models"].items():
            cells = " | ".join(f"{m['val_pair_ppl_by_source'].get(src, float('nan')):.2f}" for src in sources)
            lines.append(f"| {name} | {cells} |")
        lines.append("")
    lines += routing_table(results["models"])
    lines += agreement_table(results["models"])
    by_source = [(key, f"pair ppl (val), {key.split('@', 1)[1]}") for key in results["paired"] if "@" in key]
    for key, what in (("val_loss", "text ppl (val)"), ("val_pair_loss", "pair ppl (val)"), *by_source):
        lines += [f"**Paired per-seed differences of {what}**", "", paired_markdown(results["paired"][key], what), ""]
        attribution = attribution_markdown((results.get("attribution") or {}).get(key, []), what)
        if attribution:
            lines += [f"**Attribution of {what}: each pair, with everything it changes**"]
            lines += ["", attribution, ""]
    family = sum((results.get("holm_family") or {}).values())
    note = f" Here Holm runs within each measure (the text, the pairs, each caption source; {family} contrasts in all)."
    lines += [POWER_NOTE + (note if family else "")]
    return "\n".join(lines)


def agreement_table(models: dict[str, dict]) -> list[str]:
    """How settled the vision routing is during training: per model, the share of the display images' sub-tokens
    whose first-choice expert at each snapshot is the one they get at the end (mean over seeds), with the share
    expected by chance in parentheses. Routing that settles early reaches ~1 long before the last step."""
    have = {name: m for name, m in models.items() if m.get("routing_agreement")}
    if not have:
        return []
    steps = list(next(iter(have.values()))["routing_agreement"])
    lines = [
        "**Vision routing settling: first-choice agreement with the last snapshot (chance)**",
        "",
        "| model | " + " | ".join(steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for name, m in have.items():
        agree, chance = m["routing_agreement"], m.get("routing_agreement_chance") or {}
        cells = " | ".join(
            f"{agree[step]:.2f} ({chance[step]:.2f})" if step in chance else f"{agree[step]:.2f}"
            for step in steps
            if step in agree
        )
        lines.append(f"| {name} | {cells} |")
    return lines + [""]


def source_losses(models: dict[str, dict]) -> tuple[str, ...]:
    """Per seed, the validation pair loss of each caption source, `val_pair_loss@SOURCE` = log of its pair
    perplexity (added to the seeds' records), so that the paired statistics see where a pair difference comes
    from; returns those keys."""
    keys: set[str] = set()
    for model in models.values():
        for record in model["seeds"]:
            for source, ppl in (record.get("val_pair_ppl_by_source") or {}).items():
                if ppl is not None:
                    record[f"val_pair_loss@{source}"] = math.log(ppl)
                    keys.add(f"val_pair_loss@{source}")
    return tuple(sorted(keys))


def retabulate(out: Path) -> dict:
    """results.json / results.md of a finished run into `out`, recomputed by this version (`common.retabulate`),
    with the per-source pair statistics (`source_losses`)."""
    path = out / "results.json"
    keys: tuple[str, ...] = ()
    if path.is_file():
        try:
            results = json.loads(path.read_text())
            keys = source_losses(results["models"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            keys = ()  # common.retabulate names what is wrong with the file
        else:
            write_json(path, results)
    return common_retabulate(out, table, PAIRED_KEYS + keys)


def routing_table(models: dict[str, dict]) -> list[str]:
    """Routing per modality with the measures that have a baseline: effective experts pooled over the heads and
    per head (% of E), the relative activation ratio, and the sub-token divergence beside its chance value."""

    lines = [
        "**Routing per modality, with baselines** (held-out images / text)",
        "",
        "| model | modality | eff. experts, pooled | per head | relative activation | divergence (chance) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        if not m.get("num_experts"):
            continue
        for modality in ("vision", "language"):
            divergence = m.get(f"divergence_mean_{modality}")
            chance = m.get(f"divergence_chance_{modality}")
            cell = "-" if divergence is None else f"{divergence:.2f} ({num_cell(chance)})"
            lines.append(
                f"| {name} | {modality} | {pct_cell(m.get(f'effective_fraction_{modality}'))} "
                f"| {pct_cell(m.get(f'effective_fraction_head_{modality}'))} "
                f"| {pct_cell(m.get(f'activation_relative_{modality}'))} | {cell} |"
            )
    return lines + [
        "",
        "Per head: each head's own expert shares (an MH-MoE whose heads use disjoint experts is even pooled and narrow "
        "per head); relative activation: share of (layer, expert) cells chosen above 25% of the uniform rate K/E; "
        "divergence: distinct experts reached by a position's sub-tokens over all top-k choices, beside its value "
        "under independent routing at the measured shares (saturates at min(E, H·K)).",
        "",
    ]
