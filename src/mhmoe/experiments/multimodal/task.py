"""Masked data modelling (BEiT-3 style) for the multiway Transformer: data, batches, evaluation, and the task the
one training loop (`mhmoe.train.loop`) runs.

Every optimiser step sees one micro-batch of each task (BEiT-3 trains on monomodal and multimodal data together):
    text   masked language modelling on windows of a text corpus (15% of tokens masked)
    image  masked image modelling on images alone: 40% of patches masked block-wise, targets = visual tokens
    pair   both on image–caption pairs: 50% of caption tokens and 40% of patches masked
and adds their losses (each the mean cross-entropy over its masked positions) plus the MoE auxiliary losses.
Held-out text and images are never trained on; evaluation masks are drawn from fixed seeds, so every model is
scored on the same masked positions. The reported metric is masked-token perplexity (exp of the mean
cross-entropy over masked text tokens) on held-out text and pairs, and masked-patch loss / accuracy.

Under torchrun every rank draws the same global batch (batch_size · W rows) and keeps its slice, and each rank's
loss is weighted by its share of the global masked positions, so W ranks train exactly as one process would.

A run directory holds what the loop writes (config.json, env.json, metrics.jsonl/csv, tb/, checkpoints/,
summary.json) plus tokenizer.json, visual_tokens.npz (the k-means codebook) and routing/step-N.npz: the routing of a
few held-out images at several steps, for the per-patch divergence plot (`analysis.py`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from mhmoe.data import (
    BatchSampler,
    BPETokenizer,
    Corpus,
    data_cache_dir,
    eval_batches,
    load_corpus,
    load_tokenizer,
    tokenize_corpus,
)
from mhmoe.errors import ConfigError, DataError
from mhmoe.experiments.multimodal.config import TASKS, MaskedDataConfig, MaskedRunConfig, validate_masked
from mhmoe.experiments.multimodal.data import (
    ImageCaptions,
    VisualTokenizer,
    find_sources,
    image_masks,
    load_emoji,
    load_fashion_mnist,
    load_image_folder,
    normalise,
    pad_captions,
    text_masks,
)
from mhmoe.io import atomic_write
from mhmoe.models.multiway import MultiwayTransformer, multiway_cost
from mhmoe.train.loop import Part, RunResult, autocast_for
from mhmoe.train.loop import train as train_loop
from mhmoe.train.session import Session

DATA_ENV = "MHMOE_MULTIMODAL_DATA"
EVAL_SEED = 20231  # masks of held-out batches: the same positions for every model and seed


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
            f"no multimodal data: pass --data (the data pack root, e.g. made by `mhmoe data prepare multimodal --out "
            f"DIR`, or an image folder with captions.jsonl) or set ${DATA_ENV}"
        )
    return Path(given).expanduser()


def load_sources(cfg: MaskedDataConfig, root: Path) -> tuple[list[ImageCaptions], Path | None]:
    """The image sources under root (and data.images), and the text corpus path (None: use the captions)."""
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
    split = {
        s: [" \n".join(src.captions[i]) for src in sources for i in src.indices(s)] for s in ("train", "valid", "test")
    }
    return Corpus(split["train"], split["valid"], split["test"] or split["valid"], source="captions")


def prepare_multimodal(cfg: MaskedRunConfig, progress: bool = True, saved: Path | None = None) -> MultimodalData:
    """Load the sources, train (or load from `saved`, a run directory) the tokenizers, tokenize the text."""
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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
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
) -> Iterator[tuple[dict[str, torch.Tensor], list[str]]]:
    """Deterministic held-out batches of `kind` (text windows in order; images / pairs round-robin over sources),
    each with the source name of its rows. Masks come from a fixed seed per batch, so all models see the same
    masked positions."""
    B = cfg.train.batch_size
    if kind == "text":
        source = eval_batches(data.text[split], B, cfg.model.max_text_len, max_batches=max_batches or None)
        chunks: Iterator[dict[str, Any]] = ({"text": x} for x, _ in source)
    else:
        items = heldout_items(data, split, with_caption=kind == "pair")
        starts = range(0, len(items), B)
        chunks = ({"items": items[i : i + B]} for i in list(starts)[: max_batches or None])
    for number, chunk in enumerate(chunks):
        rng = np.random.default_rng([EVAL_SEED, TASKS.index(kind), number])
        batch = make_batch(kind, data, cfg, rng, **chunk)
        if not masked:
            batch = {k: v for k, v in batch.items() if k not in ("text_mask", "image_mask", "image_targets")}
        rows = (
            [data.sources[s].name for s, _, _ in chunk["items"]] if "items" in chunk else ["text"] * len(chunk["text"])
        )
        yield batch, rows


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_masked(
    model: MultiwayTransformer, data: MultimodalData, cfg: MaskedRunConfig, split: str, device, max_batches: int = 0
) -> dict[str, dict[str, float]]:
    """Per task: masked-token loss (nats), perplexity and count on held-out text / captions; masked-patch loss,
    perplexity and accuracy (argmax = target visual token) on held-out images alone and in pairs. Pairs are also
    reported per image source ("pair_text@emoji", ...): template captions (Fashion-MNIST) make pair perplexity
    largely class recognition, free-text captions do not, and the pooled number mixes the two."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}  # name -> [loss sum, count, correct]
    for kind in cfg.data.task_list():
        for batch, rows in eval_batches_of(kind, data, cfg, split, max_batches):
            batch = to_device(batch, device)
            with autocast_for(cfg.train.precision, device):
                out = model(**batch)
            for logits, targets, mask, name in (
                (out.text_logits, batch.get("text"), batch.get("text_mask"), "text"),
                (out.image_logits, batch.get("image_targets"), batch.get("image_mask"), "patch"),
            ):
                if logits is None or targets is None or mask is None:
                    continue
                name = f"pair_{name}" if kind == "pair" else name
                _accumulate(sums, name, logits, targets[mask])
                if kind == "pair":  # the same positions, bucketed by their image's source
                    _accumulate_by_row(sums, name, logits, targets[mask], mask.nonzero()[:, 0], rows)
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


