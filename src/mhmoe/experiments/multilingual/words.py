"""The multilingual experiment's word-level analysis: where listed words are in a token stream, and the sub-token
divergence of false cognates, control words and all other words in held-out text (docs/paper-notes.md §6)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mhmoe.analysis.routing import mean_divergence
from mhmoe.analysis.runs import LoadedRun, collect_routing
from mhmoe.data.multilingual import MultilingualCorpus
from mhmoe.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer
from mhmoe.experiments.multilingual.wordlists import CONTROL_WORDS, FALSE_COGNATES, words_for
from mhmoe.layers.multihead import MHMoE

# (W, L) token ids, (W, L) group (0 false cognate, 1 control word, 2 other word, -1 none), (W, L) word index
Windows = tuple[np.ndarray, np.ndarray, np.ndarray]
GROUPS = ("false cognates", "control words", "other words")
WORDS = list(FALSE_COGNATES) + list(CONTROL_WORDS)  # a selected word's index in the (W, L) word arrays


def token_offsets(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(T,) token ids and (T, 2) character [start, end) spans of `text`'s tokens (a byte token: its character)."""
    if isinstance(tokenizer, ByteTokenizer):
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
        return ids, np.stack([char_of_byte, char_of_byte + 1], axis=1).reshape(-1, 2)
    if isinstance(tokenizer, BPETokenizer):
        encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(encoding.ids, dtype=np.int64), np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    raise TypeError(f"token_offsets needs a ByteTokenizer or BPETokenizer, got {type(tokenizer).__name__}")


def word_spans(text: str, words: Iterable[str]) -> list[tuple[int, int, str]]:
    """(start, end, word) of every whole-word, case-insensitive occurrence of `words` in `text`, in order."""
    words = sorted({w.lower() for w in words}, key=len, reverse=True)
    if not words:
        return []
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
    return [(m.start(), m.end(), m.group(1).lower()) for m in pattern.finditer(text)]


def tokens_in_spans(offsets_T2: np.ndarray, spans: Sequence[tuple[int, int, Any]]) -> np.ndarray:
    """(T,) int: for each token, the index into `spans` of the span it overlaps (first one), or -1."""
    which = np.full(len(offsets_T2), -1, dtype=np.int64)
    if len(offsets_T2) == 0 or len(spans) == 0:
        return which
    starts, ends = offsets_T2[:, 0], offsets_T2[:, 1]
    if (np.diff(starts) < 0).any() or (np.diff(ends) < 0).any():
        raise ValueError("token offsets must be in text order (non-decreasing starts and ends)")
    span_s = np.array([s for s, _, _ in spans])
    span_e = np.array([e for _, e, _ in spans])
    # span i overlaps tokens [first_i, stop_i): the first whose end is past s, up to the first starting at e or later
    first, stop = np.searchsorted(ends, span_s, side="right"), np.searchsorted(starts, span_e, side="left")
    counts = np.maximum(stop - first, 0)
    span_of_hit = np.repeat(np.arange(len(spans)), counts)
    token_of_hit = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    lowest = np.full(len(offsets_T2), len(spans), dtype=np.int64)
    np.minimum.at(lowest, token_of_hit, span_of_hit)  # a token overlapping several spans keeps the first
    which[lowest < len(spans)] = lowest[lowest < len(spans)]
    return which


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
            word = WORDS[w]
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


def divergence_windows(tokenizer: Any, docs: list[str], lang: str, seq_len: int, occurrences: int) -> Windows | None:
    """Windows of `seq_len` tokens of `docs` (joined by eos, as in training) that hold selected word occurrences.

    Returns (W, L) token ids, (W, L) group (0 false cognate, 1 control word, 2 other word, -1 none) and (W, L)
    index into `WORDS` (-1 for tokens of no selected listed word); None if no listed word occurs.
    """
    false_words, control_words = words_for(FALSE_COGNATES, lang), words_for(CONTROL_WORDS, lang)
    if not false_words + control_words:
        return None
    ids: list[Any] = []
    group: list[Any] = []
    word: list[Any] = []
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
                g[hit], w[hit] = (0 if name in false_words else 1), WORDS.index(name)
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
