"""`mhmoe reproduce english`: Dense vs SMoE vs X-MoE vs MH-MoE under one budget (docs/paper-notes.md §5).

The models of `mhmoe.experiments.common` (the core comparison, and with `part` its attribution controls), trained
on the same batches for the same tokens per seed, with one BPE tokenizer shared by every run; each run is then
evaluated and its routing analysed on held-out text and on unseen corpora (`ood`: the papers measured activation
on another distribution, docs/paper-notes.md §7). Writes results.json (with paired per-seed statistics and the
seconds of every phase), results.md, val_curves.png and heatmaps/ in `out`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.analysis.plots import plot_curves
from mhmoe.analysis.routing import DEFAULT_ACTIVATION_THRESHOLD
from mhmoe.analysis.runs import analyze_run, load_run
from mhmoe.data import BPETokenizer, Corpus, data_cache_dir, load_corpus, load_documents, tokenize_corpus
from mhmoe.errors import DataError
from mhmoe.experiments.common import (
    PART_SPECS,
    POWER_NOTE,
    Clock,
    Curves,
    Part,
    PlannedModel,
    Variant,
    attribution_markdown,
    contrast_tables,
    copy_figure,
    experts_cell,
    fmt,
    mean_of,
    metric_curve,
    model_fields,
    num_cell,
    paired_markdown,
    pct_cell,
    planned_model,
    primary_markdown,
    run_fields,
    run_variants,
    seed_stats,
    split_bands,
    variants,
    write_results,
)
from mhmoe.experiments.common import retabulate as common_retabulate
from mhmoe.experiments.plan import (
    OVERHEADS,
    Budget,
    Options,
    PartSetup,
    Plan,
    Shape,
    budget_plan,
    dry_run_part,
    export,
    lm_smoke,
    planned_vocab,
    start_part,
)
from mhmoe.models.gpt import gpt_cost
from mhmoe.train.config import RunConfig, apply_overrides
from mhmoe.train.lm import data_path, train

ANALYSIS_KEYS = (
    "activation_ratio",
    "activation_relative",
    "activation_relative_token",
    "activation_relative_head",
    "effective_experts",
    "effective_fraction",
    "effective_experts_head",
    "effective_fraction_head",
    "divergence_mean",
    "divergence_chance",
    "divergence_top1",
    "divergence_top1_chance",
)


# The decisive part's model: D = 384 (divisible by 2, 3, 4, 6, 8 and 12, the papers' head counts) costs 0.6× the
# FLOPs per token of the `gpu` preset's D = 512, so 15 runs of 10 M tokens fit 8 minutes down to about 53 TFLOP/s
# sustained (D = 512: 88) and 8 M tokens down to about 43 (D = 512: 72), by `size_steps` at the assumed overheads.
DECISIVE_SHAPE = Shape(seq_len=512, d_model=384, n_layers=6, ffn_hidden=1536, vocab_size=8192)
# The quick budget's model at D = 192 instead of 128: divisible by 2, 3, 4, 6, 8 and 12, for v2's H = 3 (the
# quick v2 part) and every head count of the quick ablations' heads sweep (v1's best H ≈ 6 among them)
QUICK_WIDE_SHAPE = Shape(seq_len=128, d_model=192, n_layers=4, ffn_hidden=768, vocab_size=4096)


def budget(quick: bool, gpu: bool, part: Part = "core") -> Budget:
    """The shared budget, on the `gpu` / `cpu` presets (their model sizes; the variants set the FFNs).

    quick: minutes on 2 CPU cores (pipeline demo, docs/paper-notes.md §7). gpu: one H100 / H200, the `gpu`
    preset's model (6 layers, D = 512, E = 8), no compilation (it does not pay for itself in a few hundred
    steps); each part on 3.3 M tokens per model, but `decisive` at D = 384 (`DECISIVE_SHAPE`) on up to 10 M
    tokens (610 steps) and at least 8 M (the floor below which `size_steps` refuses the part: docs/paper-notes.md
    §7 asks for >= 10 M, and the routers were still moving at 3 M), its steps sized on the device to end within
    --budget-min.
    """
    if gpu and part == "decisive":
        return Budget("gpu", steps=610, warmup_steps=40, lr=1.5e-3, eval_every=61, eval_batches=4,
                      final_eval_batches=16, batch_size=32, num_experts=8, log_every=61, compile=False,
                      min_tokens=8_000_000, shape=DECISIVE_SHAPE)  # fmt: skip
    if gpu and part == "family":  # D = 384: latent 192 in 4 heads of 48 (`common.FAMILY`)
        return dataclasses.replace(budget(quick, gpu), shape=DECISIVE_SHAPE)
    if gpu and part == "v2":  # v2 Table 1's models need D divisible by 3
        return dataclasses.replace(budget(quick, gpu), shape=DECISIVE_SHAPE)
    if quick and part == "v2":
        return dataclasses.replace(budget(quick, gpu), shape=QUICK_WIDE_SHAPE)
    if gpu:
        return Budget("gpu", steps=200, warmup_steps=20, lr=1.5e-3, eval_every=50, eval_batches=4,
                      final_eval_batches=16, batch_size=32, num_experts=8, log_every=20, compile=False)  # fmt: skip
    if quick:
        return Budget("cpu", steps=300, warmup_steps=20, lr=3e-3, eval_every=75, eval_batches=8, final_eval_batches=40)
    return Budget("cpu", steps=2000, warmup_steps=100, lr=1.5e-3, eval_every=200, eval_batches=20,
                  shape=Shape(seq_len=256, d_model=256, n_layers=6, ffn_hidden=1024, vocab_size=8192))  # fmt: skip


def base(quick: bool, gpu: bool, part: Part = "core") -> RunConfig:
    """The run configuration of `budget(quick, gpu, part)`."""
    return budget(quick, gpu, part).config()


def models(cfg: RunConfig, part: Part = "core") -> list[Variant]:
    return variants(cfg.model.d_model, cfg.model.ffn, part)


def plan(
    quick: bool = False, gpu: bool = False, overrides: Sequence[str] = (), part: Part = "core", other_corpora: int = 0
) -> list[PlannedModel]:
    """What `run` would train at the budget's steps, before any sizing: every model of `part` with its size,
    FLOPs and tokens per seed (`dry_run` sizes them)."""
    cfg = apply_overrides(base(quick, gpu, part), list(overrides))
    return lm_plan(cfg, models(cfg, part), analysis_batches(quick, gpu) * (1 + other_corpora))


def analysis_batches(quick: bool, gpu: bool) -> int:
    """Held-out batches the routing analysis reads per corpus (a `gpu` batch holds 16 K tokens)."""
    return 8 if quick or gpu else 20


def lm_plan(cfg: RunConfig, variants: Sequence[Variant], extra_eval_batches: int = 0) -> list[PlannedModel]:
    """Each variant's size, forward FLOPs per token, and tokens per seed (training, evaluation and
    `extra_eval_batches` of analysis)."""
    per_batch = cfg.train.batch_size * cfg.model.seq_len
    return [
        planned_model(
            variant.name,
            gpt_cost(dataclasses.replace(cfg.model, ffn=variant.ffn, vocab_size=planned_vocab(cfg))),
            cfg.train,
            per_batch,
            extra_eval_batches * per_batch,
        )
        for variant in variants
    ]


def ood_corpora(specs: Sequence[str]) -> dict[str, Path]:
    """{name: path} of out-of-distribution corpora given as "PATH" or "NAME=PATH" (several, or comma-separated);
    a bare path is named by its file name's first part (de.test.txt.gz -> "de") or its folder's name."""
    found: dict[str, Path] = {}
    for spec in (item.strip() for entry in specs for item in entry.split(",")):
        if not spec:
            continue
        name, sep, path = spec.partition("=")
        path, name = (path, name) if sep else (spec, Path(spec).name.split(".")[0])
        if name in found:
            raise DataError(f"two out-of-distribution corpora are named {name!r}; name them: NAME=PATH")
        found[name] = Path(path).expanduser()
    return found


def ood_tokens(corpora: dict[str, Path], tokenizer: Any) -> dict[str, np.ndarray]:
    """All text of each other corpus (never trained on), tokenized with the run's tokenizer."""
    out = {}
    for name, path in corpora.items():
        corpus = Corpus(train=[], valid=[], test=load_documents(path), source=str(path))
        out[name] = tokenize_corpus(corpus, tokenizer, data_cache_dir(), progress=False)["test"]
    return out


