"""Causal language modelling: the task `mhmoe train` runs in the one loop (`mhmoe.train.loop`).

Data: a text corpus (`mhmoe.data`), or language-tagged text (data.multilingual, batches drawn per language with
temperature sampling), tokenized with the run's tokenizer (a BPE trained once on the training split and kept in
the run as tokenizer.json, the byte tokenizer, or a tokenizer.json of the user's) and cached on disk.
Evaluation: mean cross-entropy and perplexity over consecutive windows of a held-out split.

Every checkpoint records the sha256 of each tokenized split (`data_digests`): a run resumes, and `mhmoe eval`
evaluates, only on the very data it was trained with (`check_data`), wherever that data now lives.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.data import (
    BatchSampler,
    BPETokenizer,
    Corpus,
    data_cache_dir,
    default_corpus,
    eval_batch_count,
    eval_batches,
    load_corpus,
    load_tokenizer,
    tokenize_corpus,
)
from mhmoe.data.dataset import token_digest
from mhmoe.data.hf_datasets import HFSource, is_hf_source, load_hf_corpus
from mhmoe.data.multilingual import (
    LanguageSampler,
    bits_per_byte,
    languages_of,
    load_multilingual,
    split_key,
    target_bytes,
    token_byte_lengths,
    tokenize_languages,
    tokenizer_text,
)
from mhmoe.data.tokenizer import Tokenizer
from mhmoe.errors import DataError
from mhmoe.io import notice
from mhmoe.models.gpt import GPT, gpt_cost
from mhmoe.train.config import RunConfig
from mhmoe.train.loop import Part, RunResult, autocast_for
from mhmoe.train.loop import train as train_loop
from mhmoe.train.metrics import progress_bar
from mhmoe.train.session import Session


def data_path(cfg: RunConfig) -> Path:
    """--data / data.path, else $MHMOE_DATA, else the built-in Shakespeare corpus (fetched once)."""
    given = cfg.data.path or os.environ.get("MHMOE_DATA", "")
    return Path(given).expanduser() if given else default_corpus(data_cache_dir())


def prepare_data(cfg: RunConfig, run_dir: Path, progress: bool) -> tuple[Any, dict[str, np.ndarray], dict]:
    """The run's tokenizer (trained once and kept in the run), the tokenized splits (cached), and a record of the
    data actually used (`data_record`).

    Multilingual runs (data.multilingual) also hold "train:<lang>", "valid:<lang>", ... per language.
    """
    d = cfg.data
    if d.multilingual:
        languages = [lang.strip() for lang in d.languages.split(",") if lang.strip()]
        corpus = load_multilingual(
            data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction, languages=languages
        )
        tokenizer = run_tokenizer(cfg, run_dir, lambda: tokenizer_text(corpus, d.language_alpha))
        splits = tokenize_languages(corpus, tokenizer, data_cache_dir(), cfg.model.seq_len, progress)
        record = data_record(corpus.source, list(corpus.languages.values()), splits)
    else:
        text = load_text(cfg)
        tokenizer = run_tokenizer(cfg, run_dir, lambda: text.train)
        splits = tokenize_corpus(text, tokenizer, data_cache_dir(), progress=progress)
        record = data_record(text.source, [text], splits)
    for name, tokens in splits.items():
        if not name.startswith("train") and len(tokens) < cfg.model.seq_len + 1:
            notice(
                f"warning: the {name} split of {data_path(cfg)} has {len(tokens)} tokens, less than one window of "
                f"model.seq_len + 1 = {cfg.model.seq_len + 1}: its perplexity says little; hold out more text"
            )
    return tokenizer, splits, record


def data_digests(splits: dict[str, np.ndarray]) -> dict[str, str]:
    """{split: sha256 of its tokens}: what a checkpoint records of the data it was trained with."""
    return {name: token_digest(tokens) for name, tokens in splits.items()}


def check_data(recorded: dict | None, splits: dict[str, np.ndarray], names: list[str], source: Path) -> bool:
    """The splits `names` are the ones whose digests a checkpoint recorded (a DataError naming the first that is
    not); False when the checkpoint recorded none (written by an older mhmoe), so nothing could be checked."""
    if recorded is None:
        return False
    for name in names:
        digest = token_digest(splits[name]) if name in splits else "missing"
        if recorded.get(name) != digest:
            raise DataError(
                f"the {name} split of {source} is not the data this run was trained with (sha256 {digest[:12]}, "
                f"recorded {str(recorded.get(name))[:12]}): the data changed; point data.path (--data) at the "
                "original data, or start a new run"
            )
    return True


def load_text(cfg: RunConfig) -> Corpus:
    """The run's text corpus: files (`load_corpus`) or a Hugging Face dataset (`mhmoe.data.hf_datasets`)."""
    d = cfg.data
    given = d.path or os.environ.get("MHMOE_DATA", "")
    if given and is_hf_source(given):
        source = HFSource(given, d.hf_config, d.hf_files, d.text_field, d.streaming, d.max_chars)
        return load_hf_corpus(source, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction)
    return load_corpus(
        data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction, held_out=d.held_out
    )


