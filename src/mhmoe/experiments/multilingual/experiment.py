"""`mhmoe reproduce multilingual`: Dense vs SMoE vs X-MoE vs MH-MoE on language-tagged text
(docs/paper-notes.md §5-6).

The five models and budgets of `mhmoe reproduce english` (`mhmoe.experiments.common`), on a multilingual corpus
(`mhmoe.data.multilingual`): one shared BPE tokenizer trained once on temperature-sampled text (q_l ∝ p_l^α,
α = data.language_alpha), training batches drawn with the same temperature, and per language after training:
    perplexity and bits per byte   validation and test, per language and averaged over languages
    expert usage                   language × expert share per MoE layer (heat maps), and the mutual
                                   information between language and expert choice
    sub-token divergence           (MH-MoE) distinct experts per token's sub-tokens, for false cognates vs
                                   control words (same spelling, same meaning) vs all other words (words.py)

Averages weigh languages equally: the average perplexity is exp(mean over languages of the mean loss per
token), i.e. the geometric mean of the per-language perplexities; the average bits per byte is the mean of the
per-language values. Perplexities of different tokenizers are not comparable; bits per byte are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mhmoe.analysis.plots import plot_curves, plot_divergence_histogram, plot_language_usage
from mhmoe.analysis.routing import expert_shares, head_usage, language_expert_information
from mhmoe.analysis.runs import LoadedRun, analyze_run, collect_routing, evaluate_languages, language_averages, load_run
from mhmoe.data.multilingual import (
    MultilingualCorpus,
    language_probabilities,
    languages_of,
    load_multilingual,
    split_key,
    tokenizer_text,
)
from mhmoe.errors import DataError
from mhmoe.experiments import english
from mhmoe.experiments.common import (
    Clock,
    Part,
    PlannedModel,
    Variant,
    contrast_tables,
    copy_figure,
    fmt,
    mean_std,
    metric_curve,
    run_variants,
    seed_stats,
    split_bands,
    write_results,
)
from mhmoe.experiments.common import retabulate as common_retabulate
from mhmoe.experiments.multilingual.words import GROUPS, divergence_inputs, word_divergence
from mhmoe.experiments.plan import Options, PartSetup, dry_run_part, start_part
from mhmoe.train.config import RunConfig, apply_overrides
from mhmoe.train.lm import data_path, train

DATA_ENV = "MHMOE_MULTILINGUAL_DATA"


@dataclass
class AnalysisBudget:
    """How much held-out text the per-language evaluation and the analyses read (batches of the run's B × L)."""

    eval_batches: int  # per language and split, for perplexity and bits per byte (0 = the whole split)
    usage_batches: int  # per language, for the language × expert shares
    word_occurrences: int  # per (word, language), for the divergence analysis
    routing_batches: int = 8  # held-out batches (all languages) and per other corpus, for the routing analysis


def multilingual_config(cfg: RunConfig) -> RunConfig:
    """An English budget's configuration (same models, steps and batch) on language-tagged data with temperature
    sampling.

    The trainer's own final evaluation (on all languages interleaved) only feeds the curves here; the reported
    numbers come from the per-language evaluation, so it is kept as short as the periodic one.
    """
    return apply_overrides(cfg, ["data.multilingual=true", f"train.final_eval_batches={cfg.train.eval_batches}"])


def analysis_budget(quick: bool, gpu: bool) -> AnalysisBudget:
    if gpu:
        return AnalysisBudget(eval_batches=0, usage_batches=6, word_occurrences=64)
    if quick:
        return AnalysisBudget(eval_batches=3, usage_batches=2, word_occurrences=8)
    return AnalysisBudget(eval_batches=10, usage_batches=4, word_occurrences=32, routing_batches=20)


def setup(
    quick: bool,
    gpu: bool,
    seeds: int,
    overrides: Sequence[str],
    part: Part,
    other_corpora: int,
    data: str,
    options: Options,
) -> tuple[PartSetup, RunConfig, MultilingualCorpus]:
    """The part's plan, run configuration and corpus (read to count its languages: each is evaluated and
    analysed on its own, a whole split counted as 8 batches); the English budget's plan (`english.make_plan`)
    with the multilingual data, its steps sized on the device with `gpu`."""
    plan, cfg = english.make_plan(quick, gpu, part, seeds, [], options)
    plan = dataclasses.replace(plan, task="multilingual")
    multilingual_config(cfg)
    cfg.data.path = data_location(data)
    apply_overrides(cfg, list(overrides))
    plan = plan.with_steps(cfg.train.max_steps)
    budget = analysis_budget(quick, gpu)
    corpus = run_corpus(cfg)
    per_language = 2 * (budget.eval_batches or 8) + budget.usage_batches
    extra = budget.routing_batches * (1 + other_corpora) + len(corpus.languages) * per_language
    return english.lm_setup(plan, cfg, english.models(cfg, part), extra, gpu), cfg, corpus


def plan(
    quick: bool = False,
    gpu: bool = False,
    overrides: Sequence[str] = (),
    part: Part = "core",
    other_corpora: int = 0,
    data: str = "",
) -> list[PlannedModel]:
    """What `run` would train at the budget's steps (before any sizing); reads the corpus."""
    return setup(quick, gpu, 1, overrides, part, other_corpora, data, Options())[0].planned()


def dry_run(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    overrides: Sequence[str] = (),
    part: Part = "core",
    other_corpora: int = 0,
    data: str = "",
    options: Options = Options(),
    measure: bool = False,
) -> str:
    """The plan as `run` would size it, with its estimated time, from rates measured by the smoke step
    (`measure`) or assumed (`english.dry_run`)."""
    setup_, _, _ = setup(quick, gpu, seeds, overrides, part, other_corpora, data, options)
    return dry_run_part(setup_, out, measure, options.tflops(gpu))


def data_location(data: str) -> str:
    """--data, else $MHMOE_MULTILINGUAL_DATA; there is no built-in multilingual corpus."""
    location = data or os.environ.get(DATA_ENV, "")
    if not location:
        raise DataError(
            f"no multilingual data: pass --data DIR (a folder of <lang>.train.txt(.gz) / <lang>.valid.txt(.gz) files, "
            f'of <lang>.txt files, or JSONL with "text" and "lang") or set {DATA_ENV}'
        )
    return location


# ------------------------------------------------------------------------------------------ the experiment


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
    """Train every model of `part` for every seed on the same batches, evaluate and analyse per language, write
    results.json (with paired statistics) / results.md / val_curves.png / heatmaps/ / divergence/ in `out`. With
    `gpu` the part starts with the smoke and rate step and its steps are sized to `options.budget_min`."""
    corpora = english.ood_corpora([ood] if isinstance(ood, str) else ood)
    part_setup, cfg, corpus = setup(quick, gpu, seeds, overrides or [], part, len(corpora), data, options)
    budget = analysis_budget(quick, gpu)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan, rates = start_part(part_setup, out, gpu, options.keep_checkpoints)
    if corpus.ignored:
        print(f"note: not part of the corpus: {', '.join(corpus.ignored)}", file=sys.stderr, flush=True)
    tokenizer_seconds = english.shared_tokenizer(cfg, out, lambda: tokenizer_text(corpus, cfg.data.language_alpha))
    shared = _Shared(out, corpus, budget, corpora, progress)
    run_seed = functools.partial(_run_seed, shared)
    models, curves = run_variants(
        cfg, part_setup.variants, plan.seeds, out, run_seed, aggregate, keep_checkpoints=options.keep_checkpoints
    )
    results = {
        "task": "multilingual",
        "part": part,
        "plan": plan.to_dict(),
        "rates": [dataclasses.asdict(r) for r in rates],
        "models": models,
        **contrast_tables(models, ("val_loss", "test_loss"), primary=plan.part.primary),
        "budget": cfg.to_dict(),
        "analysis_budget": vars(budget),
        "languages": shared.languages,
        "language_alpha": cfg.data.language_alpha,
        "ood_data": {name: str(path) for name, path in corpora.items()} or None,
        "phases": {"tokenizer_seconds": tokenizer_seconds},
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(out, results, table)
    mean, bands = split_bands(curves["val_loss"])
    title, ylabel = "validation loss (all languages, interleaved)", "validation loss (nats/token)"
    plot_curves(mean, out / "val_curves.png", title, ylabel=ylabel, bands=bands)
    return results


@dataclass
class _Shared:
    """What every run of a comparison shares; the language table and the divergence inputs depend only on the
    (shared) tokenizer, so the first run finds them."""

    out: Path
    corpus: MultilingualCorpus
    budget: AnalysisBudget
    ood: dict[str, Path]
    progress: bool
    languages: dict = field(default_factory=dict)
    windows: dict | None = None


def _run_seed(shared: _Shared, variant: Variant, seed: int, cfg: RunConfig, run_dir: Path) -> dict:
    """Train one model, evaluate it per language and analyse its routing: the seed's record."""
    clock = Clock()
    result = train(cfg, run_dir, progress=shared.progress)
    clock.lap("train")
    loaded = load_run(run_dir)
    if shared.windows is None:
        shared.languages = language_table(loaded)
        seq_len, occurrences = loaded.cfg.model.seq_len, shared.budget.word_occurrences
        shared.windows = divergence_inputs(loaded.tokenizer, shared.corpus, seq_len, occurrences)
    per_language = evaluate_languages(loaded, shared.budget.eval_batches)
    clock.lap("evaluation")
    other = english.ood_tokens(shared.ood, loaded.tokenizer)
    analysis = analyze_run(run_dir, other=other, max_batches=shared.budget.routing_batches, run=loaded)
    usage = language_usage(loaded, shared.budget.usage_batches)
    divergence = word_divergence(loaded, shared.windows)
    clock.lap("analysis")
    if seed == 0:
        _plot_run(shared.out, variant.name, usage, divergence)
        copy_figure(run_dir / "analysis" / "heatmap-valid.png", shared.out / "heatmaps" / f"{variant.name}.png")
    return {
        "seed": seed,
        **language_averages(per_language),
        "per_language": per_language,
        "tokens_seen": result.tokens_seen,
        "train_seconds": result.train_seconds,
        "seconds": clock.laps,
        "analysis_seconds": clock.laps["evaluation"]["wall"] + clock.laps["analysis"]["wall"],
        "analysis": analysis.get("valid"),
        "analysis_ood": {name: analysis.get(name) for name in shared.ood} or None,
        "language_mi_bits": usage["mi_bits_mean"],
        "language_mi_bits_head": usage["mi_bits_head_mean"],
        "language_usage": {**usage, "shares": None if usage["shares"] is None else usage["shares"].tolist()},
        "divergence": divergence,
        "curves": {"val_loss": metric_curve(run_dir)},
    }


def run_corpus(cfg: RunConfig) -> MultilingualCorpus:
    """The corpus exactly as the trainer loads it for `cfg` (same path, fractions and languages)."""
    d = cfg.data
    languages = [lang.strip() for lang in d.languages.split(",") if lang.strip()]
    return load_multilingual(
        data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction, languages=languages
    )


# --------------------------------------------------------------------------------- per-language evaluation


def language_table(run: LoadedRun) -> dict[str, dict]:
    """Per language: training tokens, natural share p (tokens), temperature probability q, and how many epochs of
    the language the run's budget draws (q · tokens per run / its training tokens)."""
    sizes = {lang: len(run.splits[split_key("train", lang)]) for lang in languages_of(run.splits)}
    natural = language_probabilities(sizes, 1.0)
    q = language_probabilities(sizes, run.cfg.data.language_alpha)
    t = run.cfg.train
    drawn = t.max_steps * t.grad_accum * t.batch_size * run.cfg.model.seq_len
    return {
        lang: {
            "train_tokens": n,
            "valid_tokens": len(run.splits[split_key("valid", lang)]),
            "natural_share": natural[lang],
            "probability": q[lang],
            "epochs": q[lang] * drawn / n,
        }
        for lang, n in sizes.items()
    }


# ------------------------------------------------------------------------------------------------ analyses


def language_usage(run: LoadedRun, max_batches: int) -> dict:
    """(languages, MoE layers, E) expert shares on each language's validation text, and I(language; expert) per
    layer: pooled over the H sub-token streams ("mi_bits") and per head ("mi_bits_head": each head's own expert
    choice; pooled streams can look language-neutral while each head is not, or the reverse)."""
    langs = languages_of(run.splits)
    if not run.model.moe_layers():
        return {"languages": langs, "layers": [], "shares": None, "mi_bits": [], "mi_bits_mean": None,
                "mi_bits_head": [], "mi_bits_head_mean": None}  # fmt: skip
    per_lang = [collect_routing(run, run.splits[split_key("valid", lang)], max_batches) for lang in langs]
    shares = np.stack([[expert_shares(layer) for layer in layers] for layers in per_lang])  # (n_lang, n_layers, E)
    heads = np.stack([[head_usage(layer) for layer in layers] for layers in per_lang])  # (n_lang, n_layers, H, E)
    mi = [language_expert_information(shares[:, i]) for i in range(shares.shape[1])]
    mi_head = [
        [language_expert_information(heads[:, i, h]) for h in range(heads.shape[2])] for i in range(heads.shape[1])
    ]
    return {
        "languages": langs,
        "layers": [layer.name for layer in per_lang[0]],
        "shares": shares,
        "mi_bits": mi,
        "mi_bits_mean": float(np.mean(mi)),
        "mi_bits_head": mi_head,
        "mi_bits_head_mean": float(np.mean(mi_head)),
    }


def _plot_run(out: Path, name: str, usage: dict, divergence: dict | None) -> None:
    if usage["shares"] is not None:
        for i, layer in enumerate(usage["layers"]):
            plot_language_usage(
                usage["shares"][:, i],
                out / "heatmaps" / f"{name}-languages-{layer.replace(' ', '')}.png",
                f"{name}: expert share per language, {layer} (I = {usage['mi_bits'][i]:.3f} bits)",
                usage["languages"],
            )
    if divergence is not None:
        groups = {g: np.asarray(v) for g, v in divergence["values"].items() if v}
        if groups:
            plot_divergence_histogram(
                groups, out / "divergence" / f"{name}.png", f"{name}: sub-token divergence, held-out text"
            )


# ------------------------------------------------------------------------------------------------- results


def aggregate(variant: Variant, cfg: RunConfig, runs: list[dict]) -> dict:
    """The English aggregate (val/test ppl = language averages) plus bits per byte, per-language numbers, the
    language-expert information and the divergence groups, each as mean (and std over seeds)."""
    model = english.aggregate_seeds(variant, cfg, runs)
    stats = ("val_bpb", "test_bpb", "val_bpb_pooled", "test_bpb_pooled", "language_mi_bits", "language_mi_bits_head")
    model.update(seed_stats(runs, stats))
    model["per_language"] = {}
    for lang in runs[0]["per_language"]:
        row: dict[str, float | None] = {}
        for key in ("valid_ppl", "test_ppl", "valid_bpb", "test_bpb"):
            row[key], row[f"{key}_std"] = mean_std([r["per_language"][lang][key] for r in runs])
        model["per_language"][lang] = row
    if runs[0]["divergence"] is not None:
        model["divergence"] = {}
        for g in GROUPS:
            means = [r["divergence"]["groups"][g]["mean"] for r in runs]
            model["divergence"][g] = mean_std(means) if None not in means else (None, None)
        model["divergence_tokens"] = {g: runs[0]["divergence"]["groups"][g]["tokens"] for g in GROUPS}
    else:
        model["divergence"] = None
    model["analysis_seconds"] = statistics.fmean(r["analysis_seconds"] for r in runs)
    for r in model["seeds"]:
        if r.get("divergence"):
            r["divergence"] = {k: v for k, v in r["divergence"].items() if k != "values"}  # keep results.json small
    return model


def table(results: dict) -> str:
    """The English table (val/test ppl = language averages), then per-language perplexity and bits per byte, then
    the routing analyses."""
    models = results["models"]
    seeds = len(next(iter(models.values()))["seeds"])
    langs = results["languages"]
    b = results["analysis_budget"]
    covered = f"the first {b['eval_batches']} batch(es)" if b.get("eval_batches") else "all"
    scope = (
        f"val / test ppl = exp of the mean per-language loss over {covered} of each language's held-out split "
        "(languages weigh equally; per language below); train s: wall time, CPU s: process CPU time of the training "
        "steps"
    )
    lines = [english.table(results, scope), ""]
    head = "| language | q (p) | train tokens | epochs |" + "".join(f" {n} |" for n in models)
    rule = "|---|---:|---:|---:|" + "---:|" * len(models)
    for title, key, digits in (("validation perplexity", "valid_ppl", 1), ("validation bits per byte", "valid_bpb", 3)):
        lines += [f"**{title} per language**", "", head, rule]
        for lang, info in langs.items():
            cells = "".join(
                f" {fmt(m['per_language'][lang][key], m['per_language'][lang][key + '_std'], seeds, digits)} |"
                for m in models.values()
            )
            lines.append(
                f"| {lang} | {info['probability']:.3f} ({info['natural_share']:.3f}) | {info['train_tokens']:,} "
                f"| {info['epochs']:.2f} |{cells}"
            )
        avg = "val_ppl" if key == "valid_ppl" else "val_bpb"
        cells = "".join(f" {fmt(m[avg], m[avg + '_std'], seeds, digits)} |" for m in models.values())
        lines += [f"| **average** | | | |{cells}", ""]
    lines += [
        "**routing by language and word**",
        "",
        "| model | I(language; expert) bits, pooled | per head | divergence: false cognates | control words "
        "| other words |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        div = m.get("divergence")
        cells = (
            " | ".join(f"{fmt(div[g][0], div[g][1], seeds)} (n={m['divergence_tokens'][g]:,})" for g in GROUPS)
            if div
            else "- | - | -"
        )
        mi = fmt(m["language_mi_bits"], m["language_mi_bits_std"], seeds, 3)
        mi_head = fmt(m.get("language_mi_bits_head"), m.get("language_mi_bits_head_std"), seeds, 3)
        lines.append(f"| {name} | {mi} | {mi_head} | {cells} |")
    lines += [
        "",
        f"Languages weigh equally in the averages (ppl: exp of the mean per-language loss; bpb: mean of the "
        f"per-language bits per byte = nats / (UTF-8 bytes · ln 2)); q = temperature probability of a language in "
        f"tokenizer text and batches (alpha {results['language_alpha']}), p = its share of the training tokens; epochs = "
        f"passes over the language's training tokens in one run. Per-language numbers on the first "
        f"{b['eval_batches'] or 'all'} batch(es) of each language's split. I(language; expert) = mutual information "
        "between the language of a token and the expert chosen (languages weighted equally; at most min(log2 L, log2 E) "
        "bits), mean over MoE layers, pooled over a token's sub-tokens or per head (each head's own choices). "
        "Divergence = distinct experts reached by a token's sub-tokens, mean over MoE layers (MH-MoE only), for the "
        f"tokens of up to {b['word_occurrences']} held-out occurrences per listed word and language "
        "(mhmoe/experiments/multilingual/wordlists.py) and of all other words in the same windows; n = tokens of seed 0.",
    ]
    return "\n".join(lines)


def retabulate(out: Path) -> dict:
    """results.json / results.md of a finished run into `out`, recomputed by this version (`common.retabulate`)."""
    return common_retabulate(out, table, ("val_loss", "test_loss"))