def shared_tokenizer(cfg: RunConfig, out: Path, text: Callable[[], Iterable[str]]) -> float:
    """Train the comparison's BPE tokenizer once, on `text()`, into out/tokenizer.json and point every run at it
    (the same tokens for every model, one training instead of one per run); returns the seconds it took."""
    if cfg.data.tokenizer != "bpe":
        return 0.0
    started = time.perf_counter()
    path = out / "tokenizer.json"
    if not path.exists():
        print(f"== training the shared BPE tokenizer ({cfg.data.vocab_size} tokens)", flush=True)
        BPETokenizer.train(text(), cfg.data.vocab_size).save(path)
    cfg.data.tokenizer = str(path.resolve())
    return time.perf_counter() - started


def loaded_data(run_dir: Path) -> dict | None:
    """The record of the data a run used (source, content hash, sizes), from its summary.json."""
    return json.loads((run_dir / "summary.json").read_text()).get("data")


def make_plan(
    quick: bool, gpu: bool, part: Part, seeds: int, overrides: Sequence[str], options: Options
) -> tuple[Plan, RunConfig]:
    """The part's plan and run configuration (`plan.budget_plan`)."""
    return budget_plan("english", budget(quick, gpu, part), PART_SPECS[part], seeds, overrides, options, gpu)


