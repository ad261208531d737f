"""Run configuration: typed dataclasses, named presets, validated `--set key=value` overrides.

A run is `RunConfig(model=GPTConfig, data=DataConfig, train=TrainConfig)`. Presets are small
functions; an override naming a field that does not exist is an error with a suggestion, never a
silent default (torchtitan's lesson, STYLE.md §3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import torch

from mhmoe.data.corpus import HeldOut
from mhmoe.errors import ConfigError
from mhmoe.layers.config import MULTI_HEAD_FIELDS, MoEConfig
from mhmoe.layers.routers import RouterConfig
from mhmoe.models.ffn import FFN_KINDS, V01_RENAMED, FFNConfig
from mhmoe.models.gpt import GPTConfig

Schedule = Literal["cosine", "linear"]
Precision = Literal["auto", "fp32", "bf16"]
OnNonFinite = Literal["stop", "skip"]
DataParallel = Literal["ddp", "fsdp"]
Balance = Literal["local", "global"]
Backend = Literal["auto", "gloo", "nccl"]


@dataclass
class DataConfig:
    path: str = ""  # text file, folder of .txt/.jsonl, the English pack, hf:NAME or a saved dataset; "" = $MHMOE_DATA or built-in Shakespeare
    tokenizer: str = "bpe"  # "bpe" (trained locally on the training split), "byte", or a tokenizer.json path
    vocab_size: int = 8192  # BPE vocabulary when trained here
    valid_fraction: float = 0.05  # held-out share for corpora without their own splits
    test_fraction: float = 0.05  # the same for the test split
    held_out: HeldOut = "pieces"  # how they are drawn: "pieces" (near the fractions); "chunks": runs made before
    # language-tagged data (mhmoe.data.multilingual): tokenizer text and batches drawn per language, q_l ∝ p_l^α
    multilingual: bool = False  # the data is language-tagged (mhmoe.data.multilingual)
    language_alpha: float = 0.3  # α: 1 = the natural mix, 0 = uniform over languages; 0.3 as in XLM-R
    languages: str = ""  # comma-separated language tags to keep ("" = every language in the data)
    # Hugging Face datasets (data.path=hf:NAME or a save_to_disk folder; mhmoe.data.hf_datasets)
    hf_config: str = ""  # the dataset's configuration name, e.g. wikitext-103-raw-v1
    hf_files: str = ""  # data_files for a builder path (hf:parquet, hf:json, ...), e.g. data/*.parquet
    text_field: str = "text"  # the column holding each row's text
    streaming: bool = False  # read rows as they come instead of downloading the whole dataset
    max_chars: int = 0  # read at most this many characters per split (0 = all)


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 1000  # optimiser steps of the run (raise it and train again to continue)
    lr: float = 1e-3  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1  # final lr = lr · min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: Schedule = "cosine"  # "cosine" or "linear" decay after warmup
    weight_decay: float = 0.1  # AdamW decay of matrices and expert stacks (not norms, biases)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200  # steps between periodic validations
    eval_batches: int = 20  # validation batches per periodic evaluation (0 = the whole split)
    final_eval_batches: int = 0  # batches of the final validation/test evaluation (0 = the whole splits)
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between training-loss records
    seed: int = 0  # model initialisation and batch order
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: Precision = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    on_nonfinite: OnNonFinite = "stop"  # "stop" or "skip" the step when the loss or gradient is not finite
    compile: bool = False  # torch.compile the model's forward
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    init_from: str = ""  # a run folder whose latest weights a new run starts from (fine-tuning; `--init-from`)


@dataclass
class ParallelConfig:
    """Used when launched by torchrun (`mhmoe.parallel`); a plain `mhmoe train` ignores it."""

    expert: int = 1  # expert-parallel size P: each MoE layer's experts split over P ranks (P divides the world)
    head: int = 1  # head-parallel size P: each per-head MH-MoE layer's heads (their experts) over P ranks; with
    # expert > 1 too, each head's experts over `expert` ranks (P · expert divides the world)
    data: DataParallel = "ddp"  # non-expert parameters over all ranks: "ddp" (replicated) or "fsdp" (FSDP2)
    balance: Balance = "local"  # router losses over each rank's micro-batch ("local") or all ranks' ("global")
    backend: Backend = "auto"  # "auto" (NCCL on CUDA, gloo on CPU), "gloo" or "nccl"
    timeout_s: float = 600.0  # a collective waiting longer (dead or hung rank) ends the job with an error


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """A run configuration from its dict (config.json), mhmoe 0.1's included (`mhmoe.models.ffn.migrate_ffn`)."""
        with config_errors("model"):
            try:
                return cls(
                    model=GPTConfig.from_dict(data["model"]),
                    data=DataConfig(**{"held_out": "chunks", **data["data"]}),  # older runs drew chunks
                    train=TrainConfig(**data["train"]),
                    parallel=ParallelConfig(**data.get("parallel", {})),
                )
            except (KeyError, TypeError) as e:
                raise ConfigError(f"run configuration is not one this version of mhmoe wrote ({e})") from None


