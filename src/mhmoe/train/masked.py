"""Masked data modelling (BEiT-3 style) for the multiway Transformer: data, batches, training, evaluation, routing.

Every optimiser step sees one micro-batch of each task (BEiT-3 trains on monomodal and multimodal data together):
    text   masked language modelling on windows of a text corpus (15% of tokens masked)
    image  masked image modelling on images alone: 40% of patches masked block-wise, targets = visual tokens
    pair   both on image–caption pairs: 50% of caption tokens and 40% of patches masked
and adds their losses (each the mean cross-entropy over its masked positions) plus the MoE auxiliary losses.
Held-out text and images are never trained on; evaluation masks are drawn from fixed seeds, so every model is
scored on the same masked positions. The reported metric is masked-token perplexity (exp of the mean
cross-entropy over masked text tokens) on held-out text and pairs, and masked-patch loss / accuracy.

A run directory holds what `mhmoe.train.trainer` writes (config.json, env.json, metrics.jsonl/csv, tb/, checkpoints/,
summary.json) plus tokenizer.json, visual_tokens.npz (the k-means codebook) and routing/step-N.npz: the routing of a
few held-out images at several steps, for the per-patch divergence plot (PAPER.md §6).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.data.images import ImageCaptions, VisualTokenizer, image_masks, normalise, pad_captions, text_masks
from mhmoe.errors import ConfigError, DataError
from mhmoe.layers.multihead import MHMoE
from mhmoe.models.gpt import FFNConfig, GPTConfig
from mhmoe.models.multiway import MultiwayConfig, MultiwayTransformer, multiway_cost
from mhmoe.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    run_checkpoint,
    save_checkpoint,
    write_text_atomically,
)
from mhmoe.train.config import DataConfig, RunConfig, TrainConfig, set_fields, validate
from mhmoe.train.trainer import (
    MetricsLog,
    all_finite,
    apply_step,
    autocast_for,
    environment,
    lr_at,
    make_optimizer,
    progress_bar,
    resolve_device,
    update_router_biases,
)

TASKS = ("text", "image", "pair")
DATA_ENV = "MHMOE_MULTIMODAL_DATA"
EVAL_SEED = 20231  # masks of held-out batches: the same positions for every model and seed


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MaskedRunConfig:
        try:
            return cls(
                model=MultiwayConfig.from_dict(data["model"]),
                data=MaskedDataConfig(**data["data"]),
                train=TrainConfig(**data["train"]),
                analysis=AnalysisConfig(**data.get("analysis", {})),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"run configuration is not a masked multimodal run of this mhmoe ({e})") from None


# ------------------------------------------------------------------------------------------------ presets


def masked_preset(name: str) -> MaskedRunConfig:
    """tiny: seconds (tests); cpu: minutes on 2 cores (`reproduce multimodal --quick`); gpu: one H200."""
    ffn = dict(kind="mhmoe", router="xmoe", num_heads=4, top_k=2)
    if name == "tiny":
        return MaskedRunConfig(
            model=MultiwayConfig(
                max_text_len=16, patch_size=8, codebook_size=16, d_model=32, n_layers=2, n_heads=2,
                ffn=FFNConfig(**{**ffn, "num_heads": 2}, hidden=64, num_experts=4, expert_hidden=64),
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
                ffn=FFNConfig(**ffn, hidden=512, num_experts=8, expert_hidden=512),
            ),
            data=MaskedDataConfig(vocab_size=4096, fashion_limit=12_000),
            train=TrainConfig(batch_size=16, max_steps=250, warmup_steps=20, lr=3e-3, eval_every=50, eval_batches=3,
                              final_eval_batches=12, checkpoint_every=250, log_every=10),
            analysis=AnalysisConfig(snapshots=4, display_images=6, max_batches=8),
        )  # fmt: skip
    if name == "gpu":
        return MaskedRunConfig(
            model=MultiwayConfig(
                max_text_len=64, patch_size=4, codebook_size=1024, d_model=512, n_layers=6, n_heads=8,
                ffn=FFNConfig(**ffn, hidden=2048, num_experts=8, expert_hidden=2048),
            ),
            data=MaskedDataConfig(vocab_size=8192),
            train=TrainConfig(batch_size=192, max_steps=160, warmup_steps=16, lr=1.5e-3, eval_every=40,
                              eval_batches=8, final_eval_batches=40, checkpoint_every=160, log_every=10),
            analysis=AnalysisConfig(snapshots=4, display_images=8, max_batches=20),
        )  # fmt: skip
    raise ConfigError(f"unknown masked preset {name!r}; choose tiny, cpu or gpu")


def apply_masked_overrides(cfg: MaskedRunConfig, overrides: list[str]) -> MaskedRunConfig:
    set_fields(cfg, overrides, hint="see the fields of mhmoe.train.masked.MaskedRunConfig")
    validate_masked(cfg)
    return cfg


def validate_masked(cfg: MaskedRunConfig) -> None:
    """Range checks naming the key; model and train fields go through the GPT run's checks."""
    m, d = cfg.model, cfg.data

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    check(m.max_text_len >= 1, f"model.max_text_len must be >= 1, got {m.max_text_len}")
    check(
        m.patch_size >= 1 and m.image_size % m.patch_size == 0,
        f"model.image_size ({m.image_size}) must be divisible by model.patch_size ({m.patch_size})",
    )
    check(m.channels == 3, f"model.channels must be 3 (images are read as RGB), got {m.channels}")
    check(m.codebook_size >= 2, f"model.codebook_size must be >= 2, got {m.codebook_size}")
    check(1 <= d.caption_len <= m.max_text_len, f"data.caption_len must be in 1..{m.max_text_len}, got {d.caption_len}")
    unknown = [t for t in d.task_list() if t not in TASKS]
    check(bool(d.task_list()) and not unknown, f"data.tasks must name some of {', '.join(TASKS)}, got {d.tasks!r}")
    for key in ("text_mask_ratio", "pair_text_mask_ratio", "image_mask_ratio"):
        check(0 < getattr(d, key) < 1, f"data.{key} must be in (0, 1), got {getattr(d, key)}")
    check(d.fashion_limit >= 0 and d.tokenizer_chars >= 0, "data.fashion_limit and data.tokenizer_chars must be >= 0")
    check(
        cfg.analysis.snapshots >= 0 and cfg.analysis.display_images >= 1, "analysis.snapshots >= 0, display_images >= 1"
    )
    gpt = GPTConfig(seq_len=m.max_text_len, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                    dropout=m.dropout, ffn=m.ffn)  # fmt: skip
    validate(RunConfig(model=gpt, data=DataConfig(vocab_size=d.vocab_size, valid_fraction=d.valid_fraction,
                                                  test_fraction=d.test_fraction), train=cfg.train))  # fmt: skip


