"""`mhmoe reproduce ablations`: the papers' ablations of MH-MoE on the English budget, at equal FLOPs per token.

Sweeps (docs/paper-notes.md §5; v1 Tables 5-7 and the expert-count scaling, v2 Table 4), every MH-MoE model
FLOPs-matched to the X-MoE model with the same expert count (`flops_matched_mhmoe`: expert hidden for equal FLOPs,
experts raised for about equal parameters), all with the X-MoE router as in v1:
    heads        H ∈ {1, 2, 3, 4, 6, 8, 12} (those that divide D: all at the quick D = 192 and the --gpu D = 384),
                 one head and one merge layer
    head_merge   H = 4 with the head and merge layers on / off: both, head only, merge only, neither
    depth        H = 4 with n ∈ {0, 1, 2, 3} D×D layers in both the head and the merge layer (ReLU between)
    experts      E ∈ {8, 16, 32, 64}: X-MoE with E experts of the base hidden, and the MH-MoE matched to it
A model that two sweeps share is trained once. Writes results.json (models, sweeps, paired statistics against
the E = 8 X-MoE), results.md and one plot per sweep (validation perplexity against the swept value).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path

from mhmoe.analysis.plots import plot_curves
from mhmoe.experiments import english
from mhmoe.experiments.common import (
    PartSpec,
    PlannedModel,
    Variant,
    experts_cell,
    fmt,
    paired_markdown,
    paired_table,
    run_variants,
    sized,
    write_results,
)
from mhmoe.experiments.common import retabulate as common_retabulate
from mhmoe.experiments.plan import (
    Budget,
    Options,
    PartSetup,
    budget_plan,
    dry_run_part,
    start_part,
)
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.routers import RouterConfig
from mhmoe.models.cost import flops_matched_mhmoe
from mhmoe.models.ffn import FFNConfig, FFNKind
from mhmoe.train.config import RunConfig

HEADS = (1, 2, 3, 4, 6, 8, 12)  # v1 Table 5's and v2's head counts; a sweep keeps those that divide D
HEAD_MERGE = ((1, 1), (1, 0), (0, 1), (0, 0))
DEPTHS = (0, 1, 2, 3)
EXPERTS = (8, 16, 32, 64)
REFERENCE = "xmoe-e8"  # the paired statistics' reference: the base X-MoE


def heads_for(d_model: int) -> tuple[int, ...]:
    """The head counts of `HEADS` that split `d_model` evenly: all seven at D = 384 (`--gpu`) and at the quick
    D = 192; 1, 2, 4, 8 at D = 128 or 256."""
    return tuple(h for h in HEADS if d_model % h == 0)


def sweeps(d_model: int = 128) -> dict[str, list[tuple[str, str]]]:
    """{sweep: [(label of the swept value, model name)]} at model width `d_model` (the head counts that divide
    it); names encode the configuration, so shared models appear in several sweeps under one name."""
    return {
        "heads": [(f"H = {h}", _mh(8, h, 1, 1)) for h in heads_for(d_model)],
        "head_merge": [(_hm_label(a, b), _mh(8, 4, a, b)) for a, b in HEAD_MERGE],
        "depth": [(f"n = {n}", _mh(8, 4, n, n)) for n in DEPTHS],
        "experts": [(f"E = {e}", name) for e in EXPERTS for name in (f"xmoe-e{e}", _mh(e, 4, 1, 1))],
    }


def _mh(experts: int, heads: int, head_layers: int, merge_layers: int) -> str:
    return f"mhmoe-e{experts}-h{heads}-hm{head_layers}{merge_layers}"


def _hm_label(head: int, merge: int) -> str:
    return {(1, 1): "head + merge", (1, 0): "head only", (0, 1): "merge only", (0, 0): "neither"}[(head, merge)]


def budget(quick: bool, gpu: bool) -> Budget:
    """The English budget at a width that every head count of `HEADS` divides: with `gpu` D = 384
    (`english.DECISIVE_SHAPE`; D = 512 would leave out H = 3, 6 and 12), `quick` D = 192
    (`english.QUICK_WIDE_SHAPE`, as the quick v2 part; D = 128 would). The longer CPU budget keeps D = 256."""
    chosen = english.budget(quick, gpu)
    if gpu:
        return dataclasses.replace(chosen, shape=english.DECISIVE_SHAPE)
    if quick:
        return dataclasses.replace(chosen, shape=english.QUICK_WIDE_SHAPE)
    return chosen


def base(quick: bool, gpu: bool) -> RunConfig:
    """The run configuration of `budget(quick, gpu)`."""
    return budget(quick, gpu).config()


def models(cfg: RunConfig, only: Sequence[str] | None = None) -> list[Variant]:
    """Every distinct model of the sweeps (or those of the sweeps named in `only`), sized from `cfg`."""
    D, ffn = cfg.model.d_model, cfg.model.ffn
    base = dataclasses.replace(ffn.moe.routed_part(), router=RouterConfig(kind="xmoe"), num_shared_experts=0,
                               shared_expert_hidden=None)  # fmt: skip

    def ffn_of(kind: FFNKind, moe: MoEConfig) -> FFNConfig:
        return FFNConfig(kind=kind, hidden=ffn.hidden, activation=ffn.activation, moe_every=ffn.moe_every, moe=moe)

    def build(name: str) -> Variant:
        parts = name.split("-")
        experts = int(parts[1][1:])
        smoe = dataclasses.replace(base, num_experts=experts)
        if parts[0] == "xmoe":
            return Variant(name, "baseline", ffn_of("smoe", smoe))
        heads, (head, merge) = int(parts[2][1:]), (int(parts[3][2]), int(parts[3][3]))
        shaped = dataclasses.replace(smoe, multi_head_layers=head, merge_layers=merge)
        moe = sized(flops_matched_mhmoe, D, shaped, num_heads=heads, top_k=smoe.top_k, experts_multiple=4)
        return Variant(name, "flops", ffn_of("mhmoe", moe))

    chosen = {k: v for k, v in sweeps(D).items() if only is None or k in only}
    names = [REFERENCE] + [name for values in chosen.values() for _, name in values]
    return [build(name) for name in dict.fromkeys(names)]  # each model once, in sweep order


def setup(
    quick: bool, gpu: bool, seeds: int, overrides: Sequence[str], only: Sequence[str] | None, options: Options
) -> tuple[PartSetup, RunConfig]:
    """The sweeps' plan (a part named by its sweeps, e.g. "heads"; "all") and run configuration: the budget
    with the overrides (train.max_steps caps the steps), the device and the token floor of `options`; with
    `gpu` sized on the device to end within options.budget_min."""
    name = "+".join(only) if only else "all"
    plan, cfg = budget_plan("ablations", budget(quick, gpu), PartSpec(name, ()), seeds, overrides, options, gpu)
    variants = models(cfg, only)
    plan = dataclasses.replace(plan, part=PartSpec(name, tuple(v.name for v in variants)))
    return english.lm_setup(plan, cfg, variants, english.analysis_batches(quick, gpu), gpu), cfg


def plan(
    quick: bool = False, gpu: bool = False, overrides: Sequence[str] = (), only: Sequence[str] | None = None
) -> list[PlannedModel]:
    """What `run` would train at the budget's steps (before any sizing)."""
    return setup(quick, gpu, 1, overrides, only, Options())[0].planned()


