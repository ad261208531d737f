"""A GPT-style decoder whose FFNs are Dense, SparseMoE or MHMoE.

Shape legend: B batch, L sequence length, D model dim, V vocabulary, nh attention heads, hs = D/nh.
Pre-norm blocks (RMSNorm), rotary positions, PyTorch's scaled-dot-product attention. MoE layers
replace the FFN of every `moe_every`-th block (blocks 2, 4, … of PAPER.md §2.8 by default).
The model returns logits, the task loss and the summed auxiliary loss of its MoE layers; it knows
nothing about optimisers, logging or devices beyond what it is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhmoe.accounting import Cost, layer_cost
from mhmoe.layers.experts import DenseFFN
from mhmoe.layers.moe import MoEStats, SparseMoE
from mhmoe.layers.multihead import MHMoE


@dataclass
class FFNConfig:
    kind: str = "dense"  # "dense", "smoe" or "mhmoe": what replaces the FFN of the MoE blocks
    hidden: int = 1024  # hidden width of dense FFNs (the dense model, and the non-MoE blocks)
    activation: str = "gelu"  # gelu, relu or swiglu, for dense FFNs and experts
    moe_every: int = 2  # MoE in blocks moe_every, 2·moe_every, … (1-based); 1 = every block
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 1024
    num_heads: int = 4  # MH-MoE heads H (independent of attention heads); mhmoe only
    router: str = "softmax"  # softmax, switch, xmoe or sigmoid
    router_form: str = "paper"  # X-MoE form: "paper" or "code"
    capacity_factor: float = 0.0  # 0 = dropless
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    num_shared_experts: int = 0
    multi_head_layers: int = 1  # mhmoe only
    merge_layers: int = 1  # mhmoe only
    residual: str = "outer"  # mhmoe only: "outer" (authors' code) or "subtoken" (v1 Eq. 6)

    def moe_layer(self, d_model: int) -> tuple[str, dict]:
        """(kind, constructor kwargs) of the MoE layer, the form `mhmoe.accounting` counts."""
        kwargs: dict = dict(
            d_model=d_model,
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_hidden=self.expert_hidden,
            activation=self.activation,
            router=self.router,
            router_kwargs={"form": self.router_form} if self.router == "xmoe" else None,
            capacity_factor=self.capacity_factor or None,
            balance_loss_coef=self.balance_loss_coef,
            z_loss_coef=self.z_loss_coef,
            num_shared_experts=self.num_shared_experts,
        )
        if self.kind == "mhmoe":
            kwargs.update(
                num_heads=self.num_heads,
                multi_head_layers=self.multi_head_layers,
                merge_layers=self.merge_layers,
                residual=self.residual,
            )
        return self.kind, kwargs

    def dense_layer(self, d_model: int) -> tuple[str, dict]:
        return "dense", dict(d_model=d_model, hidden=self.hidden, activation=self.activation)


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    seq_len: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # attention heads
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    ffn: FFNConfig = field(default_factory=FFNConfig)

    def block_ffns(self) -> list[tuple[str, dict]]:
        """(kind, kwargs) of each block's FFN."""
        moe = self.ffn.kind != "dense"
        return [
            self.ffn.moe_layer(self.d_model)
            if moe and (i + 1) % self.ffn.moe_every == 0
            else self.ffn.dense_layer(self.d_model)
            for i in range(self.n_layers)
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        return cls(**{**data, "ffn": FFNConfig(**data.get("ffn", {}))})


class GPTOutput(NamedTuple):
    logits: Tensor  # (B, L, V)
    loss: Tensor | None  # () mean cross-entropy over target tokens, when targets are given
    aux_loss: Tensor  # () summed weighted auxiliary losses of the MoE layers
    routing: list[MoEStats]  # per MoE layer, in block order


def rotary_tables(seq_len: int, head_size: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, L, hs); rotate pairs (x1, x2) of the two halves by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with optional rotary positions; causal (decoder) or bidirectional (encoder)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model ({d_model}) / n_heads ({n_heads}) must be an even integer for RoPE")
        self.n_heads, self.dropout, self.causal = n_heads, dropout, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """x: (B, L, D); cos, sin: rotary tables (>= L rows) or None for no rotary; attn_mask: SDPA mask
        (bool, True = attend), only for bidirectional attention (e.g. to hide padding)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs)
        if cos is not None and sin is not None:
            q, k = apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:L], sin[:L])
        if attn_mask is not None and self.causal:
            raise ValueError("attn_mask is only supported for bidirectional attention (causal=False)")
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


LAYERS = {"dense": DenseFFN, "smoe": SparseMoE, "mhmoe": MHMoE}


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, ffn: tuple[str, dict]):
        super().__init__()
        kind, kwargs = ffn
        self.norm_attn, self.norm_ffn = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = LAYERS[kind](**kwargs)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor | None, MoEStats | None]:
        x = x + self.drop(self.attn(self.norm_attn(x), cos, sin))
        out = self.ffn(self.norm_ffn(x))
        if isinstance(out, Tensor):
            return x + self.drop(out), None, None
        return x + self.drop(out.y), out.aux_loss, out.stats


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, ffn) for ffn in cfg.block_ffns())
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)
        cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> GPTOutput:
        """idx, targets: (B, L) int64 token ids, L <= seq_len."""
        if idx.dim() != 2 or idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"GPT expects (batch, length <= {self.cfg.seq_len}) token ids, got {tuple(idx.shape)}")
        x = self.embed(idx)  # (B, L, D)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        routing: list[MoEStats] = []
        for block in self.blocks:
            x, aux, stats = block(x, self.rope_cos, self.rope_sin)
            if stats is not None:
                aux_loss = aux_loss + aux
                routing.append(stats)
        logits = self.lm_head(self.norm(x))  # (B, L, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return GPTOutput(logits, loss, aux_loss, routing)

    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, (SparseMoE, MHMoE))]


def gpt_cost(cfg: GPTConfig) -> Cost:
    """Exact parameters and forward FLOPs per token of a GPT (see `mhmoe.accounting` conventions).

    Attention FLOPs count the projections and 2·2·L·D for scores and values (no causal discount).
    """
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.seq_len
    embed = V * D * (1 if cfg.tie_embeddings else 2)
    per_block = 4 * D * D + 2 * D  # attention projections + two norms
    total = active = embed + cfg.n_layers * per_block + D
    flops = 2 * D * V + cfg.n_layers * (2 * 4 * D * D + 4 * L * D)
    for kind, kwargs in cfg.block_ffns():
        cost = layer_cost(kind, kwargs)
        total, active, flops = total + cost.params_total, active + cost.params_active, flops + cost.flops_per_token
    return Cost(total, active, flops)