# ------------------------------------------------------------------------------------------------ data


@dataclass
class MultimodalData:
    """Everything a run trains and evaluates on, prepared once (a reproduction shares it between models)."""

    tokenizer: Any
    visual: VisualTokenizer
    text: dict[str, np.ndarray]  # split -> (N,) token ids of the text corpus
    sources: list[ImageCaptions]
    caption_ids: list[list[list[list[int]]]]  # source -> image -> caption -> token ids
    root: str


def data_root(cfg: MaskedRunConfig) -> Path:
    given = cfg.data.path or os.environ.get(DATA_ENV, "")
    if not given:
        raise DataError(
            f"no multimodal data: pass --data (the data pack root or an image folder with captions.jsonl) or set ${DATA_ENV}"
        )
    return Path(given).expanduser()


def load_sources(cfg: MaskedDataConfig, root: Path) -> tuple[list[ImageCaptions], Path | None]:
    """The image sources under root (and data.images), and the text corpus path (None: use the captions)."""
    from mhmoe.data.images import find_sources, load_emoji, load_fashion_mnist, load_image_folder

    found = find_sources(root)
    languages = [x.strip() for x in cfg.caption_languages.split(",") if x.strip()]
    sources = []
    if found.emoji:
        sources.append(load_emoji(found.emoji, languages, cfg.valid_fraction, cfg.test_fraction))
    if found.fashion:
        sources.append(load_fashion_mnist(found.fashion, cfg.fashion_limit))
    extra = [Path(p.strip()).expanduser() for p in cfg.images.split(",") if p.strip()]
    for folder in found.folders + extra:
        sources.append(load_image_folder(folder, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction))
    sizes = {s.name: s.images.shape[1:] for s in sources}
    if len(set(sizes.values())) > 1:
        raise DataError(f"image sources have different image sizes {sizes}")
    for source in sources:
        missing = [s for s in ("train", "valid") if not len(source.indices(s))]
        if missing:
            raise DataError(f"image source {source.name} has no {' or '.join(missing)} images; give it more images")
    text = Path(cfg.text).expanduser() if cfg.text else found.text
    return sources, text


