"""The masked multimodal run configuration: model (multiway Transformer), data and masking, training, analysis
snapshots, parallelism; its presets and validated `--set` overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mhmoe.errors import ConfigError
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.routers import RouterConfig
from mhmoe.models.ffn import FFNConfig
from mhmoe.models.multiway import MultiwayConfig
from mhmoe.train.config import (
    ParallelConfig,
    TrainConfig,
    config_errors,
    set_fields,
    validate_model,
    validate_parallel,
    validate_train,
)

TASKS = ("text", "image", "pair")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _xmoe(**fields: Any) -> MoEConfig:
    return MoEConfig(router=RouterConfig(kind="xmoe"), **{"num_heads": 4, "top_k": 2, **fields})


@dataclass
class MaskedDataConfig:
    path: str = ""  # data root: pack layout (images/, english/) and/or an image folder; "" = $MHMOE_MULTIMODAL_DATA
    images: str = ""  # more image folders with captions.jsonl, comma-separated
    text: str = ""  # text corpus for text-only MLM; "" = <path>/english if present, else the training captions
    tokenizer: str = "bpe"  # "bpe" (trained here on the training captions + English text), "byte", or a tokenizer.json
    vocab_size: int = 4096  # BPE vocabulary when trained here (the model adds [MASK])
    tokenizer_chars: int = 2_000_000  # characters of the text corpus the BPE trainer sees (all captions too)
    caption_languages: str = ""  # emoji caption languages kept, comma-separated (en,de,fr,es,ja,zh,ru); "" = all
    fashion_limit: int = 0  # Fashion-MNIST images kept per file (0 = all 60,000 + 10,000)
    caption_len: int = 24  # caption tokens kept (<= model.max_text_len)
    tasks: str = "text,image,pair"  # which of text, image, pair each step trains on
    text_mask_ratio: float = 0.15  # BEiT-3: 15% of monomodal text tokens
    pair_text_mask_ratio: float = 0.5  # BEiT-3: 50% of the text tokens of image-text pairs
    image_mask_ratio: float = 0.4  # BEiT-3: 40% of patches, block-wise
    valid_fraction: float = 0.05  # held-out images (per source without its own test set) and text documents
    test_fraction: float = 0.05

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


@dataclass
class AnalysisConfig:
    snapshots: int = 4  # routing snapshots of the display images, evenly spaced over training (step 0 included)
    display_images: int = 6  # held-out images whose per-patch divergence is drawn
    max_batches: int = 8  # held-out batches per modality for the activation analysis


@dataclass
class MaskedRunConfig:
    model: MultiwayConfig = field(default_factory=MultiwayConfig)
    data: MaskedDataConfig = field(default_factory=MaskedDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # under torchrun, as for `mhmoe train`

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MaskedRunConfig:
        with config_errors("model"):
            try:
                return cls(
                    model=MultiwayConfig.from_dict(data["model"]),
                    data=MaskedDataConfig(**data["data"]),
                    train=TrainConfig(**data["train"]),
                    analysis=AnalysisConfig(**data.get("analysis", {})),
                    parallel=ParallelConfig(**data.get("parallel", {})),
                )
            except (KeyError, TypeError) as e:
                raise ConfigError(f"run configuration is not a masked multimodal run of this mhmoe ({e})") from None


# ------------------------------------------------------------------------------------------------ presets


def masked_preset(name: str) -> MaskedRunConfig:
    """tiny: seconds (tests); cpu: minutes on 2 cores (`reproduce multimodal --quick`); gpu: one H200."""
    if name == "tiny":
        return MaskedRunConfig(
            model=MultiwayConfig(
                max_text_len=16, patch_size=8, codebook_size=16, d_model=32, n_layers=2, n_heads=2,
                ffn=FFNConfig(kind="mhmoe", hidden=64, moe=_xmoe(num_heads=2, num_experts=4, expert_hidden=64)),
            ),
            data=MaskedDataConfig(tokenizer="byte", caption_len=12, fashion_limit=200, tokenizer_chars=20_000),
            train=TrainConfig(batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=2,
                              final_eval_batches=2, checkpoint_every=4, log_every=2, lr=3e-3, threads=1),
            analysis=AnalysisConfig(snapshots=3, display_images=2, max_batches=2),
        )  # fmt: skip
    if name == "cpu":
        return MaskedRunConfig(
            model=MultiwayConfig(
                max_text_len=64, patch_size=4, codebook_size=256, d_model=128, n_layers=4, n_heads=4,
                ffn=FFNConfig(kind="mhmoe", hidden=512, moe=_xmoe(num_experts=8, expert_hidden=512)),
            ),
            data=MaskedDataConfig(vocab_size=4096, fashion_limit=12_000),
            train=TrainConfig(batch_size=16, max_steps=250, warmup_steps=20, lr=3e-3, eval_every=50, eval_batches=3,
                              final_eval_batches=12, checkpoint_every=250, log_every=10),
            analysis=AnalysisConfig(snapshots=11, display_images=6, max_batches=8),
        )  # fmt: skip
    if name == "gpu":
        return MaskedRunConfig(
            model=MultiwayConfig(
                max_text_len=64, patch_size=4, codebook_size=1024, d_model=512, n_layers=6, n_heads=8,
                ffn=FFNConfig(kind="mhmoe", hidden=2048, moe=_xmoe(num_experts=8, expert_hidden=2048)),
            ),
            data=MaskedDataConfig(vocab_size=8192),
            train=TrainConfig(batch_size=40, max_steps=480, warmup_steps=40, lr=1.5e-3, eval_every=120,
                              eval_batches=4, final_eval_batches=16, checkpoint_every=480, log_every=20),
            analysis=AnalysisConfig(snapshots=9, display_images=8, max_batches=20),
        )  # fmt: skip
    raise ConfigError(f"unknown masked preset {name!r}; choose tiny, cpu or gpu")


def apply_masked_overrides(cfg: MaskedRunConfig, overrides: list[str]) -> MaskedRunConfig:
    set_fields(cfg, overrides, hint="see the fields of mhmoe.experiments.multimodal.config.MaskedRunConfig")
    validate_masked(cfg)
    return cfg


def validate_masked(cfg: MaskedRunConfig) -> None:
    """Range checks naming the key; the model and train sections go through the LM run's checks."""
    m, d = cfg.model, cfg.data
    validate_model(m, "model")
    validate_train(cfg.train)
    validate_parallel(cfg.parallel, m.ffn)

    _check(m.max_text_len >= 1, f"model.max_text_len must be >= 1, got {m.max_text_len}")
    _check(
        m.patch_size >= 1 and m.image_size % m.patch_size == 0,
        f"model.image_size ({m.image_size}) must be divisible by model.patch_size ({m.patch_size})",
    )
    _check(m.channels == 3, f"model.channels must be 3 (images are read as RGB), got {m.channels}")
    _check(m.codebook_size >= 2, f"model.codebook_size must be >= 2, got {m.codebook_size}")
    _check(
        1 <= d.caption_len <= m.max_text_len, f"data.caption_len must be in 1..{m.max_text_len}, got {d.caption_len}"
    )
    unknown = [t for t in d.task_list() if t not in TASKS]
    _check(bool(d.task_list()) and not unknown, f"data.tasks must name some of {', '.join(TASKS)}, got {d.tasks!r}")
    for key in ("text_mask_ratio", "pair_text_mask_ratio", "image_mask_ratio"):
        _check(0 < getattr(d, key) < 1, f"data.{key} must be in (0, 1), got {getattr(d, key)}")
    _check(d.fashion_limit >= 0 and d.tokenizer_chars >= 0, "data.fashion_limit and data.tokenizer_chars must be >= 0")
    _check(
        cfg.analysis.snapshots >= 0 and cfg.analysis.display_images >= 1, "analysis.snapshots >= 0, display_images >= 1"
    )
    _check(d.vocab_size >= 1, f"data.vocab_size must be >= 1, got {d.vocab_size}")
    _check(
        0 < d.valid_fraction < 0.5 and 0 < d.test_fraction < 0.5,
        f"data.valid_fraction and data.test_fraction must be in (0, 0.5), got {d.valid_fraction}, {d.test_fraction}",
    )