@contextlib.contextmanager
def config_errors(section: str) -> Iterator[None]:
    """A ValueError raised by a configuration class while a run config is rebuilt, as a one-line ConfigError
    naming the section (the layer's own message names the field: "model.ffn.moe: top_k must be ...")."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{section}.{e}" if str(e).startswith("ffn.") else f"{section}: {e}") from None


# ---------------------------------------------------------------------------------------------- presets


def _xmoe(**fields: Any) -> MoEConfig:
    return MoEConfig(router=RouterConfig(kind="xmoe"), **fields)


def _cpu_tiny() -> RunConfig:
    """Seconds on a CPU: for tests and smoke runs."""
    return RunConfig(
        model=GPTConfig(
            seq_len=64,
            d_model=64,
            n_layers=2,
            n_heads=2,
            ffn=FFNConfig(
                kind="mhmoe", hidden=256, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64, num_heads=2)
            ),
        ),
        data=DataConfig(tokenizer="byte"),
        train=TrainConfig(
            batch_size=4,
            max_steps=20,
            warmup_steps=2,
            eval_every=10,
            eval_batches=2,
            checkpoint_every=10,
            log_every=5,
            lr=3e-3,
        ),
    )


def _cpu() -> RunConfig:
    """A few minutes on 2 CPU cores: a 4-layer, D = 128 MH-MoE LM."""
    return RunConfig(
        model=GPTConfig(
            seq_len=128,
            d_model=128,
            n_layers=4,
            n_heads=4,
            ffn=FFNConfig(kind="mhmoe", hidden=512, moe=_xmoe(num_experts=8, top_k=2, expert_hidden=512, num_heads=4)),
        ),
        data=DataConfig(tokenizer="bpe", vocab_size=4096),
        train=TrainConfig(
            batch_size=16,
            max_steps=600,
            warmup_steps=50,
            lr=2e-3,
            eval_every=100,
            eval_batches=10,
            checkpoint_every=200,
        ),
    )


def _gpu() -> RunConfig:
    """One H200 in about a minute: 6 layers, D = 512, ~8 M tokens (docs/paper-notes.md §7)."""
    return RunConfig(
        model=GPTConfig(
            seq_len=512,
            d_model=512,
            n_layers=6,
            n_heads=8,
            ffn=FFNConfig(
                kind="mhmoe", hidden=2048, moe=_xmoe(num_experts=16, top_k=2, expert_hidden=2048, num_heads=4)
            ),
        ),
        data=DataConfig(tokenizer="bpe", vocab_size=8192),
        train=TrainConfig(
            batch_size=32,
            max_steps=500,
            warmup_steps=50,
            lr=1e-3,
            eval_every=100,
            eval_batches=20,
            checkpoint_every=250,
            compile=False,
        ),
    )


def _paper() -> RunConfig:
    """The papers' scale (docs/paper-notes.md §5: 12 layers, D = 768, FFN 3072, 32 experts, H = 4, X-MoE router,
    v1 optimiser):
    for a cluster and a real corpus, not for this machine."""
    return RunConfig(
        model=GPTConfig(
            vocab_size=64000,
            seq_len=1024,
            d_model=768,
            n_layers=12,
            n_heads=12,
            ffn=FFNConfig(
                kind="mhmoe", hidden=3072, moe=_xmoe(num_experts=32, top_k=2, expert_hidden=12224, num_heads=4)
            ),
        ),
        data=DataConfig(tokenizer="bpe", vocab_size=64000),
        train=TrainConfig(
            batch_size=32,
            grad_accum=8,
            max_steps=100_000,
            warmup_steps=10_000,
            lr=5e-4,
            schedule="linear",
            min_lr_ratio=0.0,
            weight_decay=0.01,
            beta1=0.9,
            beta2=0.98,
            eps=1e-6,
            eval_every=2000,
            eval_batches=100,
            checkpoint_every=2000,
        ),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {"cpu-tiny": _cpu_tiny, "cpu": _cpu, "gpu": _gpu, "paper": _paper}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# -------------------------------------------------------------------------------------------- overrides


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def field_names(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass tree, e.g. 'model.ffn.moe.num_experts'."""
    return list(field_types(cfg, prefix))