def data_record(source: str, corpora: list[Corpus], splits: dict[str, np.ndarray]) -> dict:
    """What a run trained and was evaluated on: the source (the resolved path, also for the built-in corpus),
    a content hash of the split texts (`Corpus.fingerprint`, over every language for multilingual data), and
    the characters and tokens of each split."""
    digest = hashlib.sha256("".join(c.fingerprint() for c in corpora).encode()).hexdigest()
    chars = {s: sum(len(doc) for c in corpora for doc in c.splits()[s]) for s in ("train", "valid", "test")}
    tokens = {s: int(len(splits[s])) for s in ("train", "valid", "test")}
    return {"source": source, "sha256": digest, "chars": chars, "tokens": tokens}


def run_tokenizer(cfg: RunConfig, run_dir: Path, bpe_text: Callable[[], Iterable[str]]) -> Tokenizer:
    """The run's saved tokenizer, else a BPE trained on `bpe_text()` (data.tokenizer=bpe) or the one named."""
    saved = run_dir / "tokenizer.json"
    if saved.exists():
        return load_tokenizer(saved)
    if cfg.data.tokenizer == "bpe":
        bpe = BPETokenizer.train(bpe_text(), cfg.data.vocab_size)
        bpe.save(saved)
        return bpe
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.data.tokenizer != "byte":
        tokenizer.save(saved)
    return tokenizer


def make_sampler(cfg: RunConfig, splits: dict[str, np.ndarray]) -> Any:
    """Training batches: uniform over the train split's windows, or per language with temperature (multilingual)."""
    t = cfg.train
    if cfg.data.multilingual:
        tokens = {lang: splits[split_key("train", lang)] for lang in languages_of(splits)}
        return LanguageSampler(tokens, t.batch_size, cfg.model.seq_len, seed=t.seed, alpha=cfg.data.language_alpha)
    return BatchSampler(splits["train"], t.batch_size, cfg.model.seq_len, seed=t.seed)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    cfg: RunConfig,
    device: torch.device,
    max_batches: int = 0,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Mean cross-entropy (nats/token) and perplexity over consecutive windows of a held-out split, from its start:
    all of it, or its first `max_batches` batches of train.batch_size × model.seq_len tokens. The ONE definition
    of held-out perplexity: `mhmoe train` (train.final_eval_batches), `mhmoe eval` (--max-batches) and the
    reproductions call it, and report the token count it covered ("tokens")."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    B, L = cfg.train.batch_size, cfg.model.seq_len
    batches = eval_batches(tokens, B, L, max_batches=max_batches or None)
    bar = progress_bar(eval_batch_count(len(tokens), B, L, max_batches or None), 0, progress, "batch", desc)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_for(cfg.train.precision, device):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total, count = total + loss.item(), count + y.numel()
        bar.update(1)
    bar.close()
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


