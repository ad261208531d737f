"""MHMoE: Multi-Head Mixture-of-Experts (Wu et al. 2024, "v1"; Huang et al. 2024, "v2").

Shape legend: T tokens, D model dim, H heads, d = D/H, S = T·H sub-tokens.

    x_TD ── multi-head layer (D×D) ── split into H sub-tokens ── SparseMoE over (S, d) ──
         ── [+ sub-token residual, v1 Eq. 6 form] ── merge H sub-tokens ── merge layer (D×D) ── y_TD

Paper vs. the authors' code (docs/paper-notes.md §2.7), both offered:
- residual="outer" (default, the authors' code): the layer adds no residual; the surrounding
  pre-norm block computes x + MHMoE(norm(x)).
- residual="subtoken" (v1 Eq. 6): o_ij = x̂_ij + Σ_k g·f(x̂_ij) inside sub-token space, before
  merging; the block's own residual is still the block's business.
Ablations (v1 Table 6/7): multi_head_layers / merge_layers = 0 removes the layer (Identity), n > 1
stacks n D×D linear layers with ReLU between.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import Tensor, nn

from mhmoe.layers.config import MoEConfig, Residual
from mhmoe.layers.experts import check_positive
from mhmoe.layers.moe import (
    MoELayer,
    MoEOutput,
    SparseMoE,
    check_input,
    check_token_mask,
    layer_config,
    mask_padding,
)


def projection(d_model: int, num_layers: int, gain: float, zero_bias: bool) -> nn.Module:
    """num_layers D×D linear layers with ReLU between (Identity for 0), xavier-uniform with `gain`."""
    if num_layers == 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    for i in range(num_layers):
        linear = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(linear.weight, gain=gain)
        if zero_bias:
            nn.init.zeros_(linear.bias)
        layers += [linear] if i == 0 else [nn.ReLU(), linear]
    return layers[0] if num_layers == 1 else nn.Sequential(*layers)


def _per_sequence(x: Tensor, num_heads: int, h_Sd: Tensor, valid_S: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Sub-tokens (and mask) laid out (..., L·H, d) for an input (..., L, D), so that a sequence's sub-tokens
    stay one sequence for the inner layer (its token_group="sequence")."""
    shape = (*x.shape[:-2], (x.shape[-2] if x.dim() >= 2 else 1) * num_heads)
    return h_Sd.view(*shape, h_Sd.shape[-1]), None if valid_S is None else valid_S.view(shape)


class MHMoE(MoELayer):
    """Multi-head MoE over the last dimension of its input: MHMoE(config, d_model=D), or the keyword form
    MHMoE(d_model=D, num_heads=H, num_experts=E, top_k=K, expert_hidden=F, ...) (`MoEConfig`'s fields).

    The config's routed part applies to the inner `moe`, a SparseMoE of width d = d_model // num_heads;
    num_heads must divide d_model. With router="xmoe" in its paper form the routing dim defaults to
    16 // H (v1), at least 1; set the router's dim=16 for the authors'-code choice.

    forward(x, token_mask=None) -> MoEOutput with y of x's shape; `stats` count sub-tokens and
    `stats.top_experts` is (T·H, K), sub-token j of token i in row i·H + j.
    """

    def __init__(self, config: MoEConfig | None = None, *, d_model: int, **options: Any):
        super().__init__()
        if config is None and "num_heads" not in options:
            raise TypeError("MHMoE needs num_heads (the sub-tokens per token)")
        config, router = layer_config(config, options, "MHMoE")
        options = {"router": router} if router is not None else {}
        check_positive(d_model=d_model)
        if d_model % config.num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({config.num_heads})")
        self.d_model, self.config = d_model, config
        self.head_dim = d_model // config.num_heads
        # v1 init: head layer xavier-uniform with gain 1/√2 and PyTorch's default bias; merge layer gain 1, bias 0.
        self.multi_head_layer = projection(d_model, config.multi_head_layers, gain=1 / math.sqrt(2), zero_bias=False)
        self.moe = SparseMoE(config.subtoken(), d_model=self.head_dim, **options)
        self.merge_layer = projection(d_model, config.merge_layers, gain=1.0, zero_bias=True)

    @property
    def routed(self) -> SparseMoE:
        return self.moe

    @property
    def residual(self) -> Residual:
        return self.config.residual

    @residual.setter
    def residual(self, value: Residual) -> None:
        self.config = dataclasses.replace(self.config, residual=value)

    @property
    def multi_head_layers(self) -> int:
        return self.config.multi_head_layers

    @property
    def merge_layers(self) -> int:
        return self.config.merge_layers

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        check_input(x, self.d_model, "MHMoE", next(self.moe.experts.parameters()))
        valid_T = check_token_mask(token_mask, x)
        x_TD = x.reshape(-1, self.d_model) if valid_T is None else mask_padding(x.reshape(-1, self.d_model), valid_T)
        h_TD = self.multi_head_layer(x_TD)  # 1. multi-head layer
        h_Sd = h_TD.reshape(-1, self.head_dim)  # 2. split: sub-token j of token i is row i·H + j
        valid_S = None if valid_T is None else valid_T.repeat_interleave(self.num_heads)
        routed = self.moe(
            *_per_sequence(x, self.num_heads, h_Sd, valid_S)
        )  # 3-4. route each sub-token, run its experts
        o_Sd = routed.y.reshape(h_Sd.shape)
        o_Sd = o_Sd + h_Sd if self.residual == "subtoken" else o_Sd
        y_TD = self.merge_layer(o_Sd.reshape(-1, self.d_model))  # 5-6. merge, merge layer
        return MoEOutput(y_TD.view(x.shape), routed.aux_loss, routed.stats)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, residual={self.residual!r}"
