"""A GPT-style decoder whose FFNs are Dense, SparseMoE or MHMoE.

Shape legend: B batch, L sequence length (new tokens), P cached positions, S = P + L key positions,
D model dim, V vocabulary, nh attention heads, hs = D/nh.
Pre-norm blocks (RMSNorm), rotary positions, PyTorch's scaled-dot-product attention. MoE layers
replace the FFN of every `moe_every`-th block (blocks 2, 4, … by default; `mhmoe.models.ffn`).
The model returns logits, the task loss and the summed auxiliary loss of its MoE layers; it knows
nothing about optimisers, logging or devices beyond what it is given.

Decoding: pass a `KVCache` (or any object with the `transformers.Cache` methods `update` and
`get_seq_length`, e.g. a `DynamicCache`) to `GPT.forward`: the first call (prefill) fills it, each
later call feeds only the new tokens, which attend to the cached keys at rotary positions P, P+1, ….
Routing is per token, so a cached decode step routes a token exactly as a full forward does, as long
as the MoE layers are dropless (a capacity makes routing depend on the other tokens of the call).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhmoe.layers.moe import MoELayer, MoEStats
from mhmoe.models.cost import Cost, layer_cost
from mhmoe.models.ffn import FFNConfig, LayerSpec, block_ffns


@dataclass
class GPTConfig:
    """The decoder's sizes and its FFNs (`ffn`, an `FFNConfig`); `mhmoe train` writes it as `model` in config.json."""

    vocab_size: int = 8192  # token ids 0..V-1 (a run sets it from its tokenizer)
    seq_len: int = 256  # context length L of training windows and of generation
    d_model: int = 256  # model width D
    n_layers: int = 4  # decoder blocks
    n_heads: int = 4  # attention heads
    dropout: float = 0.0  # on attention and block outputs in training
    tie_embeddings: bool = True  # the output layer shares the token embedding matrix
    rope_base: float = 10000.0  # base of the rotary position frequencies
    ffn: FFNConfig = field(default_factory=FFNConfig)

    def block_ffns(self) -> list[LayerSpec]:
        """The FFN layer of each block."""
        return block_ffns(self.ffn, self.d_model, self.n_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        return cls(**{**data, "ffn": FFNConfig.from_dict(data.get("ffn", {}))})


class GPTOutput(NamedTuple):
    """What `GPT.forward` returns."""

    logits: Tensor  # (B, L, V)
    loss: Tensor | None  # () mean cross-entropy over target tokens, when targets are given
    aux_loss: Tensor  # () summed weighted auxiliary losses of the MoE layers
    routing: list[MoEStats]  # per MoE layer, in block order


def rotary_tables(seq_len: int, head_size: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, L, hs); cos, sin: (L, hs/2) or per-sequence (B, 1, L, hs/2).
    Rotate pairs (x1, x2) of the two halves by position-dependent angles."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # float32 or wider
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class Cache(Protocol):
    """What attention needs of a KV cache: the two methods of `transformers.Cache` it calls."""

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs: dict | None = None):
        """Append (B, nh, L, hs) keys and values of block `layer_idx`; return all of them, (B, nh, S, hs)."""
        ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVCache:
    """A growing per-block list of keys and values (B, nh, S, hs): `transformers.DynamicCache`'s surface, no
    dependency. Greedy decoding with it gives the tokens of recomputing the whole prefix (tests/test_hf.py)."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[Tensor, Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key_states)
            self.values.append(value_states)
        elif layer_idx < len(self.keys):
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        else:
            raise ValueError(f"KVCache filled for {len(self.keys)} blocks, got block {layer_idx}: blocks run in order")
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0


AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]
"""What `Attention` calls to mix values, with the signature of transformers' attention interface (so any of its
functions plugs in: `mhmoe.hf` passes `ALL_ATTENTION_FUNCTIONS[attn_implementation]`):
fn(module, query, key, value, attention_mask, *, dropout, scaling, **kwargs) -> (output (B, L, nh, hs),
weights (B, nh, L, S) or None); query (B, nh, L, hs), key and value (B, nh, S, hs); the module's `is_causal`,
`layer_idx`, `num_key_value_groups` and `scaling` are the attributes such functions read."""


def sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """PyTorch's scaled-dot-product attention. attention_mask: bool (True = attend) or additive float, broadcastable
    to (B, nh, L, S); None with a causal module means SDPA's own causal mask (queries and keys at the same
    positions). The default `AttentionFunction` of `GPT`."""
    is_causal = bool(getattr(module, "is_causal", False)) and attention_mask is None and query.shape[-2] > 1
    y = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )
    return y.transpose(1, 2), None  # (B, L, nh, hs)


def eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """softmax(q·kᵀ·scaling + mask)·v written out, returning the attention weights (B, nh, L, S) too; the masks
    of `sdpa_attention`. transformers' "eager" implementation for `mhmoe.hf` (output_attentions)."""
    L, S = query.shape[-2], key.shape[-2]
    scores = (query @ key.transpose(-2, -1)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is None and getattr(module, "is_causal", False) and L > 1:
        attention_mask = torch.arange(S, device=query.device) <= torch.arange(S - L, S, device=query.device)[:, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2), weights


def causal_mask(L: int, P: int, key_mask: Tensor | None, device: torch.device) -> Tensor | None:
    """The bool mask (True = attend) of L new queries at positions P .. P+L-1 over S = P + L keys, combined with
    key_mask (B, 1, 1, S) (False = padding): (1 or B, 1, L, S); None when SDPA's own causal mask is exact (no
    padding, no cached keys). The diagonal stays open so that a padding query (all of whose keys are hidden) gets
    a finite output."""
    if key_mask is None and P == 0:
        return None
    query_L1 = torch.arange(P, P + L, device=device).unsqueeze(-1)
    key_S = torch.arange(P + L, device=device)
    mask_LS = key_S <= query_L1
    return mask_LS if key_mask is None else (mask_LS & key_mask) | (key_S == query_L1)


class Attention(nn.Module):
    """Multi-head self-attention with optional rotary positions; causal (decoder) or bidirectional (encoder).
    The mixing of values is an `AttentionFunction` (default `sdpa_attention`), given per call."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True, layer_idx: int = 0):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model ({d_model}) / n_heads ({n_heads}) must be an even integer for RoPE")
        self.n_heads, self.dropout, self.is_causal = n_heads, dropout, causal
        self.head_dim = d_model // n_heads
        self.scaling = 1.0 / math.sqrt(self.head_dim)  # SDPA's own default, to the bit
        self.layer_idx = layer_idx  # this block's entry in a KV cache
        self.num_key_value_groups = 1  # no grouped-query attention (read by transformers' attention functions)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None = None,
        sin: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: Cache | None = None,
        attention_fn: AttentionFunction | None = None,
        **attn_kwargs: Any,
    ) -> Tensor:
        """x: (B, L, D); cos, sin: rotary tables ((>= L, hs/2): rows 0.. are the new tokens' positions; or
        (B, 1, L, hs/2) per sequence) or None for no rotary; attn_mask: the mask `attention_fn` takes (for
        `sdpa_attention`: bool, True = attend, broadcastable to (B, nh, L, S); `causal_mask` makes it), None =
        causal without padding (or all keys, for an encoder). cache: keys/values of earlier positions (decoder
        only), updated in place at block `layer_idx`. attn_kwargs go to attention_fn."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs)
        if cos is not None and sin is not None:
            if cos.dim() == 2:
                cos, sin = cos[:L], sin[:L]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if not self.is_causal:
                raise ValueError("a KV cache is only supported for causal attention")
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        mix = attention_fn or sdpa_attention
        dropout = self.dropout if self.training else 0.0
        y, _ = mix(self, q, k, v, attn_mask, dropout=dropout, scaling=self.scaling, **attn_kwargs)  # (B, L, nh, hs)
        return self.proj(y.reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, ffn: LayerSpec, layer_idx: int = 0):
        super().__init__()
        self.norm_attn, self.norm_ffn = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, layer_idx=layer_idx)
        self.ffn = ffn.build()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        cache: Cache | None = None,
        token_mask: Tensor | None = None,
        attention_fn: AttentionFunction | None = None,
        **attn_kwargs: Any,
    ) -> tuple[Tensor, Tensor | None, MoEStats | None]:
        """x: (B, L, D); token_mask: (B, L) bool, False = padding, which MoE layers do not route.
        Returns (x, the MoE layer's aux loss, its MoEStats), the last two None for a dense FFN."""
        x = x + self.drop(self.attn(self.norm_attn(x), cos, sin, attn_mask, cache, attention_fn, **attn_kwargs))
        h = self.norm_ffn(x)
        if not isinstance(self.ffn, MoELayer):
            return x + self.drop(self.ffn(h)), None, None
        out = self.ffn(h, token_mask)
        return x + self.drop(out.y), out.aux_loss, out.stats