def _caption_corpus(sources: list[ImageCaptions]) -> Any:
    from mhmoe.data import Corpus

    split = {
        s: [" \n".join(src.captions[i]) for src in sources for i in src.indices(s)] for s in ("train", "valid", "test")
    }
    return Corpus(split["train"], split["valid"], split["test"] or split["valid"], source="captions")


def prepare_multimodal(cfg: MaskedRunConfig, progress: bool = True, saved: Path | None = None) -> MultimodalData:
    """Load the sources, train (or load from `saved`, a run directory) the tokenizers, tokenize the text."""
    from mhmoe.data import BPETokenizer, data_cache_dir, load_corpus, load_tokenizer, tokenize_corpus

    d = cfg.data
    root = data_root(cfg)
    sources, text_path = load_sources(d, root)
    corpus = (
        load_corpus(text_path, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction)
        if text_path
        else _caption_corpus(sources)
    )
    train_captions = [c for src in sources for i in src.indices("train") for c in src.captions[i]]
    if saved is not None and (saved / "tokenizer.json").exists():
        tokenizer = load_tokenizer(saved / "tokenizer.json")
    elif d.tokenizer == "bpe":
        tokenizer = BPETokenizer.train(train_captions + _first_chars(corpus.train, d.tokenizer_chars), d.vocab_size)
    else:
        tokenizer = load_tokenizer(d.tokenizer)
    if saved is not None and (saved / "visual_tokens.npz").exists():
        visual = VisualTokenizer.load(saved / "visual_tokens.npz")
    else:
        train_images = np.concatenate([src.images[src.indices("train")] for src in sources])
        visual = VisualTokenizer.train(train_images, cfg.model.codebook_size, cfg.model.patch_size, seed=0)
    text = tokenize_corpus(corpus, tokenizer, data_cache_dir(), progress=progress)
    unique = sorted({c for src in sources for caps in src.captions for c in caps})
    encoded = dict(zip(unique, tokenizer.encode_batch(unique)))
    caption_ids = [[[encoded[c] for c in caps] for caps in src.captions] for src in sources]
    return MultimodalData(tokenizer, visual, text, sources, caption_ids, str(root))


def _first_chars(documents: list[str], limit: int) -> list[str]:
    out, used = [], 0
    for doc in documents:
        if used >= limit:
            break
        out.append(doc[: limit - used])
        used += len(out[-1])
    return out


# ------------------------------------------------------------------------------------------------ batches

Item = tuple[int, int, int]  # (source, image, caption)


def _draw_items(data: MultimodalData, rng: np.random.Generator, batch: int, with_caption: bool) -> list[Item]:
    """Training items: a source with equal probability (so Fashion-MNIST's 60k images do not drown 1.9k emoji),
    then one of its training images uniformly, and for pairs one of that image's captions."""
    train = [src.indices("train") for src in data.sources]
    usable = [s for s, idx in enumerate(train) if len(idx)]
    items = []
    for s in rng.choice(usable, size=batch):
        i = int(rng.choice(train[s]))
        j = int(rng.integers(len(data.sources[s].captions[i]))) if with_caption else 0
        items.append((int(s), i, j))
    return items


def heldout_items(data: MultimodalData, split: str, with_caption: bool) -> list[Item]:
    """Every held-out image (with each of its captions, for pairs), sources interleaved round-robin so that a
    capped evaluation still sees every source."""
    lists = []
    for s, src in enumerate(data.sources):
        if with_caption:
            lists.append([(s, int(i), int(j)) for i, j in src.pairs(split)])
        else:
            lists.append([(s, int(i), 0) for i in src.indices(split)])
    out = []
    for position in range(max((len(x) for x in lists), default=0)):
        out += [x[position] for x in lists if position < len(x)]
    return out


