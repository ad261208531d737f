"""Language-tagged corpora, temperature-based language sampling (XLM), and the bytes behind bits per byte.

Legend: B batch size, L sequence length, N tokens in a split, V vocabulary size, T tokens of a text.

Accepted layouts (`load_multilingual`), all UTF-8, optionally gzip-compressed; a language tag is a BCP 47-like
name such as `de`, `pt-BR` or `zh_Hans` (2-3 letters, then optional `-`/`_` subtags):

a) a folder of `<lang>.train.txt(.gz)` + `<lang>.valid.txt(.gz)` [+ `<lang>.test.txt(.gz)`] files (the layout
   of the offline data pack); other files in the folder are listed in `MultilingualCorpus.ignored`;
b) otherwise a folder of `<lang>.txt(.gz)` files, `<lang>/` sub-folders (any layout `load_corpus` accepts)
   and `*.jsonl(.gz)` files whose records carry `"text"` and `"lang"` (and optionally `"split"`);
c) a single `.jsonl(.gz)` file of `{"text", "lang"[, "split"]}` records.

Text without its own splits is held out by hash, as `load_corpus` does (chunks of files, records of JSONL).

Temperature sampling (Lample & Conneau 2019; XLM-R uses α = 0.3): a language with share p_l of the training
data is drawn with probability q_l = p_l^α / Σ_k p_k^α, so α = 1 keeps the natural mix, α = 0 is uniform and
α = 0.3 lifts small languages without flooding the model with them. The share is measured in the unit being
sampled: UTF-8 bytes of text for the tokenizer's training text, tokens for training batches; in both, α = 1
reproduces the natural corpus.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from torch import Tensor

from mhmoe.data.corpus import (
    JSONL_SUFFIXES,
    SPLITS,
    TEXT_SUFFIXES,
    Corpus,
    Scored,
    Split,
    _assign_by_hash,
    _check_readable,
    _fill_empty_splits,
    _from_split_files,
    _jsonl_records,
    _read_text,
    cut_pieces,
    cut_units,
    hash_score,
    load_corpus,
)
from mhmoe.data.dataset import BatchSampler, tokenize_corpus
from mhmoe.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, bytes_to_unicode
from mhmoe.errors import DataError

DEFAULT_ALPHA = 0.3  # XLM-R's exponent (Conneau et al. 2020)
# Text the shared BPE tokenizer is trained on, at most: enough for stable merges at a few thousand to tens of
# thousands of tokens, small enough to train in well under a minute on 2 cores.
TOKENIZER_TEXT_BYTES = 8_000_000
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
_SPLIT_FILE = re.compile(r"^(?P<lang>[^.]+)\.(?P<split>train|valid|test)\.txt(?:\.gz)?$", re.IGNORECASE)


@dataclass
class MultilingualCorpus:
    """One `Corpus` per language (tag -> documents per split), in sorted tag order."""

    languages: dict[str, Corpus]
    source: str
    ignored: list[str] = field(default_factory=list)  # files of the folder that are not part of the corpus

    def text_bytes(self, split: str = "train") -> dict[str, int]:
        """UTF-8 bytes of each language's documents in `split`."""
        return {lang: sum(len(d.encode("utf-8")) for d in c.splits()[split]) for lang, c in self.languages.items()}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{lang}={n:,} B" for lang, n in self.text_bytes().items())
        return f"MultilingualCorpus({self.source!r}: train {sizes})"


# --- loading ---------------------------------------------------------------------------------------------------


def _language(tag: str, where: str) -> str:
    if not LANGUAGE_TAG.match(tag):
        raise DataError(f'{where}: {tag!r} is not a language tag (like "de", "pt-BR"); rename it or fix the record')
    return tag