def lm_setup(plan: Plan, cfg: RunConfig, variants: Sequence[Variant], extra: int, gpu: bool) -> PartSetup:
    """What planning needs of a language-model part (English, multilingual, the ablations): its models at cfg's
    steps with `extra` analysis batches per run, the GPT smoke step, the overheads."""
    planned = functools.partial(lm_plan, cfg, variants, extra)
    return PartSetup(plan, cfg.train, variants, lm_smoke(cfg), planned, OVERHEADS["gpu" if gpu else "cpu"])


def dry_run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    overrides: Sequence[str] = (),
    part: Part = "core",
    other_corpora: int = 0,
    options: Options = Options(),
    measure: bool = False,
) -> str:
    """The plan as `run` would size it, with its estimated time: from rates measured on the device by the smoke
    step (`measure`), else assumed (`Options.tflops`)."""
    plan, cfg = make_plan(quick, gpu, part, seeds, overrides, options)
    extra = analysis_batches(quick, gpu) * (1 + other_corpora)
    return dry_run_part(lm_setup(plan, cfg, models(cfg, part), extra, gpu), out, measure, options.tflops(gpu))


def run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    data: str = "",
    overrides: list[str] | None = None,
    progress: bool = True,
    ood: Sequence[str] = (),
    part: Part = "core",
    options: Options = Options(keep_checkpoints=True),
) -> dict:
    """Train every model of `part` for every seed, seed-major, analyse routing (also on each `ood` corpus),
    and rewrite the results with paired statistics after every seed round (a rerun into `out` continues).
    With --gpu the part starts with the smoke and rate step and its steps are sized to `options.budget_min`."""
    plan, cfg = make_plan(quick, gpu, part, seeds, overrides or [], options)
    cfg.data.path = data
    corpora = ood_corpora([ood] if isinstance(ood, str) else ood)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    variants = models(cfg, part)
    extra = analysis_batches(quick, gpu) * (1 + len(corpora))
    plan, rates = start_part(lm_setup(plan, cfg, variants, extra, gpu), out, gpu, options.keep_checkpoints)
    tokenizer_seconds = prepare(cfg, out)
    results: dict = {}

    def on_round(by_model: dict[str, dict], curves: Curves, finished: int) -> None:
        results.clear()
        results.update({
            "task": "english",
            "part": part,
            "plan": plan.to_dict(),
            "rates": [dataclasses.asdict(r) for r in rates],
            "seeds_finished": finished,
            "models": by_model,
            **contrast_tables(by_model, ("val_loss", "test_loss"), primary=plan.part.primary),
            "budget": cfg.to_dict(),
            "data": next(iter(by_model.values()))["seeds"][0]["data"],  # every model read the same data
            "ood_data": {name: str(path) for name, path in corpora.items()} or None,
            "phases": {"tokenizer_seconds": tokenizer_seconds},
            "wall_seconds": time.perf_counter() - started,
        })  # fmt: skip
        write_results(out, results, table)
        mean, bands = split_bands(curves["val_loss"])
        plot_curves(mean, out / "val_curves.png", "validation loss (English)",
                    ylabel="validation loss (nats/token)", bands=bands)  # fmt: skip
        if options.export is not None:
            export(out, options.export, f"english-{part}")
        print(f"== round {finished}/{plan.seeds}: results.json, results.md rewritten in {out}", flush=True)

    run_seed = functools.partial(lm_run_seed, out, corpora, analysis_batches(quick, gpu), progress)
    run_variants(cfg, variants, plan.seeds, out, run_seed, aggregate, on_round, options.keep_checkpoints)
    return results