def make_batch(
    kind: str, data: MultimodalData, cfg: MaskedRunConfig, rng: np.random.Generator, items=None, text=None
) -> dict[str, torch.Tensor]:
    """Model keyword arguments for one micro-batch of `kind` (masks drawn from rng). items: for image/pair;
    text: (B, Lt) int64 windows for text."""
    d, m = cfg.data, cfg.model
    batch: dict[str, torch.Tensor] = {}
    if kind == "text":
        batch["text"] = text
        batch["text_mask"] = torch.from_numpy(text_masks(np.ones(tuple(text.shape), bool), d.text_mask_ratio, rng))
        return batch
    pictures = np.stack([data.sources[s].images[i] for s, i, _ in items])
    batch["images"] = normalise(pictures)
    batch["image_targets"] = data.visual.encode(pictures)
    batch["image_mask"] = torch.from_numpy(image_masks(len(items), (m.grid, m.grid), d.image_mask_ratio, rng))
    if kind == "pair":
        ids, valid = pad_captions([data.caption_ids[s][i][j] for s, i, j in items], d.caption_len)
        batch["text"], batch["text_valid"] = ids, valid
        batch["text_mask"] = torch.from_numpy(text_masks(valid.numpy(), d.pair_text_mask_ratio, rng))
    return batch


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _positions(batch: dict[str, torch.Tensor]) -> int:
    """Input positions of a batch: patches plus non-padding text tokens."""
    count = 0
    if "images" in batch:
        count += batch["image_mask"].numel()
    if "text" in batch:
        count += int(batch["text_valid"].sum()) if "text_valid" in batch else batch["text"].numel()
    return count


def eval_batches_of(
    kind: str, data: MultimodalData, cfg: MaskedRunConfig, split: str, max_batches: int, masked: bool = True
):
    """Deterministic held-out batches of `kind` (text windows in order; images / pairs round-robin over sources).
    Masks come from a fixed seed per batch, so all models see the same masked positions."""
    from mhmoe.data import eval_batches

    B = cfg.train.batch_size
    if kind == "text":
        source = eval_batches(data.text[split], B, cfg.model.max_text_len, max_batches=max_batches or None)
        chunks = (("text", x) for x, _ in source)
    else:
        items = heldout_items(data, split, with_caption=kind == "pair")
        starts = range(0, len(items), B)
        chunks = (("items", items[i : i + B]) for i in list(starts)[: max_batches or None])
    for number, (what, chunk) in enumerate(chunks):
        rng = np.random.default_rng([EVAL_SEED, TASKS.index(kind), number])
        batch = make_batch(kind, data, cfg, rng, **({"text": chunk} if what == "text" else {"items": chunk}))
        if not masked:
            batch = {k: v for k, v in batch.items() if k not in ("text_mask", "image_mask", "image_targets")}
        yield batch


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_masked(
    model: MultiwayTransformer, data: MultimodalData, cfg: MaskedRunConfig, split: str, device, max_batches: int = 0
) -> dict[str, dict[str, float]]:
    """Per task: masked-token loss (nats), perplexity and count on held-out text / captions; masked-patch loss,
    perplexity and accuracy (argmax = target visual token) on held-out images alone and in pairs."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}  # name -> [loss sum, count, correct]
    for kind in cfg.data.task_list():
        for batch in eval_batches_of(kind, data, cfg, split, max_batches):
            batch = _to(batch, device)
            with autocast_for(cfg, device):
                out = model(**batch)
            if out.text_logits is not None:
                name = "pair_text" if kind == "pair" else "text"
                _accumulate(sums, name, out.text_logits, batch["text"][batch["text_mask"]])
            if out.image_logits is not None:
                name = "pair_patch" if kind == "pair" else "patch"
                _accumulate(sums, name, out.image_logits, batch["image_targets"][batch["image_mask"]])
    model.train(was_training)
    report = {}
    for name, (loss_sum, count, correct) in sums.items():
        mean = loss_sum / max(count, 1)
        report[name] = {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "acc": correct / max(count, 1), "count": count}
    return report


def _accumulate(sums: dict, name: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
    correct = int((logits.argmax(dim=-1) == targets).sum())
    entry = sums.setdefault(name, [0.0, 0, 0])
    entry[0], entry[1], entry[2] = entry[0] + loss, entry[1] + targets.numel(), entry[2] + correct


def headline(report: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(loss, perplexity) the curves and the CSV show: masked text tokens of held-out text, else of pairs, else patches."""
    for name in ("text", "pair_text", "patch", "pair_patch"):
        if name in report:
            return report[name]["loss"], report[name]["ppl"]
    raise ValueError("evaluation report is empty")