def _strip_suffix(name: str, suffixes: Sequence[str]) -> str:
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _split_file_layout(folder: Path) -> tuple[dict[str, dict[Split, Path | None]], list[str]]:
    """Layout (a): {lang: {split: file or None}} and the names of the other entries of the folder."""
    found: dict[str, dict[Split, Path | None]] = {}
    ignored = []
    for entry in sorted(folder.iterdir()):
        match = _SPLIT_FILE.match(entry.name)
        if entry.is_file() and match and LANGUAGE_TAG.match(match["lang"]):
            files = found.setdefault(match["lang"], dict.fromkeys(SPLITS))
            split = cast(Split, match["split"].lower())  # the pattern allows only the three splits
            if (other := files[split]) is not None:
                raise DataError(
                    f"{folder} has two {split} files for language {match['lang']!r}: {other.name}, {entry.name}"
                )
            files[split] = entry
        elif not entry.name.startswith("."):
            ignored.append(entry.name)
    return found, ignored


def _from_language_files(
    files: dict[Split, Path | None], folder: Path, lang: str, valid_fraction: float, test_fraction: float, seed: int
) -> Scored:
    if files["train"] is None:
        raise DataError(f"{folder}: language {lang!r} has held-out files but no {lang}.train.txt(.gz)")
    if files["valid"] is not None:
        return _from_split_files(files, test_fraction, seed)
    # No valid file: hold valid (and test, if missing) chunks out of train by hash.
    test_fraction = 0.0 if files["test"] else test_fraction
    units = cut_units([(files["train"].name, _read_text(files["train"]))], [valid_fraction, test_fraction])
    scored = _assign_by_hash(units, valid_fraction, test_fraction, seed)
    if files["test"] is not None:
        chunks = cut_pieces(_read_text(files["test"]))
        scored["test"] = [(hash_score(f"{files['test'].name}#{i}", seed), c) for i, c in enumerate(chunks)]
    return scored


def _jsonl_by_language(
    path: Path, fallback_lang: str | None, seed: int
) -> dict[str, list[tuple[str, str, str | None]]]:
    """{lang: [(stable id, text, split or None)]} from a JSONL file; records need "lang" unless a fallback is given."""
    out: dict[str, list[tuple[str, str, str | None]]] = {}
    for number, record in _jsonl_records(path):
        lang = record.get("lang", fallback_lang)
        if not isinstance(lang, str):
            raise DataError(f'{path} line {number} has no string "lang" field; every record needs one')
        _language(lang, f"{path} line {number}")
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise DataError(f'{path} line {number} has split {split!r}; "split" must be one of {", ".join(SPLITS)}')
        if record["text"].strip():
            stable_id = str(record.get("id", f"{path.name}#{number}"))
            out.setdefault(lang, []).append((stable_id, record["text"], split))
    return out


def _scored_records(
    records: list[tuple[str, str, str | None]], valid_fraction: float, test_fraction: float, seed: int
) -> Scored:
    """Records that name their split keep it; the others are held out by hash of their id."""
    scored = _assign_by_hash([(i, t) for i, t, s in records if s is None], valid_fraction, test_fraction, seed)
    for stable_id, text, split in records:
        if split is not None:
            scored[split].append((hash_score(stable_id, seed), text))
    return scored


def _add(languages: dict[str, Any], lang: str, value: Any, where: str) -> None:
    if lang in languages:
        raise DataError(f"language {lang!r} is given twice ({where} and another file or folder); merge them into one")
    languages[lang] = value


def load_multilingual(
    path: str | Path,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    languages: Sequence[str] | None = None,
) -> MultilingualCorpus:
    """Language-tagged documents (layouts a-c in the module docstring), every split of every language non-empty.

    languages: keep only these tags (all found ones if None or empty); a requested tag that is missing is an error.
    """
    path = Path(path).expanduser()
    _check_readable(path)
    scored, ignored = _load_scored(path, valid_fraction, test_fraction, seed)
    if languages:
        missing = sorted(set(languages) - set(scored))
        if missing:
            raise DataError(f"language(s) {missing} not found in {path}; it has {sorted(scored)}")
        scored = {lang: scored[lang] for lang in languages}
    if not scored:
        raise DataError(
            f"no language-tagged text in {path}: expected <lang>.train.txt(.gz) files, <lang>.txt(.gz) files, "
            '<lang>/ folders, or JSONL records with "text" and "lang"'
        )
    corpora = {}
    for lang in sorted(scored):
        value = scored[lang]
        if isinstance(value, Corpus):
            corpora[lang] = value
            continue
        splits = _fill_empty_splits(value, Path(f"{path} [{lang}]"))
        corpora[lang] = Corpus(splits["train"], splits["valid"], splits["test"], source=f"{path} [{lang}]")
    return MultilingualCorpus(corpora, str(path), ignored)