def rotary_inputs(
    rope_cos: Tensor, rope_sin: Tensor, P: int, L: int, attention_mask: Tensor | None, position_ids: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(cos, sin, position_ids) for L new tokens after P cached ones: the table rows P .. P+L-1 without padding
    or position_ids; per-sequence rows (B, 1, L, hs/2) at position_ids, which default, with a 2D attention_mask
    (B, P + L), to the count of real tokens before each one (left padding then does not shift positions)."""
    if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, P:]
    if position_ids is None:
        return rope_cos[P : P + L], rope_sin[P : P + L], None
    return rope_cos[position_ids].unsqueeze(1), rope_sin[position_ids].unsqueeze(1), position_ids


class GPT(nn.Module):
    """The decoder: GPT(GPTConfig(...)); `cfg.ffn` says which blocks get a Dense FFN, a SparseMoE or an MHMoE.

    forward(idx, targets=None, *, cache=None, attention_mask=None, position_ids=None) -> GPTOutput (logits, the
    task loss, the summed auxiliary loss of the MoE layers, each layer's routing); `generate` samples tokens;
    `moe_layers()` lists the MoE layers.
    """

    rope_cos: Tensor  # (seq_len, hs/2) rotary tables, buffers
    rope_sin: Tensor

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, ffn, i) for i, ffn in enumerate(cfg.block_ffns()))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)
        cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> GPTOutput:
        """idx: (B, L) int64 token ids; targets: (B, L), -100 = ignore.

        cache: keys and values of the P earlier positions (`KVCache`), extended in place by these L tokens.
        attention_mask: (B, P + L), 1/True for real tokens, 0 for padding (e.g. left-padded prompts): padding is
        never attended to and not routed; positions then count real tokens only, unless position_ids (B, L)
        are given. Without either, the tokens sit at positions P .. P + L - 1, which must be < seq_len.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT expects (batch, length) token ids, got shape {tuple(idx.shape)}")
        L, P = idx.shape[1], (cache.get_seq_length() if cache is not None else 0)
        if P + L > self.cfg.seq_len:
            raise ValueError(
                f"GPT expects (batch, length <= {self.cfg.seq_len}) token ids including {P} cached positions, "
                f"got {tuple(idx.shape)}"
            )
        key_mask = token_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (idx.shape[0], P + L):
                raise ValueError(
                    f"attention_mask must have shape {(idx.shape[0], P + L)}, got {tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): broadcast over heads and queries
            token_mask = attention_mask[:, P:].bool()
        cos, sin, _ = rotary_inputs(self.rope_cos, self.rope_sin, P, L, attention_mask, position_ids)
        mask = causal_mask(L, P, key_mask, idx.device)
        x = self.embed(idx)  # (B, L, D)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        routing: list[MoEStats] = []
        for block in self.blocks:
            x, aux, stats = block(x, cos, sin, mask, cache, token_mask)
            if stats is not None:
                aux_loss = aux_loss + aux
                routing.append(stats)
        logits = self.lm_head(self.norm(x))  # (B, L, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return GPTOutput(logits, loss, aux_loss, routing)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue (B, L) prompts by max_new_tokens tokens -> (B, L + max_new_tokens).

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature), over the top_k best if
        given, and over the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling,
        Holtzman et al. 2019) if given. After a row emits eos_id it is padded with eos_id. use_cache=False
        recomputes the whole prefix each step (same tokens, slower). Call `.eval()` first: dropout stays on in
        training mode.

        Past the context (seq_len tokens, prompt included) the window slides, as nanoGPT's sampler does: each next
        token is computed from the last seq_len tokens alone, the window recomputed every step. Dropping the
        oldest entries of the KV cache instead would not give that: from the second block on, the cached keys
        and values of the tokens still in the window were computed while attending to the tokens that left it.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        window = self.cfg.seq_len
        cache = KVCache() if use_cache else None
        tokens, fed = idx, idx
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and tokens.shape[1] <= window:  # the tokens so far fit: only the new ones are fed
                logits = self(fed, cache=cache).logits[:, -1].float()  # (B, V)
            else:  # the last `window` tokens, recomputed
                cache = None
                logits = self(tokens[:, -window:]).logits[:, -1].float()  # (B, V)
            next_id = pick_token(logits, temperature, top_k, generator, top_p)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished.unsqueeze(-1), eos_id)
                finished = finished | (next_id.squeeze(-1) == eos_id)
            tokens = torch.cat([tokens, next_id], dim=1)
            fed = next_id
            if eos_id is not None and bool(finished.all()):
                break
        return tokens