def prepare(cfg: RunConfig, out: Path) -> float:
    """The comparison's shared tokenizer (trained once on the training split); returns its seconds."""
    d = cfg.data
    return shared_tokenizer(
        cfg,
        out,
        lambda: load_corpus(data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction).train,
    )


def lm_run_seed(
    out: Path,
    corpora: dict[str, Path],
    analysis_batches: int,
    progress: bool,
    variant: Variant,
    seed: int,
    cfg: RunConfig,
    run_dir: Path,
) -> "LMSeed":
    """Train one language model, evaluate it and analyse its routing on held-out text and each other corpus."""
    clock = Clock()
    result = train(cfg, run_dir, progress=progress)
    clock.lap("train")
    loaded = load_run(run_dir)  # once: its model, tokenizer and data serve every analysis
    other = ood_tokens(corpora, loaded.tokenizer)
    analysis = analyze_run(run_dir, other=other, max_batches=analysis_batches, run=loaded)
    clock.lap("analysis")
    if seed == 0:
        copy_figure(run_dir / "analysis" / "heatmap-valid.png", out / "heatmaps" / f"{variant.name}.png")
    return LMSeed(
        seed=seed,
        val_ppl=result.valid["ppl"],
        test_ppl=result.test["ppl"],
        val_bpb=result.valid.get("bpb"),
        test_bpb=result.test.get("bpb"),
        val_loss=result.valid["loss"],
        test_loss=result.test["loss"],
        val_tokens=result.valid["tokens"],
        test_tokens=result.test["tokens"],
        tokens_seen=result.tokens_seen,
        train_seconds=result.train_seconds,
        train_cpu_seconds=result.cpu_seconds,
        data=loaded_data(run_dir),
        seconds=clock.laps,
        analysis=analysis.get("valid"),
        analysis_ood={name: analysis.get(name) for name in corpora} or None,
        curves={"val_loss": metric_curve(run_dir)},
    )


@dataclass(frozen=True)
class LMSeed:
    """One language-model run's record: its record.json, and an entry of its model's "seeds" in results.json
    (without the curves)."""

    seed: int
    val_ppl: float
    test_ppl: float
    val_loss: float  # mean loss over the held-out tokens evaluated (nats/token): the paired statistics' value
    test_loss: float
    val_tokens: int
    test_tokens: int
    tokens_seen: int  # training tokens
    train_seconds: float  # wall time of the training steps
    train_cpu_seconds: float  # process CPU time of the training steps
    data: dict | None  # the data's source, sha256 and sizes (summary.json's "data")
    seconds: dict[str, dict[str, float]]  # per phase (train, analysis): {"wall": s, "cpu": s}
    analysis: dict | None  # `mhmoe.analysis.routing.summarize` on held-out text (None: dense)
    analysis_ood: dict[str, dict | None] | None  # the same per out-of-distribution corpus
    curves: dict[str, list]  # {"val_loss": [(tokens, loss), ...]}
    val_bpb: float | None = None  # bits per byte of the held-out text (None: a record from before they were kept)
    test_bpb: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "LMSeed":
        """A record read back (record.json); DataError naming what it lacks."""
        required = [f for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [f.name for f in required if f.name not in record]
        if missing:
            raise DataError(f"a run record lacks {', '.join(missing)}: not a record of `reproduce english`")
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})


def aggregate(variant: Variant, cfg: RunConfig, runs: list[dict]) -> dict:
    """A model's results.json entry (`aggregate_seeds`) from whole English run records (`LMSeed`, a reused
    record.json included: DataError naming what one lacks)."""
    for record in runs:
        LMSeed.from_dict(record)
    return aggregate_seeds(variant, cfg, runs)