def _load_scored(
    path: Path, valid_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, Any], list[str]]:
    """{lang: Scored or Corpus} and the ignored entries, for a file or folder."""
    if path.is_file():
        if not path.name.lower().endswith(JSONL_SUFFIXES):
            raise DataError(f'{path} is not a .jsonl(.gz) file of {{"text", "lang"}} records; pass one, or a folder')
        by_language = _jsonl_by_language(path, None, seed)
        return {lang: _scored_records(r, valid_fraction, test_fraction, seed) for lang, r in by_language.items()}, []
    split_files, ignored = _split_file_layout(path)
    if split_files:
        return {
            lang: _from_language_files(files, path, lang, valid_fraction, test_fraction, seed)
            for lang, files in split_files.items()
        }, ignored
    found: dict[str, Any] = {}
    ignored = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        name = entry.name
        if entry.is_dir() and LANGUAGE_TAG.match(name):
            corpus = load_corpus(entry, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed)
            _add(found, name, corpus, str(entry))
        elif (
            entry.is_file()
            and name.lower().endswith(TEXT_SUFFIXES)
            and LANGUAGE_TAG.match(_strip_suffix(name, TEXT_SUFFIXES))
        ):
            lang = _strip_suffix(name, TEXT_SUFFIXES)
            corpus = load_corpus(entry, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed)
            _add(found, lang, corpus, str(entry))
        elif entry.is_file() and name.lower().endswith(JSONL_SUFFIXES):
            stem = _strip_suffix(name, JSONL_SUFFIXES)
            for lang, records in _jsonl_by_language(entry, stem if LANGUAGE_TAG.match(stem) else None, seed).items():
                _add(found, lang, _scored_records(records, valid_fraction, test_fraction, seed), str(entry))
        else:
            ignored.append(name)
    return found, ignored


# --- temperature sampling --------------------------------------------------------------------------------------


def language_probabilities(sizes: Mapping[str, float], alpha: float = DEFAULT_ALPHA) -> dict[str, float]:
    """q_l = p_l^α / Σ_k p_k^α with p_l = sizes[l] / Σ sizes (XLM). Languages of size 0 get probability 0."""
    if not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (0 = uniform over languages, 1 = natural mix), got {alpha}")
    if not sizes or any(not math.isfinite(s) or s < 0 for s in sizes.values()) or sum(sizes.values()) <= 0:
        raise ValueError(f"sizes must be finite, >= 0 and not all 0, got {dict(sizes)}")
    total = sum(sizes.values())
    weights = {lang: (s / total) ** alpha if s > 0 else 0.0 for lang, s in sizes.items()}
    norm = sum(weights.values())
    return {lang: w / norm for lang, w in weights.items()}


def tokenizer_text(
    corpus: MultilingualCorpus, alpha: float = DEFAULT_ALPHA, budget_bytes: int | None = None
) -> list[str]:
    """Training text for a shared tokenizer: language l fills q_l of `budget_bytes` (default: the training bytes,
    at most TOKENIZER_TEXT_BYTES), repeating its documents when it has fewer bytes than that, cut at a character.

    Deterministic: documents are taken in corpus order, so the same corpus gives the same text (and merges).
    """
    sizes = corpus.text_bytes("train")
    budget = budget_bytes if budget_bytes is not None else min(sum(sizes.values()), TOKENIZER_TEXT_BYTES)
    if budget < 1:
        raise ValueError(f"budget_bytes must be >= 1, got {budget}")
    texts: list[str] = []
    for lang, q in language_probabilities(sizes, alpha).items():
        texts += _take_bytes(corpus.languages[lang].train, round(q * budget))
    return texts