def field_types(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted leaf key: its type hint} of a dataclass tree (instance or class)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cfg if isinstance(cfg, type) else type(cfg))
    for f in dataclasses.fields(cfg):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(field_types(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def describe_keys(cfg: Any) -> list[tuple[str, str, str]]:
    """(key, current value, type) of every leaf key, for `--list-keys`."""
    values = _flatten(dataclasses.asdict(cfg))
    return [(key, repr(values[key]), _type_name(kind)) for key, kind in field_types(cfg).items()]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return " | ".join(map(str, get_args(kind)))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(k) for k in get_args(kind))
    return "none" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _parse(key: str, text: str, kind: Any) -> Any:
    """`text` as a value of type `kind`: bool, int, float, str, a Literal's choices, or `X | None` ("none")."""
    origin, args = typing.get_origin(kind), get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(key, text, inner)
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{key}={text!r}: choose one of {', '.join(map(str, args))}{_suggest(text, args)}")
        return text
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected a {_type_name(kind)}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str], given: Mapping[str, str] | None = None) -> RunConfig:
    """Apply 'a.b.c=value' strings in order (parsed by the field's type), then validate; `cfg` is changed in place
    and returned. A key set here (or named in `given`, e.g. by a config file) that cannot take effect under the
    resulting configuration (`inert_keys`) is an error."""
    set_fields(cfg, overrides)
    pairs = (item.partition("=") for item in overrides)
    check_effective(cfg, {**(given or {}), **{key.strip(): text.strip() for key, _, text in pairs}})
    validate(cfg)
    return cfg


def inert_keys(cfg: RunConfig) -> dict[str, str]:
    """{key: why it cannot take effect} for the keys this configuration does not read."""
    f, d = cfg.model.ffn, cfg.data
    out: dict[str, str] = {}
    if f.kind == "dense":
        moe_keys = [*field_names(MoEConfig, "model.ffn.moe."), "model.ffn.moe_every"]
        out.update(dict.fromkeys(moe_keys, "model.ffn.kind=dense has no MoE layer"))
    elif f.kind == "smoe":
        why = "only model.ffn.kind=mhmoe splits tokens into heads"
        out.update({f"model.ffn.moe.{name}": why for name in MULTI_HEAD_FIELDS})
    if d.tokenizer != "bpe":
        out["data.vocab_size"] = f"data.tokenizer={d.tokenizer} brings its own vocabulary (it is for bpe)"
    if not d.multilingual:
        why = "it is for language-tagged data (data.multilingual=true)"
        out.update({"data.language_alpha": why, "data.languages": why})
    else:
        out["data.held_out"] = "language-tagged data is always cut into pieces"
    return out