# ------------------------------------------------------------------------------------------------ routing


def display_items(data: MultimodalData, cfg: MaskedRunConfig) -> list[Item]:
    """The held-out images whose routing is snapshotted: the first of each source in turn."""
    return heldout_items(data, "valid", with_caption=False)[: cfg.analysis.display_images]


def snapshot_steps(max_steps: int, count: int) -> list[int]:
    """`count` steps evenly spaced over 0..max_steps, both ends included (just max_steps for count 1)."""
    if count <= 0:
        return []
    if count == 1:
        return [max_steps]
    return sorted({round(max_steps * i / (count - 1)) for i in range(count)})


@torch.no_grad()
def save_routing_snapshot(
    model: MultiwayTransformer, data: MultimodalData, cfg: MaskedRunConfig, step: int, folder: Path, device
) -> Path | None:
    """The vision MoE layers' top experts for the display images (unmasked) at this step, as routing/step-N.npz."""
    layers = model.moe_layers("vision")
    if not layers:
        return None
    items = display_items(data, cfg)
    pictures = np.stack([data.sources[s].images[i] for s, i, _ in items])
    was_training = model.training
    model.eval()
    with autocast_for(cfg, device):
        out = model(images=normalise(pictures).to(device))
    model.train(was_training)
    arrays: dict[str, np.ndarray] = {"step": np.array(step), "images": pictures, "grid": np.array(cfg.model.grid)}
    for r in out.routing:
        arrays[f"block{r.block}"] = r.stats.top_experts.cpu().numpy()
    layer = layers[0]
    arrays["num_heads"] = np.array(getattr(layer, "num_heads", 1))
    arrays["num_experts"] = np.array(layer.num_experts)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.npz"
    tmp = folder / f".step-{step:08d}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def patch_divergence_maps(snapshot: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """(step, images (n, S, S, 3), (n, g, g) per-patch divergence averaged over the vision MoE layers)."""
    from mhmoe.analysis import LayerRouting, mean_divergence

    with np.load(snapshot) as archive:
        heads, experts, grid = int(archive["num_heads"]), int(archive["num_experts"]), int(archive["grid"])
        layers = [LayerRouting(archive[k], heads, experts, k) for k in sorted(archive.files) if k.startswith("block")]
        images, step = archive["images"], int(archive["step"])
    return step, images, mean_divergence(layers).reshape(len(images), grid, grid)


@torch.no_grad()
def collect_multiway_routing(
    model: MultiwayTransformer, data: MultimodalData, cfg: MaskedRunConfig, device, max_batches: int
) -> dict[str, list]:
    """Per modality, per MoE block: the routing of unmasked held-out images (vision FFNs) and text (language FFNs)."""
    from mhmoe.analysis import LayerRouting

    kinds = {"vision": "image", "language": "text"}
    report = {}
    was_training = model.training
    model.eval()
    for modality, kind in kinds.items():
        per_block: dict[int, list] = {}
        masks: dict[int, list] = {}
        for batch in eval_batches_of(kind, data, cfg, "valid", max_batches, masked=False):
            with autocast_for(cfg, device):
                out = model(**_to(batch, device))
            for r in out.routing:
                per_block.setdefault(r.block, []).append(r.stats)
                masks.setdefault(r.block, []).append(r.token_mask)
        layers = model.moe_layers(modality)
        report[modality] = [
            LayerRouting.from_stats(
                per_block[block], getattr(layer, "num_heads", 1), layer.num_experts, f"block {block}",
                token_masks=None if all(m is None for m in masks[block]) else masks[block],
            )
            for block, layer in zip(sorted(per_block), layers, strict=True)
        ]  # fmt: skip
    model.train(was_training)
    return report


def analyze_masked_run(
    run_dir: Path, data: MultimodalData, cfg: MaskedRunConfig, model: MultiwayTransformer, device
) -> dict:
    """Activation heat maps and summaries per modality, and the per-patch divergence grid over training steps,
    into run_dir/analysis/."""
    from mhmoe.analysis import (
        DEFAULT_ACTIVATION_THRESHOLD,
        activation_ratio,
        effective_experts,
        effective_fraction,
        expert_shares,
        summarize,
    )
    from mhmoe.plots import plot_activation_heatmap, plot_patch_divergence_grid

    out_dir = run_dir / "analysis"
    if not model.moe_layers():
        return {"note": "dense model: no routing to analyse"}
    report: dict[str, Any] = {}
    routing = collect_multiway_routing(model, data, cfg, device, cfg.analysis.max_batches)
    both = routing["vision"] + routing["language"]  # different tokens per modality: no joint divergence
    report["all"] = dict(
        activation_ratio=activation_ratio(both),
        threshold=DEFAULT_ACTIVATION_THRESHOLD,
        effective_experts=float(np.mean([effective_experts(layer) for layer in both])),
        effective_fraction=float(np.mean([effective_fraction(layer) for layer in both])),
    )
    for modality, layers in routing.items():
        shares = np.stack([expert_shares(layer) for layer in layers])
        names = [layer.name for layer in layers]
        report[modality] = summarize(layers)
        title = f"expert share per layer, {modality} FFNs (held-out {'images' if modality == 'vision' else 'text'})"
        plot_activation_heatmap(shares, out_dir / f"heatmap-{modality}.png", title, names)
    snapshots = sorted((run_dir / "routing").glob("step-*.npz"))
    if snapshots and isinstance(model.moe_layers("vision")[0], MHMoE):
        maps = [patch_divergence_maps(s) for s in snapshots]
        images = maps[-1][1]
        grid = [[m[2][i] for m in maps] for i in range(len(images))]
        plot_patch_divergence_grid(
            list(images), grid, out_dir / "divergence-patches.png", [f"step {m[0]}" for m in maps]
        )
        report["patch_divergence"] = {f"step {m[0]}": float(m[2].mean()) for m in maps}
    write_text_atomically(out_dir / "analysis.json", json.dumps(report, indent=1) + "\n")
    return report


def load_masked_model(run_dir: Path, device=None) -> tuple[MaskedRunConfig, MultiwayTransformer]:
    """The config and model of a run directory at its latest checkpoint."""
    config, checkpoint = run_checkpoint(run_dir, "a masked multimodal run directory")
    cfg = MaskedRunConfig.from_dict(config)
    model = MultiwayTransformer(cfg.model)
    load_model_weights(checkpoint, model)
    return cfg, model.to(device or resolve_device(cfg.train.device)).eval()


# ------------------------------------------------------------------------------------------------ train


@dataclass
class MaskedRunResult:
    run_dir: Path
    step: int
    tokens_seen: int  # input positions: patches + non-padding text tokens, all tasks
    train_seconds: float
    valid: dict  # evaluate_masked report
    test: dict


def _check_resumable(cfg: MaskedRunConfig, run_dir: Path) -> None:
    """A run directory is resumed only with the same model and data settings; train.* may change."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = MaskedRunConfig.from_dict(json.loads(saved_path.read_text())).to_dict()
    now = cfg.to_dict()
    now["model"]["vocab_size"] = saved["model"]["vocab_size"]  # derived from the tokenizer
    for section in ("model", "data"):
        diffs = [k for k in now[section] if saved[section].get(k) != now[section][k]]
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with different {section} settings ({', '.join(diffs)}); "
                "pass another --out, or the same settings to resume"
            )