def _take_bytes(docs: Sequence[str], target: int) -> list[str]:
    """Documents in order, cycling, until `target` UTF-8 bytes; the last one cut at a character boundary."""
    taken: list[str] = []
    remaining = target
    while remaining > 0 and docs:
        for doc in docs:
            data = doc.encode("utf-8")
            if len(data) >= remaining:
                taken.append(data[:remaining].decode("utf-8", errors="ignore"))
                return taken
            taken.append(doc)
            remaining -= len(data)
    return taken


class LanguageSampler:
    """Training batches whose rows are drawn language by language with temperature probabilities.

    Row b of batch n takes language l with probability q_l (`language_probabilities` of the languages' token
    counts), drawn from an RNG seeded with (seed, n); within a language, windows come from that language's own
    `BatchSampler` (epochs of shuffled windows), so small languages repeat while large ones are subsampled.
    `state_dict()` / `load_state_dict()` capture the batch counter and every language's position: a restored
    sampler yields exactly the batches the original would have.
    """

    def __init__(
        self,
        tokens: Mapping[str, np.ndarray],
        batch_size: int,
        seq_len: int,
        seed: int,
        alpha: float = DEFAULT_ALPHA,
    ):
        if not tokens:
            raise ValueError("LanguageSampler needs at least one language, got none")
        self.languages = list(tokens)
        self.batch_size, self.seq_len, self.seed, self.alpha = batch_size, seq_len, seed, alpha
        self.probabilities = language_probabilities({lang: len(t) for lang, t in tokens.items()}, alpha)
        self._q = np.array([self.probabilities[lang] for lang in self.languages])
        self.samplers = {
            lang: BatchSampler(t, 1, seq_len, seed=seed * 1009 + i, split=f"train ({lang})")
            for i, (lang, t) in enumerate(tokens.items())
        }
        self.batches = 0
        self.tokens_seen = 0

    def next_languages(self) -> np.ndarray:
        """(B,) language indices of the next batch's rows (does not advance the sampler)."""
        rng = np.random.default_rng([self.seed, 7919, self.batches])
        return rng.choice(len(self.languages), size=self.batch_size, p=self._q)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets), both int64 (B, L); row b comes from language self.languages[next_languages()[b]]."""
        import torch

        rows = [self.samplers[self.languages[i]].next_batch() for i in self.next_languages()]
        self.batches += 1
        self.tokens_seen += self.batch_size * self.seq_len
        return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "tokens_seen": self.tokens_seen,
            "seed": self.seed,
            "alpha": self.alpha,
            "batch_size": self.batch_size,
            "languages": self.languages,
            "samplers": {lang: s.state_dict() for lang, s in self.samplers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved sampler stopped; refuses a state of other languages, alpha or batch size."""
        saved = (state.get("languages"), state.get("alpha"), state.get("batch_size"))
        if saved != (self.languages, self.alpha, self.batch_size):
            raise DataError(
                f"sampler state was saved for languages {saved[0]}, alpha {saved[1]}, batch size {saved[2]}, but this "
                f"run has {self.languages}, alpha {self.alpha}, batch size {self.batch_size}; resume with the same data"
            )
        for lang, sampler in self.samplers.items():
            sampler.load_state_dict(state["samplers"][lang])
        self.seed, self.batches, self.tokens_seen = int(state["seed"]), int(state["batches"]), int(state["tokens_seen"])


# --- tokens per language, and their bytes -----------------------------------------------------------------------


def split_key(split: str, lang: str) -> str:
    """Key of one language's split in a run's `splits` dict, e.g. "valid:de"."""
    return f"{split}:{lang}"


