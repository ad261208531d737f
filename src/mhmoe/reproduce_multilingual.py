"""`mhmoe reproduce multilingual`: Dense vs SMoE vs X-MoE vs MH-MoE on language-tagged text (PAPER.md §5-6).

The five models and budgets of `mhmoe reproduce english` (`english_variants`, sizes from the same presets), on a
multilingual corpus (`mhmoe.data.multilingual`): one shared BPE tokenizer trained once on temperature-sampled
text (q_l ∝ p_l^α, α = data.language_alpha), training batches drawn with the same temperature, and per
language after training:
    perplexity and bits per byte   validation and test, per language and averaged over languages
    expert usage                   language × expert share per MoE layer (heat maps), and the mutual
                                   information between language and expert choice
    sub-token divergence           (MH-MoE) distinct experts per token's sub-tokens, for false cognates vs
                                   control words (same spelling, same meaning) vs all other words (wordlists.py)

Averages weigh languages equally: the average perplexity is exp(mean over languages of the mean loss per
token), i.e. the geometric mean of the per-language perplexities; the average bits per byte is the mean of the
per-language values. Perplexities of different tokenizers are not comparable; bits per byte are.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mhmoe.errors import DataError
from mhmoe.reproduce import (
    aggregate_runs,
    copy_figure,
    english_base,
    english_variants,
    mean_curve,
    mean_std,
    ood_tokens,
    val_curve,
    variant_seeds,
)
from mhmoe.reproduce import results_table as english_table
from mhmoe.train.checkpoint import write_text_atomically
from mhmoe.train.config import RunConfig, apply_overrides
from mhmoe.train.runs import evaluate_languages, language_averages

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mhmoe.data.multilingual import MultilingualCorpus
    from mhmoe.reproduce import Variant
    from mhmoe.train.runs import LoadedRun

# (W, L) token ids, (W, L) group (0 false cognate, 1 control word, 2 other word, -1 none), (W, L) word index
Windows = tuple[np.ndarray, np.ndarray, np.ndarray]
DATA_ENV = "MHMOE_MULTILINGUAL_DATA"
GROUPS = ("false cognates", "control words", "other words")


@dataclass
class AnalysisBudget:
    """How much held-out text the per-language evaluation and the analyses read (batches of the run's B × L)."""

    eval_batches: int  # per language and split, for perplexity and bits per byte (0 = the whole split)
    usage_batches: int  # per language, for the language × expert shares
    word_occurrences: int  # per (word, language), for the divergence analysis


def multilingual_base(quick: bool, gpu: bool) -> RunConfig:
    """The English budgets (same models, steps and batch), on language-tagged data with temperature sampling.

    The trainer's own final evaluation (on all languages interleaved) only feeds the curves here; the reported
    numbers come from the per-language evaluation, so it is kept as short as the periodic one.
    """
    base = english_base(quick, gpu)
    return apply_overrides(base, ["data.multilingual=true", f"train.final_eval_batches={base.train.eval_batches}"])


def analysis_budget(quick: bool, gpu: bool) -> AnalysisBudget:
    if gpu:
        return AnalysisBudget(eval_batches=0, usage_batches=8, word_occurrences=64)
    if quick:
        return AnalysisBudget(eval_batches=3, usage_batches=2, word_occurrences=8)
    return AnalysisBudget(eval_batches=10, usage_batches=4, word_occurrences=32)


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


def reproduce_multilingual(
    out: Path,
    quick: bool = False,
    gpu: bool = False,
    seeds: int = 1,
    data: str = "",
    overrides: list[str] | None = None,
    progress: bool = True,
    ood: str = "",
) -> dict:
    """Train every variant for every seed on the same batches, evaluate and analyse per language, write
    results.json / results.md / val_curves.png / heatmaps/ / divergence/ in `out`."""
    from mhmoe.plots import plot_curves
    from mhmoe.train.runs import analyze_run, load_run
    from mhmoe.train.trainer import train

    base = multilingual_base(quick, gpu)
    base.data.path = data_location(data)
    apply_overrides(base, overrides or [])
    budget = analysis_budget(quick, gpu)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    corpus = run_corpus(base)
    if corpus.ignored:
        print(f"note: not part of the corpus: {', '.join(corpus.ignored)}", file=sys.stderr, flush=True)
    shared_tokenizer(base, corpus, out)
    models: dict[str, dict] = {}
    curves, bands = {}, {}
    languages: dict = {}
    word_windows = None  # the divergence inputs depend only on the (shared) tokenizer: found once
    for variant in english_variants(base):
        runs = []
        for seed, cfg, run_dir in variant_seeds(base, variant, seeds, out):
            result = train(cfg, run_dir, progress=progress)
            t0 = time.perf_counter()
            run = load_run(run_dir)
            languages = languages or language_table(run)
            per_language = evaluate_languages(run, budget.eval_batches)
            analysis = analyze_run(
                run_dir, other=ood_tokens(ood, run.tokenizer), max_batches=8 if quick else 20, run=run
            )
            usage = language_usage(run, budget.usage_batches)
            if word_windows is None:
                word_windows = divergence_inputs(run.tokenizer, corpus, run.cfg.model.seq_len, budget.word_occurrences)
            divergence = word_divergence(run, word_windows)
            if seed == 0:
                _plot_run(out, variant.name, usage, divergence)
                copy_figure(run_dir / "analysis" / "heatmap-valid.png", out / "heatmaps" / f"{variant.name}.png")
            runs.append(
                {
                    "seed": seed,
                    **language_averages(per_language),
                    "per_language": per_language,
                    "tokens_seen": result.tokens_seen,
                    "train_seconds": result.train_seconds,
                    "analysis_seconds": time.perf_counter() - t0,
                    "analysis": analysis.get("valid"),
                    "analysis_ood": analysis.get("ood"),
                    "language_mi_bits": usage["mi_bits_mean"],
                    "language_usage": {
                        **usage,
                        "shares": None if usage["shares"] is None else usage["shares"].tolist(),
                    },
                    "divergence": divergence,
                    "curve": val_curve(run_dir),
                }
            )
        models[variant.name] = _aggregate_multilingual(variant, cfg, runs)
        curves[variant.name], bands[variant.name] = mean_curve([r["curve"] for r in runs])
    results = {
        "task": "multilingual",
        "models": models,
        "budget": base.to_dict(),
        "analysis_budget": vars(budget),
        "languages": languages,
        "language_alpha": base.data.language_alpha,
        "ood_data": ood or None,
        "wall_seconds": time.perf_counter() - started,
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomically(out / "results.md", results_table(results) + "\n")
    plot_curves(curves, out / "val_curves.png", "validation loss (all languages, interleaved)", bands=bands)
    return results


def run_corpus(cfg: RunConfig) -> MultilingualCorpus:
    """The corpus exactly as the trainer loads it for `cfg` (same path, fractions and languages)."""
    from mhmoe.data.multilingual import load_multilingual
    from mhmoe.train.trainer import data_path

    d = cfg.data
    languages = [lang.strip() for lang in d.languages.split(",") if lang.strip()]
    return load_multilingual(
        data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction, languages=languages
    )


def shared_tokenizer(base: RunConfig, corpus: MultilingualCorpus, out: Path) -> None:
    """Train the BPE tokenizer once, on temperature-sampled text, and point every run at it (`out/tokenizer.json`):
    the same tokens for every model, so their perplexities compare, and one training instead of one per run."""
    if base.data.tokenizer != "bpe":
        return
    from mhmoe.data import BPETokenizer
    from mhmoe.data.multilingual import tokenizer_text

    path = out / "tokenizer.json"
    if not path.exists():
        print(
            f"training the shared BPE tokenizer ({base.data.vocab_size} tokens, alpha {base.data.language_alpha})",
            flush=True,
        )
        BPETokenizer.train(tokenizer_text(corpus, base.data.language_alpha), base.data.vocab_size).save(path)
    base.data.tokenizer = str(path.resolve())


# --------------------------------------------------------------------------------- per-language evaluation


def language_table(run: LoadedRun) -> dict[str, dict]:
    """Per language: training tokens, natural share p (tokens), temperature probability q, and how many epochs of
    the language the run's budget draws (q · tokens per run / its training tokens)."""
    from mhmoe.data.multilingual import language_probabilities, languages_of, split_key

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
    """(languages, MoE layers, E) expert shares on each language's validation text, and I(language; expert)."""
    from mhmoe.analysis import expert_shares, language_expert_information
    from mhmoe.data.multilingual import languages_of, split_key
    from mhmoe.train.runs import collect_routing

    langs = languages_of(run.splits)
    if not run.model.moe_layers():
        return {"languages": langs, "layers": [], "shares": None, "mi_bits": [], "mi_bits_mean": None}
    per_lang = [collect_routing(run, run.splits[split_key("valid", lang)], max_batches) for lang in langs]
    shares = np.stack([[expert_shares(layer) for layer in layers] for layers in per_lang])  # (n_lang, n_layers, E)
    mi = [language_expert_information(shares[:, i]) for i in range(shares.shape[1])]
    return {
        "languages": langs,
        "layers": [layer.name for layer in per_lang[0]],
        "shares": shares,
        "mi_bits": mi,
        "mi_bits_mean": float(np.mean(mi)),
    }


def divergence_inputs(tokenizer: Any, corpus: MultilingualCorpus, seq_len: int, occurrences: int) -> dict[str, Windows]:
    """{lang: `divergence_windows` of its validation then test documents}, for languages where a listed word occurs."""
    found = {}
    for lang, c in corpus.languages.items():
        windows = divergence_windows(tokenizer, c.valid + c.test, lang, seq_len, occurrences)
        if windows is not None:
            found[lang] = windows
    return found


def word_divergence(run: LoadedRun, inputs: dict[str, Windows]) -> dict | None:
    """Sub-token divergence of false cognates, control words and all other words in held-out text (MH-MoE).

    `inputs` (`divergence_inputs`): per language, the windows of L tokens holding the first occurrences of each
    listed word (wordlists.py, only in the languages it is listed for), every token labelled: a selected listed
    word's token (its group), another word's token ("other words"), or neither (punctuation, space-only tokens,
    occurrences of listed words beyond the quota: left out). The windows are routed through the model; per token,
    the divergence is averaged over the MoE layers (`mean_divergence`). None for models without MH-MoE layers
    (a plain MoE token has one sub-token: its divergence is top-k).
    """
    from mhmoe.analysis import mean_divergence
    from mhmoe.data.wordlists import CONTROL_WORDS, FALSE_COGNATES
    from mhmoe.layers.multihead import MHMoE
    from mhmoe.train.runs import collect_routing

    if not any(isinstance(m, MHMoE) for m in run.model.moe_layers()):
        return None
    values: dict[str, list[np.ndarray]] = {g: [] for g in GROUPS}
    per_word: dict[str, dict[str, dict]] = {}
    B = run.cfg.train.batch_size
    for lang, (tokens_WL, group_WL, word_WL) in inputs.items():
        flat = np.concatenate([tokens_WL.reshape(-1), tokens_WL[-1, -1:]])  # + 1 so the last window is whole
        layers = collect_routing(run, flat, max_batches=math.ceil(len(tokens_WL) / B))
        div_T = mean_divergence(layers)
        group_T, word_T = group_WL.reshape(-1), word_WL.reshape(-1)
        for g, name in enumerate(GROUPS):
            values[name].append(div_T[group_T == g])
        for w in np.unique(word_T[word_T >= 0]):
            word = _WORDS[w]
            mask = word_T == w
            per_word.setdefault(word, {})[lang] = {"tokens": int(mask.sum()), "mean": float(div_T[mask].mean())}
    groups = {name: np.concatenate(v) if v else np.zeros(0) for name, v in values.items()}
    max_value = max(layer.num_heads * layer.top_k for layer in run.model.moe_layers() if isinstance(layer, MHMoE))
    return {
        "groups": {name: _describe(v, max_value) for name, v in groups.items()},
        "per_word": per_word,
        "false_cognate_words": sorted(FALSE_COGNATES),
        "control_words": sorted(CONTROL_WORDS),
        "values": {name: v.tolist() for name, v in groups.items()},
    }


def _word_index() -> list[str]:
    from mhmoe.data.wordlists import CONTROL_WORDS, FALSE_COGNATES

    return list(FALSE_COGNATES) + list(CONTROL_WORDS)


_WORDS = _word_index()


def divergence_windows(tokenizer: Any, docs: list[str], lang: str, seq_len: int, occurrences: int) -> Windows | None:
    """Windows of `seq_len` tokens of `docs` (joined by eos, as in training) that hold selected word occurrences.

    Returns (W, L) token ids, (W, L) group (0 false cognate, 1 control word, 2 other word, -1 none) and (W, L)
    index into `_WORDS` (-1 for tokens of no selected listed word); None if no listed word occurs.
    """
    import re

    from mhmoe.data.multilingual import token_offsets, tokens_in_spans, word_spans
    from mhmoe.data.wordlists import CONTROL_WORDS, FALSE_COGNATES, words_for

    false_words, control_words = words_for(FALSE_COGNATES, lang), words_for(CONTROL_WORDS, lang)
    if not false_words + control_words:
        return None
    ids, group, word = [], [], []
    taken = dict.fromkeys(false_words + control_words, 0)
    for doc in docs:
        doc_ids, offsets = token_offsets(tokenizer, doc)
        spans = word_spans(doc, false_words + control_words)
        listed_T = tokens_in_spans(offsets, spans)
        any_word_T = tokens_in_spans(offsets, [(m.start(), m.end(), None) for m in re.finditer(r"\w+", doc)]) >= 0
        g = np.where(any_word_T, 2, -1)
        w = np.full(len(doc_ids), -1)
        for i, (_, _, name) in enumerate(spans):
            hit = listed_T == i
            if taken[name] < occurrences:
                taken[name] += 1
                g[hit], w[hit] = (0 if name in false_words else 1), _WORDS.index(name)
            else:
                g[hit] = -1  # an occurrence beyond the quota: neither its word's group nor "other"
        ids += [doc_ids, [tokenizer.eos_id]]
        group += [g, [-1]]
        word += [w, [-1]]
    ids_T, group_T, word_T = (np.concatenate(a).astype(np.int64) for a in (ids, group, word))
    W = len(ids_T) // seq_len  # whole windows only; occurrences in the last partial one are not used
    if W == 0:
        return None
    shape = (W, seq_len)
    ids_WL, group_WL, word_WL = (a[: W * seq_len].reshape(shape) for a in (ids_T, group_T, word_T))
    keep = (word_WL >= 0).any(axis=1)
    if not keep.any():
        return None
    return ids_WL[keep], group_WL[keep], word_WL[keep]


def _describe(values: np.ndarray, max_value: int) -> dict:
    if len(values) == 0:
        return {"tokens": 0, "mean": None, "sem": None, "histogram": [0.0] * max_value}
    binned = np.clip(np.floor(values + 0.5).astype(int), 1, max_value)
    return {
        "tokens": int(len(values)),
        "mean": float(values.mean()),
        "sem": float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0,
        "histogram": (np.bincount(binned, minlength=max_value + 1)[1:] / len(values)).tolist(),
    }


def _plot_run(out: Path, name: str, usage: dict, divergence: dict | None) -> None:
    from mhmoe.plots import plot_divergence_histogram, plot_language_usage

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


def _aggregate_multilingual(variant: Variant, cfg: RunConfig, runs: list[dict]) -> dict:
    """The English aggregate (val/test ppl = language averages) plus bits per byte, per-language numbers, the
    language-expert information and the divergence groups, each as mean (and std over seeds)."""
    model = aggregate_runs(variant, cfg, runs)
    for key in ("val_bpb", "test_bpb", "val_bpb_pooled", "test_bpb_pooled", "language_mi_bits"):
        values = [r[key] for r in runs if r.get(key) is not None]
        model[key], model[f"{key}_std"] = mean_std(values) if values else (None, None)
    model["per_language"] = {}
    for lang in runs[0]["per_language"]:
        row = {}
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


def results_table(results: dict) -> str:
    """The English table (val/test ppl = language averages), then per-language perplexity and bits per byte, then
    the routing analyses."""
    models = results["models"]
    seeds = len(next(iter(models.values()))["seeds"])

    def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
        if mean is None:
            return "-"
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"

    langs = results["languages"]
    lines = [english_table(results), ""]
    head = "| language | q (p) | train tokens | epochs |" + "".join(f" {n} |" for n in models)
    rule = "|---|---:|---:|---:|" + "---:|" * len(models)
    for title, key, digits in (("validation perplexity", "valid_ppl", 1), ("validation bits per byte", "valid_bpb", 3)):
        lines += [f"**{title} per language**", "", head, rule]
        for lang, info in langs.items():
            cells = "".join(
                f" {fmt(m['per_language'][lang][key], m['per_language'][lang][key + '_std'], digits)} |"
                for m in models.values()
            )
            lines.append(
                f"| {lang} | {info['probability']:.3f} ({info['natural_share']:.3f}) | {info['train_tokens']:,} "
                f"| {info['epochs']:.2f} |{cells}"
            )
        avg = "val_ppl" if key == "valid_ppl" else "val_bpb"
        cells = "".join(f" {fmt(m[avg], m[avg + '_std'], digits)} |" for m in models.values())
        lines += [f"| **average** | | | |{cells}", ""]
    lines += [
        "**routing by language and word**",
        "",
        "| model | I(language; expert) bits | divergence: false cognates | control words | other words |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        div = m.get("divergence")
        cells = " | ".join(f"{fmt(*div[g])} (n={m['divergence_tokens'][g]:,})" for g in GROUPS) if div else "- | - | -"
        lines.append(f"| {name} | {fmt(m['language_mi_bits'], m['language_mi_bits_std'], 3)} | {cells} |")
    b = results["analysis_budget"]
    lines += [
        "",
        f"Languages weigh equally in the averages (ppl: exp of the mean per-language loss; bpb: mean of the "
        f"per-language bits per byte = nats / (UTF-8 bytes · ln 2)); q = temperature probability of a language in "
        f"tokenizer text and batches (alpha {results['language_alpha']}), p = its share of the training tokens; epochs = "
        f"passes over the language's training tokens in one run. Per-language numbers on the first "
        f"{b['eval_batches'] or 'all'} batch(es) of each language's split. I(language; expert) = mutual information "
        "between the language of a token and the expert chosen (languages weighted equally), mean over MoE layers. "
        "Divergence = distinct experts reached by a token's sub-tokens, mean over MoE layers (MH-MoE only), for the "
        f"tokens of up to {b['word_occurrences']} held-out occurrences per listed word and language "
        "(mhmoe/data/wordlists.py) and of all other words in the same windows; n = tokens of seed 0.",
    ]
    return "\n".join(lines)