def train_masked(
    cfg: MaskedRunConfig, run_dir: Path, progress: bool = True, data: MultimodalData | None = None
) -> MaskedRunResult:
    """Train (or resume) the run in run_dir to cfg.train.max_steps, then evaluate on held-out valid and test.

    data: prepared data to reuse (a reproduction prepares it once); else prepared here and saved in the run."""
    t = cfg.train
    validate_masked(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(cfg, run_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    data = data or prepare_multimodal(cfg, progress, saved=run_dir)
    if not (run_dir / "tokenizer.json").exists():
        data.tokenizer.save(run_dir / "tokenizer.json")
    if not (run_dir / "visual_tokens.npz").exists():
        data.visual.save(run_dir / "visual_tokens.npz")
    cfg.model.vocab_size = data.tokenizer.vocab_size + 1  # + [MASK]
    if data.visual.size != cfg.model.codebook_size or data.visual.patch_size != cfg.model.patch_size:
        raise ConfigError(
            f"visual tokens have {data.visual.size} codes for {data.visual.patch_size}-pixel patches, the model "
            f"expects {cfg.model.codebook_size} for {cfg.model.patch_size}"
        )
    write_text_atomically(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    write_text_atomically(run_dir / "env.json", json.dumps(environment(device), indent=1) + "\n")

    from mhmoe.data import BatchSampler

    torch.manual_seed(t.seed)
    model = MultiwayTransformer(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg)  # type: ignore[arg-type]  # reads cfg.train only
    tasks = cfg.data.task_list()
    sampler = (
        BatchSampler(data.text["train"], t.batch_size, cfg.model.max_text_len, seed=t.seed) if "text" in tasks else None
    )
    step, tokens_seen, train_seconds = 0, 0, 0.0
    checkpoints = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        if sampler is not None:
            sampler.load_state_dict(state["sampler"])
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
    forward = torch.compile(model) if t.compile else model
    metrics = MetricsLog(run_dir, step)
    snapshots = set(snapshot_steps(t.max_steps, cfg.analysis.snapshots))
    bar = progress_bar(t.max_steps, step, progress)

    def save() -> None:
        state = {"tokens_seen": tokens_seen, "train_seconds": train_seconds}
        if sampler is not None:
            state["sampler"] = sampler.state_dict()
        save_checkpoint(checkpoints, step, model, optimizer, state, keep=t.keep_checkpoints)

    try:
        model.train()
        if step == 0 and 0 in snapshots:
            save_routing_snapshot(model, data, cfg, 0, run_dir / "routing", device)
        while step < t.max_steps:
            started = time.perf_counter()
            lr = lr_at(step, cfg)  # type: ignore[arg-type]
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = {kind: 0.0 for kind in tasks}
            aux_sum, positions, finite = 0.0, 0, True
            for micro in range(t.grad_accum):
                for kind in tasks:
                    rng = np.random.default_rng([t.seed, step, micro, TASKS.index(kind)])
                    if kind == "text":
                        batch = make_batch(kind, data, cfg, rng, text=sampler.next_batch()[0])
                    else:
                        batch = make_batch(
                            kind, data, cfg, rng, items=_draw_items(data, rng, t.batch_size, kind == "pair")
                        )
                    positions += _positions(batch)
                    with autocast_for(cfg, device):
                        out = forward(**_to(batch, device))
                    loss = (out.loss + out.aux_loss) / t.grad_accum
                    finite = finite and all_finite(loss)
                    loss.backward()
                    losses[kind] += out.loss.item() / t.grad_accum
                    aux_sum += out.aux_loss.item() / t.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip else float("inf"))
            finite = finite and all_finite(grad_norm)
            what = (
                ""
                if finite
                else f"non-finite loss or gradient at step {step} (losses {losses}, grad norm {float(grad_norm):.4g})"
            )
            if apply_step(optimizer, finite, what, t.on_nonfinite, metrics, step):
                update_router_biases(model)
            step += 1
            tokens_seen += positions
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                record = {"step": step, "tokens": tokens_seen, "loss": sum(losses.values()), "aux_loss": aux_sum,
                          "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": positions / elapsed}  # fmt: skip
                record.update({f"loss_{k}": v for k, v in losses.items()})
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % t.eval_every == 0 or step == t.max_steps:
                report = evaluate_masked(model, data, cfg, "valid", device, max_batches=t.eval_batches)
                metrics.write(_val_record(step, tokens_seen, report))
            if step in snapshots:
                save_routing_snapshot(model, data, cfg, step, run_dir / "routing", device)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                save()
    finally:
        bar.close()
        metrics.close()

    valid = evaluate_masked(model, data, cfg, "valid", device, max_batches=t.final_eval_batches)
    test = evaluate_masked(model, data, cfg, "test", device, max_batches=t.final_eval_batches)
    cost = multiway_cost(cfg.model)
    summary = {"step": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds, "valid": valid, "test": test,
               "params_total": cost.params_total, "params_active": cost.params_active,
               "flops_per_token": cost.flops_per_token}  # fmt: skip
    write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return MaskedRunResult(run_dir, step, tokens_seen, train_seconds, valid, test)


def _val_record(step: int, tokens: int, report: dict) -> dict:
    loss, ppl = headline(report)
    record = {"step": step, "tokens": tokens, "val_loss": loss, "val_ppl": ppl}
    for name, values in report.items():
        record[f"val_{name}_loss"] = values["loss"]
        if "patch" in name:
            record[f"val_{name}_acc"] = values["acc"]
    return record