def languages_of(splits: Mapping[str, np.ndarray]) -> list[str]:
    """The languages of a multilingual run's `splits` dict, in order."""
    return [key.split(":", 1)[1] for key in splits if key.startswith("train:")]


def interleave(arrays: Sequence[np.ndarray], segment: int) -> np.ndarray:
    """Round-robin segments of `segment` tokens from each array until all are used up.

    The combined held-out split of a multilingual run: its first evaluation windows cover every language
    (concatenating would fill them with the first language only).
    """
    if segment < 1:
        raise ValueError(f"segment ({segment}) must be >= 1")
    pieces = []
    longest = max((len(a) for a in arrays), default=0)
    for start in range(0, longest, segment):
        pieces += [a[start : start + segment] for a in arrays if start < len(a)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def tokenize_languages(
    corpus: MultilingualCorpus, tokenizer: Tokenizer, cache_dir: Path, seq_len: int, progress: bool = True
) -> dict[str, np.ndarray]:
    """{"train"/"valid"/"test": all languages, "train:de", ...: one language} token arrays (cached per language).

    The combined train split is the concatenation (the LanguageSampler draws from the per-language ones); the
    combined valid and test splits interleave the languages in segments of `seq_len` tokens.
    """
    per_language = {}
    for lang, c in corpus.languages.items():
        for split, tokens in tokenize_corpus(c, tokenizer, cache_dir, progress=progress).items():
            per_language[split_key(split, lang)] = tokens
    langs = list(corpus.languages)
    combined = {"train": np.concatenate([per_language[split_key("train", lang)] for lang in langs])}
    for split in ("valid", "test"):
        combined[split] = interleave([per_language[split_key(split, lang)] for lang in langs], seq_len)
    return {**combined, **per_language}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray | None:
    """(V,) UTF-8 bytes each token stands for (0 for special tokens such as eos), or None if unknown.

    Exact for the byte tokenizer and for byte-level BPE (every token is a fixed byte string); None for other
    tokenizers, whose tokens' bytes depend on their neighbours (see `target_bytes`).
    """
    if isinstance(tokenizer, ByteTokenizer):
        lengths = np.ones(tokenizer.vocab_size, dtype=np.int64)
        lengths[tokenizer.eos_id] = 0
        return lengths
    if not isinstance(tokenizer, BPETokenizer):
        return None
    definition = json.loads(tokenizer.tokenizer.to_str())
    if (definition.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    char_bytes = {c: 1 for c in bytes_to_unicode().values()}
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    special = {t["id"] for t in definition.get("added_tokens", [])}
    for token, index in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items():
        if index not in special:
            lengths[index] = sum(char_bytes.get(c, len(c.encode("utf-8"))) for c in token)
    return lengths


def target_bytes(tokenizer: Tokenizer, ids: np.ndarray, lengths: np.ndarray | None = None) -> int:
    """UTF-8 bytes of the text that token ids stand for (special tokens count 0).

    With a byte table (`token_byte_lengths`) this is exact; otherwise the ids are decoded as one piece, which
    is exact up to a character cut at either end.
    """
    lengths = token_byte_lengths(tokenizer) if lengths is None else lengths
    ids = np.asarray(ids, dtype=np.int64)
    if lengths is not None:
        return int(lengths[ids].sum())
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Σ −ln p(token) over a text / (its UTF-8 bytes · ln 2): bits per byte, comparable across tokenizers."""
    if total_bytes <= 0:
        raise ValueError(f"bits per byte needs a text of at least one byte, got {total_bytes} bytes")
    return total_nats / (total_bytes * math.log(2))


__all__ = [
    "DEFAULT_ALPHA",
    "LanguageSampler",
    "MultilingualCorpus",
    "bits_per_byte",
    "interleave",
    "language_probabilities",
    "languages_of",
    "load_multilingual",
    "split_key",
    "target_bytes",
    "token_byte_lengths",
    "tokenize_languages",
    "tokenizer_text",
]