def pick_token(
    logits_BV: Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    top_p: float | None = None,
) -> Tensor:
    """(B, V) logits -> (B, 1) next token ids: argmax when temperature is 0, else a sample (top-k, then top-p)."""
    if not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails every comparison
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        before_BV = probs_BV.cumsum(-1) - probs_BV  # probability of the tokens ranked above each one
        drop_BV = before_BV >= top_p  # the best token always stays (before = 0 < top_p)
        logits_BV = logits_BV.masked_fill(torch.zeros_like(drop_BV).scatter(-1, order_BV, drop_BV), float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)


def gpt_cost(cfg: GPTConfig) -> Cost:
    """Exact parameters and forward FLOPs per token of a GPT (see `mhmoe.models.cost` conventions).

    Attention FLOPs count the projections and 2·2·L·D for scores and values (no causal discount).
    """
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.seq_len
    embed = V * D * (1 if cfg.tie_embeddings else 2)
    per_block = 4 * D * D + 2 * D  # attention projections + two norms
    total = active = embed + cfg.n_layers * per_block + D
    flops = 2 * D * V + cfg.n_layers * (2 * 4 * D * D + 4 * L * D)
    for spec in cfg.block_ffns():
        cost = layer_cost(spec)
        total, active, flops = total + cost.params_total, active + cost.params_active, flops + cost.flops_per_token
    return Cost(total, active, flops)