def dry_run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    options: Options = Options(),
    measure: bool = False,
) -> str:
    """The plan as `run` would size it, with its estimated time, from rates measured by the smoke step
    (`measure`) or assumed (`english.dry_run`)."""
    part, _ = setup(quick, gpu, seeds, overrides, only, options)
    return dry_run_part(part, out, measure, options.tflops(gpu))


def run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    data: str = "",
    overrides: list[str] | None = None,
    progress: bool = True,
    only: Sequence[str] | None = None,
    options: Options = Options(keep_checkpoints=True),
) -> dict:
    """Train every model of the sweeps (those named in `only`, if given) for every seed on the English budget,
    write the results, the paired statistics against the E = 8 X-MoE and a plot per sweep. With `gpu` the
    sweeps start with the smoke and rate step and their steps are sized to `options.budget_min`."""
    part, cfg = setup(quick, gpu, seeds, overrides or [], only, options)
    cfg.data.path = data
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan, rates = start_part(part, out, gpu, options.keep_checkpoints)
    tokenizer_seconds = english.prepare(cfg, out)
    run_seed = functools.partial(english.lm_run_seed, out, {}, english.analysis_batches(quick, gpu), progress)
    results_by_model, _ = run_variants(
        cfg, part.variants, plan.seeds, out, run_seed, english.aggregate, keep_checkpoints=options.keep_checkpoints
    )
    chosen = {k: v for k, v in sweeps(cfg.model.d_model).items() if only is None or k in only}
    results = {
        "task": "ablations",
        "plan": plan.to_dict(),
        "rates": [dataclasses.asdict(r) for r in rates],
        "models": results_by_model,
        "sweeps": chosen,
        "paired": {key: paired_table(results_by_model, key, (REFERENCE,)) for key in ("val_loss", "test_loss")},
        "budget": cfg.to_dict(),
        "phases": {"tokenizer_seconds": tokenizer_seconds},
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(out, results, table)
    for sweep, values in chosen.items():
        _plot_sweep(out / f"sweep-{sweep}.png", sweep, values, results_by_model)
    return results


def _plot_sweep(path: Path, sweep: str, values: list[tuple[str, str]], models: dict[str, dict]) -> None:
    """Validation perplexity against the swept value's position; one line per model family (X-MoE, MH-MoE)."""
    labels = list(dict.fromkeys(label for label, _ in values))
    lines: dict[str, list[tuple[float, float]]] = {}
    for label, name in values:
        family = "X-MoE" if name.startswith("xmoe") else "MH-MoE"
        lines.setdefault(family, []).append((float(labels.index(label)), models[name]["val_ppl"]))
    title = f"ablation: {sweep} (x: " + ", ".join(f"{i} = {label}" for i, label in enumerate(labels)) + ")"
    plot_curves(lines, path, title, xlabel=f"{sweep} (position, see title)", ylabel="validation perplexity")


def table(results: dict) -> str:
    """One table per sweep (swept value, model, size, FLOPs, perplexity, paired difference to the reference)."""
    models, paired = results["models"], results["paired"]["val_loss"]
    lines = []
    for sweep, values in results["sweeps"].items():
        lines += [f"**{sweep}**", "", "| value | model | experts × hidden | params total | MFLOPs/token | val ppl "
                  f"| val bits/byte | vs {REFERENCE} |", "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for label, name in values:
            m, n = models[name], len(models[name]["seeds"])
            diff = paired.get(name, {}).get("vs_baseline")
            delta = "-" if not diff else f"{diff['mean_pct']:+.1f}%"
            lines.append(
                f"| {label} | {name} | {experts_cell(m)} | {m['params_total'] / 1e6:.2f} M "
                f"| {m['flops_per_token'] / 1e6:.2f} | {fmt(m['val_ppl'], m['val_ppl_std'], n)} "
                f"| {fmt(m.get('val_bpb'), m.get('val_bpb_std'), n, 4)} | {delta} |"
            )
        lines.append("")
    seeds = len(next(iter(models.values()))["seeds"])
    lines += [paired_markdown(paired, "val ppl"), ""]
    lines.append(
        f"{seeds} seed(s); every MH-MoE model at the FLOPs per token of the X-MoE model with its expert count "
        "(expert hidden solved, experts raised for about equal parameters); perplexity on held-out documents."
    )
    return "\n".join(lines)


def retabulate(out: Path) -> dict:
    """results.json / results.md of a finished run into `out`, recomputed by this version (`common.retabulate`)."""
    return common_retabulate(out, table, ("val_loss", "test_loss"), (REFERENCE,), attribution=False)
