"""MHMoE: Multi-Head Mixture-of-Experts (Wu et al. 2024, "v1"; Huang et al. 2024, "v2").

Shape legend: T tokens, D model dim, L latent width (D unless `latent_dim`), H heads, d = L/H, S = T·H sub-tokens.

    x_TD ── multi-head layer (D×L) ── split into H sub-tokens ── SparseMoE over (S, d) ──
         ── [+ sub-token residual, v1 Eq. 6 form] ── merge H sub-tokens ── merge layer (L×D) ── y_TD

The family (docs/family.md): with `latent_dim` L < D this is the Multi-Head LatentMoE layer of arXiv 2602.04870 and,
with `per_head_experts`, each head routes among a pool of its own experts by a router of its own (the inner SparseMoE
then holds H·E experts and a `HeadRouters`); MH-MoE is the member with L = D and one router and pool for all heads.

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
from typing import Any, Protocol

from torch import Tensor, nn

from mhmoe.layers.config import MoEConfig, Residual
from mhmoe.layers.experts import check_positive, integer
from mhmoe.layers.moe import (
    MoELayer,
    MoEOutput,
    SparseMoE,
    check_input,
    check_token_mask,
    layer_config,
    mask_padding,
)
from mhmoe.layers.routers import HeadRouters, make_router


def projection(d_in: int, d_out: int, num_layers: int, gain: float, zero_bias: bool) -> nn.Module:
    """num_layers linear layers, the first d_in -> d_out and the rest d_out -> d_out, with ReLU between (Identity for
    0, which needs d_in = d_out), xavier-uniform with `gain`."""
    if num_layers == 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    for i in range(num_layers):
        linear = nn.Linear(d_in if i == 0 else d_out, d_out)
        nn.init.xavier_uniform_(linear.weight, gain=gain)
        if zero_bias:
            nn.init.zeros_(linear.bias)
        layers += [linear] if i == 0 else [nn.ReLU(), linear]
    return layers[0] if num_layers == 1 else nn.Sequential(*layers)


class HeadRunner(Protocol):
    """Runs the inner SparseMoE on sub-tokens h_Sd (row i·H + j), their mask and the tokens per sequence."""

    def __call__(self, moe: SparseMoE, h_Sd: Tensor, valid_S: Tensor | None, sequence_length: int) -> MoEOutput: ...


def _per_sequence(x: Tensor, num_heads: int, h_Sd: Tensor, valid_S: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Sub-tokens (and mask) laid out (..., L·H, d) for an input (..., L, D), so that a sequence's sub-tokens
    stay one sequence for the inner layer (its token_group="sequence")."""
    shape = (*x.shape[:-2], (x.shape[-2] if x.dim() >= 2 else 1) * num_heads)
    return h_Sd.view(*shape, h_Sd.shape[-1]), None if valid_S is None else valid_S.view(shape)


class MHMoE(MoELayer):
    """Multi-head MoE over the last dimension of its input: MHMoE(config, d_model=D), or the keyword form
    MHMoE(d_model=D, num_heads=H, num_experts=E, top_k=K, expert_hidden=F, ...) (`MoEConfig`'s fields).

    The config's routed part applies to the inner `moe`, a SparseMoE of width d = L // num_heads, L the latent
    width (`latent_dim`, d_model by default); num_heads must divide L. With `per_head_experts` the inner layer has
    H·E experts, E per head, and a router per head (`HeadRouters`). With router="xmoe" in its paper form the routing dim defaults to
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
        d_model = integer(d_model)
        check_positive(d_model=d_model)
        latent = config.latent_dim or d_model
        if latent % config.num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({config.num_heads})")
        if latent != d_model and 0 in (config.multi_head_layers, config.merge_layers):
            raise ValueError(
                f"latent_dim ({latent}) differs from d_model ({d_model}), so the multi-head and merge layers map "
                f"between them and cannot be removed; set multi_head_layers and merge_layers >= 1"
            )
        self.d_model, self.latent_dim, self.config = d_model, latent, config
        self.head_dim = latent // config.num_heads
        sub = config.subtoken()
        if config.per_head_experts:
            if options:
                raise ValueError("per_head_experts builds a router per head from the config's router; pass no Router")
            routers = [
                make_router(sub.router, d_model=self.head_dim, num_experts=config.num_experts, top_k=config.top_k)
                for _ in range(config.num_heads)
            ]
            options = {"router": HeadRouters(routers)}
        # v1 init: head layer xavier-uniform with gain 1/√2 and PyTorch's default bias; merge layer gain 1, bias 0.
        self.multi_head_layer = projection(
            d_model, latent, config.multi_head_layers, gain=1 / math.sqrt(2), zero_bias=False
        )
        self.moe = SparseMoE(sub, d_model=self.head_dim, **options)
        self.merge_layer = projection(latent, d_model, config.merge_layers, gain=1.0, zero_bias=True)
        # Extension point for head parallelism (mhmoe.parallel.head): runs the inner layer on the ranks holding
        # the sub-tokens' heads. A plain attribute, not state.
        self.head_runner: HeadRunner | None = None

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
        h_TL = self.multi_head_layer(x_TD)  # 1. multi-head layer
        h_Sd = h_TL.reshape(-1, self.head_dim)  # 2. split: sub-token j of token i is row i·H + j
        valid_S = None if valid_T is None else valid_T.repeat_interleave(self.num_heads)
        if self.head_runner is None:  # 3-4. route each sub-token, run its experts
            routed = self.moe(*_per_sequence(x, self.num_heads, h_Sd, valid_S))
        else:  # on the ranks holding their heads
            routed = self.head_runner(self.moe, h_Sd, valid_S, x.shape[-2] if x.dim() >= 2 else 1)
        o_Sd = routed.y.reshape(h_Sd.shape)
        o_Sd = o_Sd + h_Sd if self.residual == "subtoken" else o_Sd
        y_TD = self.merge_layer(o_Sd.reshape(-1, self.latent_dim))  # 5-6. merge, merge layer
        return MoEOutput(y_TD.view(x.shape), routed.aux_loss, routed.stats)

    def extra_repr(self) -> str:
        family = f", latent_dim={self.latent_dim}" if self.latent_dim != self.d_model else ""
        family += ", per_head_experts=True" if self.config.per_head_experts else ""
        return f"num_heads={self.num_heads}, residual={self.residual!r}{family}"