def aggregate_seeds(variant: Variant, cfg: RunConfig, runs: list[dict]) -> dict:
    """A model's results.json entry: size and cost, perplexities (mean and std over seeds), routing in and out of
    distribution (means over seeds; the *_ood values averaged over the other corpora), the seeds. The records may
    be another task's that extend these keys (multilingual's)."""
    entry = {
        # the model as trained: its vocabulary is the tokenizer's, not the preset's (`planned_vocab`)
        **model_fields(
            variant, gpt_cost(dataclasses.replace(cfg.model, vocab_size=planned_vocab(cfg))), cfg.model.d_model
        ),
        **seed_stats(runs, ("val_ppl", "test_ppl", "val_bpb", "test_bpb")),
    }
    entry["activation_threshold"] = mean_of(runs, "analysis", "threshold")
    for key in ANALYSIS_KEYS:
        entry[key] = mean_of(runs, "analysis", key)
    reports = [r.get("analysis_ood") or {} for r in runs]
    names = sorted({name for report in reports for name, summary in report.items() if summary})
    ood = {
        name: {key: _mean([report[name].get(key) for report in reports if report.get(name)]) for key in ANALYSIS_KEYS}
        for name in names
    }
    entry["ood"] = ood or None
    for key in ANALYSIS_KEYS:
        entry[f"{key}_ood"] = _mean([ood[name][key] for name in names])
    return {**entry, **run_fields(runs)}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def table(results: dict, scope: str | None = None) -> str:
    """The results as markdown: models and perplexities, paired differences, routing in and out of distribution.
    `scope` says what the perplexities cover where it is not the English held-out text (`_scope`)."""
    models = results["models"]
    lines = []
    primary = primary_markdown((results.get("primary") or {}).get("val_loss", []), "val ppl")
    if primary:
        lines += ["**Primary contrasts** (declared in the code before any run; each read at 5%, not adjusted)", ""]
        lines += [primary, "", f"{len(next(iter(models.values()))['seeds'])} seed(s) per model.", ""]
    header = (
        "| model | matching | experts × hidden | params total | params active | MFLOPs/token | val ppl | test ppl "
        "| val bits/byte | tokens/model | train s (CPU s) |"
    )
    lines += [header, "|---|---|---|" + "---:|" * (header.count("|") - 4)]
    for name, m in models.items():
        n = len(m["seeds"])
        lines.append(
            f"| {name} | {m['matching']} | {experts_cell(m)} | {m['params_total'] / 1e6:.2f} M "
            f"| {m['params_active'] / 1e6:.2f} M | {m['flops_per_token'] / 1e6:.2f} "
            f"| {fmt(m['val_ppl'], m['val_ppl_std'], n)} | {fmt(m['test_ppl'], m['test_ppl_std'], n)} "
            f"| {fmt(m.get('val_bpb'), m.get('val_bpb_std'), n, 4)} "
            f"| {m['tokens_seen']:,} | {m['train_seconds']:.0f} ({_cpu_seconds(m)}) |"
        )
    seeds = len(next(iter(models.values()))["seeds"])
    lines += ["", f"{seeds} seed(s){' (mean ± std)' if seeds > 1 else ''}; {scope or _scope(results)}.", ""]
    if results.get("part") == "family":
        lines += family_table(models)
    family = (results.get("holm_family") or {}).get("val_loss")
    label = "Exploratory: paired per-seed differences of validation perplexity"
    lines += [f"**{label}**" + (f" (Holm over {family} exploratory contrasts)" if family else ""), ""]
    lines += [paired_markdown(results["paired"]["val_loss"], "val ppl"), "", POWER_NOTE, ""]
    attribution = attribution_markdown((results.get("attribution") or {}).get("val_loss", []), "val ppl")
    if attribution:
        lines += ["**Attribution: each pair, with everything it changes**", "", attribution, ""]
    lines += routing_tables(results)
    return "\n".join(lines)