def _accumulate_by_row(
    sums: dict, name: str, logits: torch.Tensor, targets: torch.Tensor, row_M: torch.Tensor, rows: list[str]
) -> None:
    """`_accumulate` per source: position m belongs to batch row row_M[m], whose source is rows[row]."""
    loss_M = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    correct_M = logits.argmax(dim=-1) == targets
    for source in sorted(set(rows)):
        keep = torch.tensor([rows[r] == source for r in row_M.tolist()], dtype=torch.bool, device=loss_M.device)
        entry = sums.setdefault(f"{name}@{source}", [0.0, 0, 0])
        entry[0] += float(loss_M[keep].sum())
        entry[1] += int(keep.sum())
        entry[2] += int(correct_M[keep].sum())


def headline(report: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(loss, perplexity) the curves and the CSV show: masked text tokens of held-out text, else of pairs, else patches."""
    for name in ("text", "pair_text", "patch", "pair_patch"):
        if name in report:
            return report[name]["loss"], report[name]["ppl"]
    raise ValueError("evaluation report is empty")


# ------------------------------------------------------------------------------------------------ routing snapshots


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
    model: MultiwayTransformer,
    data: MultimodalData,
    cfg: MaskedRunConfig,
    step: int,
    folder: Path,
    device: torch.device,
    write: bool = True,
) -> Path | None:
    """The vision MoE layers' top experts for the display images (unmasked) at this step, as routing/step-N.npz.

    Every rank of a distributed run runs the forward (its collectives); only the one with `write` writes."""
    layers = model.moe_layers("vision")
    if not layers:
        return None
    items = display_items(data, cfg)
    pictures = np.stack([data.sources[s].images[i] for s, i, _ in items])
    was_training = model.training
    model.eval()
    with autocast_for(cfg.train.precision, device):
        out = model(images=normalise(pictures).to(device))
    model.train(was_training)
    arrays: dict[str, np.ndarray] = {"step": np.array(step), "images": pictures, "grid": np.array(cfg.model.grid)}
    for r in out.routing:
        arrays[f"block{r.block}"] = r.stats.top_experts.cpu().numpy()
    arrays["num_heads"] = np.array(layers[0].num_heads)
    arrays["num_experts"] = np.array(layers[0].num_experts)
    path = folder / f"step-{step:08d}.npz"
    if write:
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
    return path


# ------------------------------------------------------------------------------------------------ the task


class MaskedTask:
    """Masked multimodal modelling as a `mhmoe.train.loop.Task`: one forward per data task (text, image, pair) in
    every micro-batch, their losses added (BEiT-3)."""

    partial_forwards = True  # a text-only forward leaves the vision FFNs unused, an image-only one the language ones
    run_files: tuple[str, ...] = (
        "tokenizer.json",
        "visual_tokens.npz",
    )  # the text tokenizer and the visual-token codebook

    def __init__(
        self, cfg: MaskedRunConfig, run_dir: Path, session: Session, progress: bool, data: MultimodalData | None
    ):
        self.cfg, self.session = cfg, session
        self.run_dir = run_dir

        def prepare() -> MultimodalData:  # rank 0 first: the others then load the tokenizers it trained and saved
            prepared = data or prepare_multimodal(cfg, progress, saved=run_dir)
            if session.is_main:
                _save_tokenizers(prepared, run_dir)
            return prepared

        self.data = session.first_on_main(prepare)
        cfg.model.vocab_size = self.data.tokenizer.vocab_size + 1  # + [MASK]
        visual = self.data.visual
        if visual.size != cfg.model.codebook_size or visual.patch_size != cfg.model.patch_size:
            raise ConfigError(
                f"visual tokens have {visual.size} codes for {visual.patch_size}-pixel patches, the model "
                f"expects {cfg.model.codebook_size} for {cfg.model.patch_size}"
            )
        self.cost = multiway_cost(cfg.model)
        self.tasks = cfg.data.task_list()
        self.sampler: BatchSampler | None = None

    def build_model(self) -> MultiwayTransformer:
        return MultiwayTransformer(self.cfg.model)

    def start(self) -> None:
        if "text" in self.tasks:
            t, rows = self.cfg.train, self.cfg.train.batch_size * self.session.world
            self.sampler = BatchSampler(self.data.text["train"], rows, self.cfg.model.max_text_len, seed=t.seed)

    def parts(self, step: int, micro: int) -> Iterator[Part]:
        rows = self.cfg.train.batch_size * self.session.world  # the global batch; this rank keeps its slice
        for kind in self.tasks:
            rng = np.random.default_rng([self.cfg.train.seed, step, micro, TASKS.index(kind)])
            if kind == "text":
                assert self.sampler is not None
                batch = make_batch(kind, self.data, self.cfg, rng, text=self.sampler.next_batch()[0])
            else:
                batch = make_batch(
                    kind, self.data, self.cfg, rng, items=_draw_items(self.data, rng, rows, kind == "pair")
                )
            masked: dict[str, int] = {k: int(batch[k].sum()) for k in ("text_mask", "image_mask") if k in batch}
            local = {k: self.session.shard(v).to(self.session.device, non_blocking=True) for k, v in batch.items()}
            yield Part(kind, local, _positions(batch), masked)

    def loss(self, out: Any, part: Part) -> torch.Tensor:
        """The mean over this rank's masked positions is reweighted by its share of the global ones, so that the
        data-parallel average of the W ranks' gradients is the gradient of the global mean (1 process: unchanged)."""
        W = self.session.world
        if W == 1:
            return out.loss
        global_counts = part.counts or {}
        loss = out.loss.new_zeros(())
        for value, mask in ((out.text_loss, "text_mask"), (out.image_loss, "image_mask")):
            if value is not None:
                local = int(part.inputs[mask].sum())
                loss = loss + value * (local * W / global_counts[mask])
        return loss

    def evaluate(self, model: torch.nn.Module, split: str, max_batches: int) -> dict:
        model = cast(MultiwayTransformer, model)  # what build_model made
        return evaluate_masked(model, self.data, self.cfg, split, self.session.device, max_batches=max_batches)

    def metrics(self, report: dict) -> dict:
        return val_metrics(report)

    def summary(self, valid: dict, test: dict) -> dict:
        return {"valid": valid, "test": test}

    def describe(self) -> list[str]:
        text = ", ".join(f"{s} {len(self.data.text[s]):,}" for s in ("train", "valid", "test"))
        images = ", ".join(f"{source.name} {len(source.images):,}" for source in self.data.sources)
        return [
            f"data: {self.data.root}: images {images}; text tokens per split: {text}; tasks {', '.join(self.tasks)}"
        ]

    def state_dict(self) -> dict:
        return {} if self.sampler is None else {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])

    def on_step(self, model: torch.nn.Module, step: int) -> None:
        if step in snapshot_steps(self.cfg.train.max_steps, self.cfg.analysis.snapshots):
            folder = self.run_dir / "routing"
            multiway = cast(MultiwayTransformer, model)  # what build_model made
            save_routing_snapshot(
                multiway, self.data, self.cfg, step, folder, self.session.device, self.session.is_main
            )


