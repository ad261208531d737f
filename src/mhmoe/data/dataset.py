"""Token arrays on disk and the batches drawn from them.

Legend: B batch size, L sequence length, N tokens in a split, W windows in a split.

A split is one 1-D array of token ids: its documents, each followed by eos, concatenated. Window i is
tokens[i·L : i·L + L + 1]; inputs are its first L tokens and targets its last L. Consecutive windows share
one boundary token, so their inputs (and their targets) do not overlap and every token after the first is a
target exactly once per epoch: W = (N - 1) // L.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mhmoe.data.corpus import Corpus
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.errors import DataError
from mhmoe.io import atomic_write, write_json

_ENCODE_BATCH_DOCS = 64  # documents per encode_batch call: large enough to use all cores, small enough for a bar
_CACHE_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the cache (and page-cache) size for any vocabulary that fits it."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


# --- tokenizing and caching ----------------------------------------------------------------------------------


def cache_key(corpus: Corpus, tokenizer: Tokenizer) -> str:
    return hashlib.sha256(f"{corpus.fingerprint()}:{tokenizer.fingerprint()}".encode()).hexdigest()


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path, progress: bool = True
) -> dict[str, np.ndarray]:
    """{split: (N,) token ids} with eos after every document, cached as .npy and memory-mapped.

    The cache lives in cache_dir/tokens/<sha256(corpus fingerprint, tokenizer fingerprint)>/, so a change to
    either the text or the tokenizer gets a fresh entry. `meta.json` (written last) records each file's
    length and sha256; a file that is missing, truncated or altered is re-tokenized, never trusted.
    """
    folder = Path(cache_dir) / "tokens" / cache_key(corpus, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    meta = _read_meta(folder)
    arrays: dict[str, np.ndarray] = {}
    changed = False
    for split, docs in corpus.splits().items():
        cached = _load_verified(folder / f"{split}.npy", meta.get(split), dtype)
        if cached is None:
            tokens = _tokenize_split(split, docs, tokenizer, dtype, progress)
            meta[split] = _write_npy_atomically(folder / f"{split}.npy", tokens)
            cached = _load_verified(folder / f"{split}.npy", meta[split], dtype)
            assert cached is not None, f"cache file {folder / split}.npy failed verification right after writing"
            changed = True
        arrays[split] = cached
    if changed:
        _write_meta(folder, meta, tokenizer)
    return arrays


def _tokenize_split(
    split: str, docs: Sequence[str], tokenizer: Tokenizer, dtype: np.dtype, progress: bool
) -> np.ndarray:
    """Documents -> one array: doc0 eos doc1 eos ...; a progress bar counts characters."""
    bar = _progress_bar(total=sum(len(d) for d in docs), desc=f"tokenizing {split}", enabled=progress)
    parts: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for start in range(0, len(docs), _ENCODE_BATCH_DOCS):
        batch = list(docs[start : start + _ENCODE_BATCH_DOCS])
        for ids in tokenizer.encode_batch(batch):
            parts += [np.asarray(ids, dtype=dtype), eos]
        if bar is not None:
            bar.update(sum(len(d) for d in batch))
    if bar is not None:
        bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or None when disabled or tqdm is not installed (it is optional)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="char", unit_scale=True, leave=False)


def token_digest(array: np.ndarray) -> str:
    """sha256 of a token array's bytes: what identifies a split's content (tokenizer included)."""
    return hashlib.sha256(np.ascontiguousarray(array).data.cast("B")).hexdigest()


def _write_npy_atomically(path: Path, tokens: np.ndarray) -> dict[str, Any]:
    """Write the array atomically (`mhmoe.io.atomic_write`): readers never see a half-written file."""
    with atomic_write(path, "wb") as f:
        np.save(f, tokens, allow_pickle=False)
    return {"length": int(tokens.shape[0]), "dtype": tokens.dtype.name, "sha256": token_digest(tokens)}


def _load_verified(path: Path, expected: dict[str, Any] | None, dtype: np.dtype) -> np.ndarray | None:
    """The memory-mapped array if it matches its meta.json record exactly, else None (rebuild it)."""
    if expected is None or not path.is_file():
        return None
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None  # truncated header or data: numpy cannot map it
    ok = (
        tokens.ndim == 1
        and tokens.dtype == dtype
        and tokens.shape[0] == expected.get("length")
        and token_digest(tokens) == expected.get("sha256")
    )
    return tokens if ok else None


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        return {}
    return {k: v for k, v in meta.get("splits", {}).items() if isinstance(v, dict)}


def _write_meta(folder: Path, splits: dict[str, Any], tokenizer: Tokenizer) -> None:
    meta = {"format": _CACHE_FORMAT, "tokenizer": tokenizer.name, "eos_id": tokenizer.eos_id, "splits": splits}
    write_json(folder / "meta.json", meta, indent=2)


# --- batches -------------------------------------------------------------------------------------------------


def _check_sizes(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must both be >= 1")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[Tensor, Tensor]:
    """Rows tokens[s : s + length + 1] for each start -> int64 (inputs, targets), each (len(starts), length)."""
    rows = np.asarray(tokens[starts[:, None] + np.arange(length + 1)], dtype=np.int64)  # (B, L+1)
    batch = torch.from_numpy(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class BatchSampler:
    """Random (B, L) training batches from one split, reproducible and resumable.

    Epoch e visits every window once, in the order of a permutation drawn from (seed, e); a batch that runs
    past the end of an epoch continues into the next one. `state_dict()` captures the position, so a sampler
    restored with `load_state_dict` yields exactly the batches the original would have.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, *, split: str = "train"):
        _check_sizes(batch_size, seq_len)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"the {split} split has {len(tokens):,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use more data or a smaller model.seq_len (--set model.seq_len=N)"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_len  # W
        self.epoch = 0
        self.position = 0  # windows of the current epoch already used
        self.tokens_seen = 0  # input tokens handed out so far
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _next_windows(self) -> np.ndarray:
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need:
            take = self._order[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
        return np.concatenate(picked)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets), both int64 (B, L); targets[:, t] == inputs[:, t + 1] within a row."""
        starts = self._next_windows() * self.seq_len  # (B,)
        self.tokens_seen += self.batch_size * self.seq_len
        return _windows(self.tokens, starts, self.seq_len)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokens_seen": self.tokens_seen,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved sampler stopped; refuses a state saved for different tokens or seq_len."""
        if state["num_tokens"] != len(self.tokens) or state["seq_len"] != self.seq_len:
            raise DataError(
                f"sampler state was saved for {state['num_tokens']:,} tokens with seq_len {state['seq_len']}, "
                f"but this split has {len(self.tokens):,} tokens and seq_len is {self.seq_len}; "
                "resume with the same data, tokenizer and seq_len"
            )
        if not 0 <= state["position"] < self.num_windows:
            raise DataError(f"sampler state position {state['position']} is outside 0..{self.num_windows - 1}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.tokens_seen = int(state["tokens_seen"])
        self._order = self._permutation(self.epoch)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive windows from the start, in order, for perplexity: deterministic and complete.

    Full windows come in (B, L) batches, the last of them possibly with fewer rows; if N - 1 is not a multiple
    of L, one final (1, r) batch holds the remaining r < L targets. Without `max_batches` the targets of all
    batches together are exactly tokens[1:], each once. Arguments are checked here, not at the first `next`.
    """
    _check_sizes(batch_size, seq_len)
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches ({max_batches}) must be >= 0 or None")
    if len(tokens) < 2:
        raise DataError(f"cannot evaluate a split of {len(tokens)} tokens; it needs at least 2")
    return _eval_batches(tokens, batch_size, seq_len, max_batches)


def eval_batch_count(num_tokens: int, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
    """How many batches `eval_batches` gives for a split of `num_tokens` tokens (for progress bars)."""
    windows = max(num_tokens - 1, 0) // seq_len
    count = -(-windows // batch_size) + (1 if max(num_tokens - 1, 0) > windows * seq_len else 0)
    return count if max_batches is None else min(count, max_batches)


def _eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    num_windows = (len(tokens) - 1) // seq_len
    starts = np.arange(num_windows) * seq_len  # (W,)
    batches = [(starts[i : i + batch_size], seq_len) for i in range(0, num_windows, batch_size)]
    rest = len(tokens) - 1 - num_windows * seq_len
    if rest > 0:
        batches.append((np.array([num_windows * seq_len]), rest))
    for batch_starts, length in batches[:max_batches]:
        yield _windows(tokens, batch_starts, length)