def with_bits_per_byte(
    result: dict, tokens: np.ndarray, tokenizer: Tokenizer, byte_lengths: np.ndarray | None = None
) -> dict:
    """`evaluate`'s result on `tokens` plus "bytes", the UTF-8 bytes of exactly the tokens it predicted (its windows
    are consecutive from the split's start: the targets are tokens[1 : 1 + count]), and "bpb", bits per byte:
    unlike perplexity (per token), comparable between runs of different tokenizers. bpb is None for no bytes.
    byte_lengths: the tokenizer's `token_byte_lengths`, if already computed."""
    nbytes = target_bytes(tokenizer, tokens[1 : 1 + result["tokens"]], byte_lengths)
    bpb = bits_per_byte(result["loss"] * result["tokens"], nbytes) if nbytes > 0 else None
    return {**result, "bytes": nbytes, "bpb": bpb}


class LMTask:
    """The causal LM as a `mhmoe.train.loop.Task`: GPT on (idx, targets) windows of the training split."""

    partial_forwards = False
    run_files: tuple[str, ...] = (
        "tokenizer.json",
    )  # the BPE or user tokenizer the run keeps (a byte-tokenizer run has none)

    def __init__(self, cfg: RunConfig, run_dir: Path, session: Session, progress: bool):
        self.cfg, self.session, self.progress = cfg, session, progress and session.is_main
        prepared = session.first_on_main(lambda: prepare_data(cfg, run_dir, progress))
        self.tokenizer, self.splits, self.data = prepared
        cfg.model.vocab_size = self.tokenizer.vocab_size
        self.cost = gpt_cost(cfg.model)
        self.digests = data_digests(self.splits)
        self.byte_lengths = token_byte_lengths(self.tokenizer)  # for bits per byte at every evaluation

    def build_model(self) -> GPT:
        return GPT(self.cfg.model)

    def start(self) -> None:
        # one sampler of global batches (batch_size rows per rank), each rank keeps its slice: see session.shard
        t = self.cfg.train
        self.sampler = make_sampler(replace(self.cfg, train=replace(t, batch_size=t.batch_size * self.session.world)),
                                    self.splits)  # fmt: skip

    def parts(self, step: int, micro: int) -> Iterator[Part]:
        x, y = self.sampler.next_batch()
        idx, targets = (self.session.shard(v).to(self.session.device, non_blocking=True) for v in (x, y))
        yield Part("lm", {"idx": idx, "targets": targets}, x.numel())

    def loss(self, out: Any, part: Part) -> torch.Tensor:
        return out.loss

    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int) -> dict:
        tokens = self.splits[split]
        result = evaluate(model, tokens, self.cfg, self.session.device, max_batches, self.progress, split)
        return with_bits_per_byte(result, tokens, self.tokenizer, self.byte_lengths)

    def metrics(self, report: dict) -> dict:
        return {"val_loss": report["loss"], "val_ppl": report["ppl"], "val_tokens": report["tokens"]}

    def summary(self, valid: dict, test: dict) -> dict:
        return {"val_loss": valid["loss"], "val_ppl": valid["ppl"], "test_loss": test["loss"], "test_ppl": test["ppl"],
                "val_bpb": valid["bpb"], "test_bpb": test["bpb"], "val_tokens": valid["tokens"],
                "test_tokens": test["tokens"], "val_bytes": valid["bytes"], "test_bytes": test["bytes"],
                "data": self.data}  # fmt: skip

    def describe(self) -> list[str]:
        chars, tokens = self.data["chars"], self.data["tokens"]
        sizes = ", ".join(f"{s} {tokens[s]:,} tokens ({chars[s]:,} chars)" for s in ("train", "valid", "test"))
        return [f"data: {self.data['source']} (sha256 {self.data['sha256'][:12]}): {sizes}"]

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "data_sha256": self.digests}

    def load_state_dict(self, state: dict) -> None:
        check_data(state.get("data_sha256"), self.splits, sorted(self.splits), data_path(self.cfg))
        self.sampler.load_state_dict(state["sampler"])

    def on_step(self, model: torch.nn.Module, step: int) -> None:
        pass


def train(cfg: RunConfig, run_dir: Path, progress: bool = True) -> RunResult:
    """Train (or resume) the language model of `cfg` in run_dir (`mhmoe.train.loop.train`)."""
    return train_loop(cfg, run_dir, lambda session: LMTask(cfg, run_dir, session, progress), progress)