def _save_tokenizers(data: MultimodalData, run_dir: Path) -> None:
    """The run's text tokenizer and visual-token codebook, kept in the run folder (once)."""
    if not (run_dir / "tokenizer.json").exists():
        data.tokenizer.save(run_dir / "tokenizer.json")
    if not (run_dir / "visual_tokens.npz").exists():
        data.visual.save(run_dir / "visual_tokens.npz")


def train_masked(
    cfg: MaskedRunConfig, run_dir: Path, progress: bool = True, data: MultimodalData | None = None
) -> RunResult:
    """Train (or resume) the run in run_dir to cfg.train.max_steps, then evaluate on held-out valid and test.

    data: prepared data to reuse (a reproduction prepares it once); else prepared here and saved in the run."""
    validate_masked(cfg)
    return train_loop(cfg, run_dir, lambda session: MaskedTask(cfg, run_dir, session, progress, data), progress)


def val_metrics(report: dict) -> dict:
    """The validation fields of metrics.jsonl: the headline loss and perplexity, then every part's."""
    loss, ppl = headline(report)
    record = {"val_loss": loss, "val_ppl": ppl}
    for name, values in report.items():
        record[f"val_{name}_loss"] = values["loss"]
        if "patch" in name:
            record[f"val_{name}_acc"] = values["acc"]
    return record
