"""A multiway Transformer (BEiT-3, Wang et al. 2023; VLMo): shared self-attention, one FFN per modality.

Shape legend: B batch, S image side, C channels, p patch side, P = (S/p)² patches, Dp = p·p·C, Lt text length,
L = P + Lt the sequence (image patches first, then text, as BEiT-3 lays out image–text pairs), D model dim,
V text vocabulary including [MASK] (its last id), K visual-token codebook size.

    image (B, S, S, C) ── patchify ── linear patch embedding ── [mask token at masked patches] + patch positions ┐
    text  (B, Lt)      ── embedding ([MASK] id at masked tokens) + text positions ───────────────────────────────┤
                                                                                          concatenate (B, L, D)
    every block: x += Attention(norm_m(x))         one attention for both modalities, padding hidden by a mask
                 x += FFN_m(norm_m(x))             m = vision for positions < split, language after (BEiT-3's
                                                   MultiwayWrapper split position); norms are per modality too
    heads: masked text positions -> V logits (tied to the text embedding); masked patches -> K visual-token logits

MoE: `cfg.ffn` (FFNConfig, as in the GPT) makes the FFN of every `moe_every`-th block a SparseMoE or MHMoE, for the
vision and the language FFN alike (two separate expert sets). Learned absolute positions, as BEiT-3. The model
returns losses, the summed auxiliary loss of its MoE layers and per-modality routing; it knows nothing about
optimisers or data loading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhmoe.layers.moe import MoELayer, MoEStats
from mhmoe.models.cost import Cost, layer_cost
from mhmoe.models.ffn import FFNConfig, LayerSpec, block_ffns
from mhmoe.models.gpt import Attention

MODALITIES = ("vision", "language")


@dataclass
class MultiwayConfig:
    vocab_size: int = 4097  # text vocabulary + 1: the last id is [MASK]; derived from the tokenizer in training
    max_text_len: int = 64  # longest text input (text-only windows and captions)
    image_size: int = 32  # S: square RGB images
    patch_size: int = 4  # p: P = (S/p)² patches
    channels: int = 3
    codebook_size: int = 256  # K visual tokens (the masked-image-modelling target)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4  # attention heads
    dropout: float = 0.0
    ffn: FFNConfig = field(default_factory=FFNConfig)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    def block_ffns(self) -> list[LayerSpec]:
        """The FFN layer of each block (each modality gets one of these): the GPT's rule."""
        return block_ffns(self.ffn, self.d_model, self.n_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MultiwayConfig:
        return cls(**{**data, "ffn": FFNConfig.from_dict(data.get("ffn", {}))})


def patchify(images_BSSC: Tensor, patch_size: int) -> Tensor:
    """(B, S, S, C) -> (B, P, p·p·C), patches row by row, pixels within a patch row-major then channel."""
    B, S, W, C = images_BSSC.shape
    if S != W or S % patch_size:
        raise ValueError(f"images must be square with a side divisible by patch_size ({patch_size}), got {S}×{W}")
    g = S // patch_size
    x = images_BSSC.reshape(B, g, patch_size, g, patch_size, C).permute(0, 1, 3, 2, 4, 5)  # (B, g, g, p, p, C)
    return x.reshape(B, g * g, patch_size * patch_size * C)


class ModalityRouting(NamedTuple):
    block: int  # 1-based block number
    modality: str  # "vision" or "language"
    stats: MoEStats  # top_experts rows follow the modality's slice (B, P or Lt) flattened, padding included
    token_mask: Tensor | None  # (B, Lt) bool, False = padding (language only), for `LayerRouting.from_stats`


class MultiwayOutput(NamedTuple):
    hidden: Tensor  # (B, L, D) final states, image patches first
    text_logits: Tensor | None  # (M_t, V) at masked text positions, row-major order
    image_logits: Tensor | None  # (M_i, K) at masked patches
    text_loss: Tensor | None  # () mean cross-entropy over masked text tokens
    image_loss: Tensor | None  # () mean cross-entropy over masked patches (visual-token targets)
    loss: Tensor | None  # text_loss + image_loss (those present), as BEiT-3 adds its MLM and MIM losses
    aux_loss: Tensor  # () summed weighted auxiliary losses of the MoE layers
    routing: list[ModalityRouting]  # per MoE block and present modality


class MultiwayBlock(nn.Module):
    def __init__(self, cfg: MultiwayConfig, ffn: LayerSpec):
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, causal=False)
        self.norm_attn = nn.ModuleDict({m: nn.RMSNorm(cfg.d_model) for m in MODALITIES})
        self.norm_ffn = nn.ModuleDict({m: nn.RMSNorm(cfg.d_model) for m in MODALITIES})
        self.ffn = nn.ModuleDict({m: ffn.build() for m in MODALITIES})
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, split: int, attn_mask: Tensor | None, text_valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None, list[tuple[str, MoEStats, Tensor | None]]]:
        """x: (B, L, D); positions < split are vision, the rest language; text_valid: (B, L - split) or None."""
        x = x + self.drop(self.attn(_per_modality(self.norm_attn, x, split), attn_mask=attn_mask))
        parts, aux, routing = [], None, []
        for modality, part, valid in (("vision", x[:, :split], None), ("language", x[:, split:], text_valid)):
            if part.shape[1] == 0:
                continue
            h = self.norm_ffn[modality](part)
            ffn = self.ffn[modality]
            if isinstance(ffn, MoELayer):
                out = ffn(h, valid)
                parts.append(out.y)
                aux = out.aux_loss if aux is None else aux + out.aux_loss
                routing.append((modality, out.stats, valid))
            else:
                parts.append(ffn(h))
        return x + self.drop(torch.cat(parts, dim=1)), aux, routing