def check_effective(cfg: RunConfig, given: Mapping[str, str]) -> None:
    """A ConfigError naming the first key the user gave ({key: its text}) that cannot take effect."""
    inert = inert_keys(cfg)
    for key, text in given.items():
        if key in inert:
            raise ConfigError(f"{key}={text} cannot take effect: {inert[key]}; drop it")


def load_config_file(cfg: RunConfig, path: Path) -> dict[str, str]:
    """`--config FILE`: the values of a YAML (or JSON) run configuration, nested as `--print-config` writes it
    and all or some of its keys, into `cfg` in place; returns {key: text} of the values that differ from those
    `cfg` had (checked with the `--set` ones by `apply_overrides`: a copied preset file with another ffn.kind
    is fine, a file that sets a multi-head field for an SMoE is not). Unknown keys and wrong types are errors naming the file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} is not YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold sections (model:, data:, train:, parallel:), not a value")
    before = _flatten(dataclasses.asdict(cfg))
    given = _flatten(data)
    texts = {key: _yaml_text(value) for key, value in given.items()}
    with _naming(f"--config {path}: "):
        set_fields(cfg, [f"{key}={text}" for key, text in texts.items()],
                   hint="see `mhmoe train --print-config` for the whole configuration")  # fmt: skip
    return {key: texts[key] for key, value in given.items() if value != before.get(key)}


def _yaml_text(value: Any) -> str:
    """A YAML scalar as the text `--set` would give (None: "none"; a list or mapping stays unparseable)."""
    return "none" if value is None else str(value)


@contextlib.contextmanager
def _naming(prefix: str) -> Iterator[None]:
    try:
        yield
    except ConfigError as e:
        raise ConfigError(prefix + str(e)) from None


def config_yaml(cfg: RunConfig, header: str = "") -> str:
    """The configuration as YAML (`--print-config`), in the sections and field order of the dataclasses, without
    the keys it does not read (`inert_keys`: a dense model's moe section, a byte tokenizer's vocab_size): a file
    to copy and edit, which `--config` reads back to the same run."""
    import yaml

    data = cfg.to_dict()
    for key in inert_keys(cfg):
        *path, name = key.split(".")
        section = data
        for part in path:
            section = section[part]
        section.pop(name)
    lines = [f"# {line}" for line in header.splitlines()]
    body = yaml.safe_dump(_without_empty(data), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join([*lines, body.rstrip("\n")]) + "\n"


def _without_empty(data: dict) -> dict:
    kept = {key: _without_empty(value) if isinstance(value, dict) else value for key, value in data.items()}
    return {key: value for key, value in kept.items() if value != {}}


def set_fields(cfg: Any, overrides: list[str], hint: str = "see `mhmoe train --list-keys`") -> Any:
    """'a.b.c=value' strings into a run configuration (any dataclass tree with `from_dict`), in place. The new
    values are checked together when the tree is rebuilt (so the order of overrides does not matter), without
    the range checks of `validate`."""
    types_ = field_types(cfg)
    data = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        if key not in types_:
            renamed = _renamed(key)
            if renamed:
                raise ConfigError(f"config key {key!r} is now {renamed!r}")
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, types_)}; {hint}")
        *path, name = key.split(".")
        target = data
        for part in path:
            target = target[part]
        target[name] = _parse(key, text.strip(), types_[key])
    rebuilt = type(cfg).from_dict(data)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(rebuilt, f.name))
    return cfg


def _renamed(key: str) -> str | None:
    """Today's name of a key mhmoe 0.1 had (model.ffn.num_experts -> model.ffn.moe.num_experts)."""
    section, _, name = key.rpartition(".")
    if section.endswith("ffn") and name in V01_RENAMED:
        return f"{section}.{V01_RENAMED[name]}"
    return None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Range checks with one-line messages naming the key and the value."""
    validate_model(cfg.model, "model")
    _check(cfg.model.seq_len >= 1, f"model.seq_len must be >= 1, got {cfg.model.seq_len}")
    d, t = cfg.data, cfg.train
    _check(cfg.model.vocab_size >= 1, f"model.vocab_size must be >= 1, got {cfg.model.vocab_size}")
    _check(d.vocab_size >= 1, f"data.vocab_size must be >= 1, got {d.vocab_size}")
    _check(
        d.tokenizer != "bpe" or 257 <= d.vocab_size < 2**32,
        f"data.vocab_size must be at least 257 for data.tokenizer=bpe (256 bytes + end of text), got {d.vocab_size}",
    )
    _check(
        0 < d.valid_fraction < 0.5 and 0 < d.test_fraction < 0.5,
        f"data.valid_fraction and data.test_fraction must be in (0, 0.5), got {d.valid_fraction}, {d.test_fraction}",
    )
    _check(0 <= d.language_alpha <= 1, f"data.language_alpha must be in [0, 1], got {d.language_alpha}")
    _check(d.max_chars >= 0, f"data.max_chars must be >= 0 (0 = all), got {d.max_chars}")
    validate_train(t, cfg.model.seq_len)
    validate_parallel(cfg.parallel, cfg.model.ffn)


def validate_model(m: Any, section: str) -> None:
    """The shared part of a model section (GPTConfig or the multiway model): sizes, attention heads, the FFNs."""
    f = m.ffn
    for key, value in [
        ("d_model", m.d_model),
        ("n_layers", m.n_layers),
        ("n_heads", m.n_heads),
        ("ffn.hidden", f.hidden),
        ("ffn.moe_every", f.moe_every),
    ]:
        _check(value >= 1, f"{section}.{key} must be >= 1, got {value}")
    _check(
        m.d_model % m.n_heads == 0 and (m.d_model // m.n_heads) % 2 == 0,
        f"{section}.d_model ({m.d_model}) / {section}.n_heads ({m.n_heads}) must be an even integer",
    )
    _check(f.kind in FFN_KINDS, f"{section}.ffn.kind must be one of {', '.join(FFN_KINDS)}, got {f.kind!r}")
    _check(0 <= m.dropout < 1, f"{section}.dropout must be in [0, 1), got {m.dropout}")
    if f.kind == "dense":
        return
    _check(
        f.moe_every <= m.n_layers,
        f"{section}.ffn.moe_every ({f.moe_every}) is larger than {section}.n_layers ({m.n_layers}): "
        f"no block would get an MoE layer; lower {section}.ffn.moe_every or use {section}.ffn.kind=dense",
    )
    _check(
        f.kind != "mhmoe" or f.moe.latent_dim is not None or m.d_model % f.moe.num_heads == 0,
        f"{section}.d_model ({m.d_model}) must be divisible by {section}.ffn.moe.num_heads ({f.moe.num_heads}) "
        f"(or set {section}.ffn.moe.latent_dim to a multiple of it)",
    )
    try:
        with torch.device("meta"):  # every check the layer makes, without allocating its weights
            block_spec = next(spec for spec in m.block_ffns() if spec.kind != "dense")
            block_spec.build()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}.ffn.moe: {e}") from None


MAX_BATCH_TOKENS = 2**24  # per micro-batch: 512× the paper preset's; beyond it a typo, not a plan


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    _check(
        device is not None and device.type in ("cpu", "cuda", "mps", "xpu"),
        f"train.device={name!r}: use auto, cpu, cuda or cuda:N",
    )


def validate_train(t: TrainConfig, seq_len: int = 1) -> None:
    """Range checks of a train section; seq_len (the model's) bounds the tokens of a micro-batch."""
    for key, value in [
        ("batch_size", t.batch_size),
        ("grad_accum", t.grad_accum),
        ("max_steps", t.max_steps),
        ("eval_every", t.eval_every),
        ("checkpoint_every", t.checkpoint_every),
        ("log_every", t.log_every),
        ("keep_checkpoints", t.keep_checkpoints),
    ]:
        _check(value >= 1, f"train.{key} must be >= 1, got {value}")
    for key in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
        value = getattr(t, key)
        _check(math.isfinite(value), f"train.{key} must be a finite number, got {value}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    for key in ("beta1", "beta2"):
        _check(0 <= getattr(t, key) < 1, f"train.{key} must be in [0, 1), got {getattr(t, key)}")
    _check(t.eps >= 0, f"train.eps must be >= 0, got {t.eps}")
    _check(t.threads >= 0, f"train.threads must be >= 0 (0 = torch's default), got {t.threads}")
    _check(0 <= t.seed < 2**63, f"train.seed must be in [0, 2**63), got {t.seed}")
    _check(
        t.batch_size * seq_len <= MAX_BATCH_TOKENS,
        f"train.batch_size × model.seq_len = {t.batch_size * seq_len:,} tokens per micro-batch is more than "
        f"{MAX_BATCH_TOKENS:,}; lower train.batch_size and raise train.grad_accum for a larger batch",
    )
    _check_device(t.device)
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.schedule in get_args(Schedule), f"train.schedule must be cosine or linear, got {t.schedule!r}")
    _check(t.precision in get_args(Precision), f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    _check(t.on_nonfinite in get_args(OnNonFinite), f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    _check(t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip and train.weight_decay must be >= 0")
    _check(
        t.eval_batches >= 0 and t.final_eval_batches >= 0,
        f"train.eval_batches and train.final_eval_batches must be >= 0, got {t.eval_batches}, {t.final_eval_batches}",
    )


def validate_parallel(p: ParallelConfig, ffn: FFNConfig) -> None:
    _check(p.expert >= 1, f"parallel.expert must be >= 1, got {p.expert}")
    _check(
        ffn.kind == "dense" or ffn.moe.num_experts % p.expert == 0,
        f"model.ffn.moe.num_experts ({ffn.moe.num_experts}) must be divisible by parallel.expert ({p.expert})",
    )
    if p.head != 1:
        validate_head_parallel(p, ffn)
    _check(p.data in get_args(DataParallel), f"parallel.data must be ddp or fsdp, got {p.data!r}")
    _check(p.balance in get_args(Balance), f"parallel.balance must be local or global, got {p.balance!r}")
    _check(p.backend in get_args(Backend), f"parallel.backend must be auto, gloo or nccl, got {p.backend!r}")
    _check(0 < p.timeout_s < math.inf, f"parallel.timeout_s must be a number of seconds > 0, got {p.timeout_s}")


def validate_head_parallel(p: ParallelConfig, ffn: FFNConfig) -> None:
    """What head parallelism (`mhmoe.parallel.head`) needs of the model: per-head pools it can place whole."""
    m, key = ffn.moe, f"parallel.head={p.head}"
    _check(p.head >= 1, f"parallel.head must be >= 1, got {p.head}")
    _check(
        ffn.kind == "mhmoe" and m.per_head_experts,
        f"{key} needs MH-MoE layers with a router and a pool of experts per head; set model.ffn.kind=mhmoe and "
        "model.ffn.moe.per_head_experts=true, or parallel.head=1",
    )
    _check(
        m.num_heads % p.head == 0,
        f"model.ffn.moe.num_heads ({m.num_heads}) must be divisible by parallel.head ({p.head}): each rank holds "
        "num_heads / parallel.head heads",
    )
    _check(p.expert == 1 or m.dispatch != "reference",
           f"{key} with parallel.expert={p.expert} needs the sorted dispatch; drop model.ffn.moe.dispatch=reference")  # fmt: skip
    _check(m.num_shared_experts == 0, f"{key} does not place shared experts; set model.ffn.moe.num_shared_experts=0")
    _check(not m.expert_bias, f"{key} does not shard expert biases yet; set model.ffn.moe.expert_bias=false")