def family_table(models: dict[str, dict]) -> list[str]:
    """Each model's place in the family (`common.family_fields`): heads, pools, latent and expert width, router,
    top-k, and the values a token sends through one MoE layer's forward all-to-alls under EP and HP."""
    first = next(iter(models.values()))
    lines = [
        "**The family's layers**",
        "",
        "| model | heads | pools | latent width | expert input | router | top-k per item "
        f"| all-to-all values/token EP | HP ({first.get('all_to_all_ranks')} ranks) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, m in models.items():
        if "all_to_all_values_ep" not in m:
            continue
        hp = m["all_to_all_values_hp"]
        lines.append(
            f"| {name} | {m['num_heads']} | {m['pools']} | {m['latent_dim'] or '-'} | {m['expert_width']} "
            f"| {m['router']} | {m['top_k']} | {m['all_to_all_values_ep']:.0f} | {'-' if hp is None else f'{hp:.0f}'} |"
        )
    lines += [
        "",
        "latent width: '-' = the model's; values per token through one MoE layer's forward dispatch and combine "
        "(multiply by the bytes of the dtype; the backward sends as many again): EP expected under even routing, HP "
        "exact and only for a pool per head (`mhmoe.models.cost.all_to_all_values_per_token`). The routing tables' "
        "divergence compares expert numbers across heads, so it means nothing where every head has its own pool.",
        "",
    ]
    return lines


def routing_tables(results: dict) -> list[str]:
    """Routing on held-out text and on each out-of-distribution corpus: effective experts pooled and per head
    (% of E), relative activation, and sub-token divergence beside its chance value."""

    models = results["models"]
    corpora = [("held-out", None)] + [(name, name) for name in (results.get("ood_data") or {})]
    lines = [
        "**Routing** (means over MoE layers and seeds)",
        "",
        "| model | text | eff. experts pooled | per head | active (relative) pooled | per head | divergence / chance "
        "| top-1 divergence / chance |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        if not m["num_experts"]:
            continue
        for label, key in corpora:
            r = m if key is None else (m.get("ood") or {}).get(key) or {}
            keys = ("effective_fraction", "effective_fraction_head", "activation_relative", "activation_relative_head")
            pct = [pct_cell(r.get(k)) for k in keys]
            divergence = ("divergence_mean", "divergence_chance", "divergence_top1", "divergence_top1_chance")
            num = [num_cell(r.get(k)) for k in divergence]
            lines.append(f"| {name} | {label} | {' | '.join(pct)} | {num[0]} / {num[1]} | {num[2]} / {num[3]} |")
    lines += [
        "",
        "eff. experts = exp(entropy of the expert shares) as % of E, pooled over the H sub-token streams and per head; "
        "active (relative) = share of (layer, expert) cells chosen by more than a quarter of the uniform rate K/E "
        f"of sub-tokens, pooled and per head (each head's own sub-tokens: (layer, head, expert) cells) (the fixed {DEFAULT_ACTIVATION_THRESHOLD:.0%} threshold of earlier tables saturates at E = 8); "
        "divergence = distinct experts reached by a token's sub-tokens (all K choices; top-1: first choices only), "
        "beside its value if each head routed independently at its own measured rates.",
    ]
    return lines


def _scope(results: dict) -> str:
    """What the perplexities cover, the data they come from, and what the seconds are."""
    first = next(iter(results["models"].values()))["seeds"][0]
    batches = results["budget"]["train"]["final_eval_batches"]
    scope = (
        f"perplexity over the first {first['val_tokens']:,} / {first['test_tokens']:,} tokens of the held-out "
        f"valid / test documents (train.final_eval_batches={batches}; `mhmoe eval RUN --max-batches {batches}` gives "
        "the same values, without it all of each split)"
        if first.get("test_tokens") and batches
        else f"perplexity over the first {batches} batches of each held-out split (valid / test documents)"
        if batches
        else "perplexity over all of the held-out valid / test documents"
    )
    data = results.get("data")
    if data:
        scope += f"; data: {data['source']} (sha256 {data['sha256'][:12]}…)"
    return scope + "; train s: wall time, CPU s: process CPU time of the training steps (steadier on a busy machine)"


def _cpu_seconds(model: dict) -> str:
    values = [s["train_cpu_seconds"] for s in model["seeds"] if s.get("train_cpu_seconds") is not None]
    return f"{statistics.fmean(values):.0f}" if values else "-"


def retabulate(out: Path) -> dict:
    """results.json / results.md of a finished run into `out`, recomputed by this version (`common.retabulate`)."""
    return common_retabulate(out, table, ("val_loss", "test_loss"))