def _per_modality(modules: nn.ModuleDict, x: Tensor, split: int) -> Tensor:
    parts = [modules["vision"](x[:, :split]), modules["language"](x[:, split:])]
    return torch.cat([p for p in parts if p.shape[1]], dim=1)


class MultiwayTransformer(nn.Module):
    def __init__(self, cfg: MultiwayConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size ({cfg.image_size}) must be divisible by patch_size ({cfg.patch_size})")
        if cfg.vocab_size < 2:
            raise ValueError(f"vocab_size ({cfg.vocab_size}) must hold at least one token and [MASK]")
        self.cfg = cfg
        D = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_len, D))
        self.patch_embed = nn.Linear(cfg.patch_dim, D)
        self.patch_pos = nn.Parameter(torch.zeros(cfg.num_patches, D))
        self.patch_mask = nn.Parameter(torch.zeros(D))  # BEiT's learnable [M] embedding for masked patches
        self.blocks = nn.ModuleList(MultiwayBlock(cfg, ffn) for ffn in cfg.block_ffns())
        self.norm = nn.ModuleDict({m: nn.RMSNorm(D) for m in MODALITIES})
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.vision_head = nn.Linear(D, cfg.codebook_size)
        for p in (self.embed.weight, self.text_pos, self.patch_pos, self.patch_mask):
            nn.init.normal_(p, std=0.02)

    def forward(
        self,
        images: Tensor | None = None,
        text: Tensor | None = None,
        text_valid: Tensor | None = None,
        image_mask: Tensor | None = None,
        text_mask: Tensor | None = None,
        image_targets: Tensor | None = None,
    ) -> MultiwayOutput:
        """images: (B, S, S, C) float (the data pipeline scales pixels to [-1, 1]); text: (B, Lt) int64 ids;
        text_valid: (B, Lt) bool, False = padding; image_mask / text_mask: (B, P) / (B, Lt) bool, True = replace
        by the mask embedding and predict; image_targets: (B, P) int64 visual tokens, needed with image_mask.
        Text targets are the original ids of `text`. Either input may be None (text-only / image-only batches)."""
        B = self._check(images, text, text_valid, image_mask, text_mask, image_targets)
        parts, split = [], 0
        if images is not None:
            patches = self.patch_embed(patchify(images, self.cfg.patch_size))  # (B, P, D)
            if image_mask is not None:
                patches = torch.where(image_mask[..., None], self.patch_mask.to(patches.dtype), patches)
            parts.append(patches + self.patch_pos)
            split = self.cfg.num_patches
        if text is not None:
            ids = text if text_mask is None else text.masked_fill(text_mask, self.cfg.mask_id)
            parts.append(self.embed(ids) + self.text_pos[: text.shape[1]])
        x = torch.cat(parts, dim=1)  # (B, L, D)
        attn_mask = None
        if text_valid is not None and not bool(text_valid.all()):
            keys = torch.cat([text_valid.new_ones(B, split), text_valid], dim=1)
            attn_mask = keys[:, None, None, :]  # (B, 1, 1, L): no position attends to padding
        aux_loss = x.new_zeros((), dtype=torch.float32)
        routing: list[ModalityRouting] = []
        for number, block in enumerate(self.blocks, start=1):
            x, aux, stats = block(x, split, attn_mask, text_valid)
            if aux is not None:
                aux_loss = aux_loss + aux
            routing += [ModalityRouting(number, m, s, v) for m, s, v in stats]
        hidden = _per_modality(self.norm, x, split)
        return self._heads(hidden, split, text, text_mask, image_mask, image_targets, aux_loss, routing)

    def _heads(self, hidden, split, text, text_mask, image_mask, image_targets, aux_loss, routing) -> MultiwayOutput:
        text_logits = image_logits = text_loss = image_loss = None
        if text is not None and text_mask is not None:
            text_logits = self.lm_head(hidden[:, split:][text_mask])  # (M_t, V)
            text_loss = F.cross_entropy(text_logits.float(), text[text_mask])
        if image_mask is not None:
            image_logits = self.vision_head(hidden[:, :split][image_mask])  # (M_i, K)
            image_loss = F.cross_entropy(image_logits.float(), image_targets[image_mask])
        losses = [v for v in (text_loss, image_loss) if v is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return MultiwayOutput(hidden, text_logits, image_logits, text_loss, image_loss, loss, aux_loss, routing)

    def _check(self, images, text, text_valid, image_mask, text_mask, image_targets) -> int:
        cfg = self.cfg
        if images is None and text is None:
            raise ValueError("MultiwayTransformer needs images, text or both; got neither")
        batch = {}
        if images is not None:
            want = (cfg.image_size, cfg.image_size, cfg.channels)
            if images.dim() != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
                raise ValueError(
                    f"images must be float (B, {', '.join(map(str, want))}), got {images.dtype} {tuple(images.shape)}"
                )
            batch["images"] = images.shape[0]
        if text is not None:
            if text.dim() != 2 or text.shape[1] > cfg.max_text_len or text.dtype != torch.long:
                raise ValueError(
                    f"text must be int64 (B, Lt <= {cfg.max_text_len}), got {text.dtype} {tuple(text.shape)}"
                )
            batch["text"] = text.shape[0]
        for name, mask, like, needs in (
            ("text_valid", text_valid, text, "text"),
            ("text_mask", text_mask, text, "text"),
            ("image_mask", image_mask, images, "images"),
        ):
            if mask is None:
                continue
            if like is None:
                raise ValueError(f"{name} given without {needs}")
            shape = (batch[needs], cfg.num_patches) if name == "image_mask" else tuple(text.shape)
            if mask.dtype != torch.bool or tuple(mask.shape) != shape:
                raise ValueError(f"{name} must be bool {shape}, got {mask.dtype} {tuple(mask.shape)}")
        if image_mask is not None and (image_targets is None or tuple(image_targets.shape) != tuple(image_mask.shape)):
            got = None if image_targets is None else tuple(image_targets.shape)
            raise ValueError(f"image_mask needs image_targets of shape {tuple(image_mask.shape)}, got {got}")
        if len(set(batch.values())) > 1:
            raise ValueError(f"images and text must have the same batch size, got {batch}")
        return next(iter(batch.values()))

    def moe_layers(self, modality: str | None = None) -> list[MoELayer]:
        """The MoE FFNs in block order (both modalities, vision first within a block, unless one is named)."""
        names = MODALITIES if modality is None else (modality,)
        ffns = [block.ffn[m] for block in self.blocks for m in names]  # type: ignore[index]  # a ModuleDict
        return [ffn for ffn in ffns if isinstance(ffn, MoELayer)]


def multiway_cost(cfg: MultiwayConfig) -> Cost:
    """Exact parameters and forward FLOPs per token (`mhmoe.models.cost` conventions).

    params_total: every parameter (the [MASK] row and lm_head are one tied matrix). params_active: a token
    reads the shared attention and its own modality's FFNs (the other modality's FFNs and unchosen experts
    are not counted; both embeddings and heads are). flops_per_token: the backbone of one token — attention
    projections, 2·2·L·D for scores and values at the pair length L = P + max_text_len, and one modality's
    FFN; embeddings, per-modality norms and the heads (applied only at masked positions, the same in every
    variant) are not counted.
    """
    D, V, K = cfg.d_model, cfg.vocab_size, cfg.codebook_size
    L = cfg.num_patches + cfg.max_text_len
    embeddings = V * D + cfg.max_text_len * D + (cfg.patch_dim + 1) * D + cfg.num_patches * D + D
    heads = D * K + K + 2 * D  # vision head and the two final norms
    per_block = 4 * D * D + 4 * D  # attention + 2 norms × 2 modalities
    total = embeddings + heads + cfg.n_layers * per_block
    active = total
    flops = cfg.n_layers * (2 * 4 * D * D + 4 * L * D)
    for spec in cfg.block_ffns():
        cost = layer_cost(spec)
        total += 2 * cost.params_total
        active += cost.params_active
        flops += cost.flops_per_token
    return Cost(total, active, flops)
