"""MHMoE: Multi-Head Mixture-of-Experts (Wu et al. 2024, "v1"; Huang et al. 2024, "v2").

Shape legend: T tokens, D model dim, H heads, d = D/H, S = T·H sub-tokens.

    x_TD ── multi-head layer (D×D) ── split into H sub-tokens ── SparseMoE over (S, d) ──
         ── [+ sub-token residual, v1 Eq. 6 form] ── merge H sub-tokens ── merge layer (D×D) ── y_TD

Paper vs. the authors' code (PAPER.md §2.7), both offered:
- residual="outer" (default, the authors' code): the layer adds no residual; the surrounding
  pre-norm block computes x + MHMoE(norm(x)).
- residual="subtoken" (v1 Eq. 6): o_ij = x̂_ij + Σ_k g·f(x̂_ij) inside sub-token space, before
  merging; the block's own residual is still the block's business.
Ablations (v1 Table 6/7): multi_head_layers / merge_layers = 0 removes the layer (Identity), n > 1
stacks n D×D linear layers with ReLU between.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from mhmoe.layers.dispatch import DispatchName
from mhmoe.layers.experts import Activation, check_positive
from mhmoe.layers.moe import MoEOutput, SparseMoE, check_input, check_token_mask
from mhmoe.layers.routers import Router, RouterName

RESIDUALS = ("outer", "subtoken")


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


def subtoken_router_kwargs(router: object, router_kwargs: dict | None, num_heads: int) -> dict:
    """X-MoE in its paper form routes in 16 // H dims inside MH-MoE (v1 §3); other routers unchanged."""
    router_kwargs = dict(router_kwargs or {})
    if router == "xmoe" and router_kwargs.get("form", "paper") == "paper":
        router_kwargs.setdefault("dim", max(1, 16 // num_heads))
    return router_kwargs


class MHMoE(nn.Module):
    """Multi-head MoE over the last dimension of its input; the SparseMoE arguments pass through.

    Args (beyond `SparseMoE`'s, which apply to the inner `moe` of width d_model // num_heads):
        num_heads: H sub-tokens per token (independent of attention heads); must divide d_model.
        multi_head_layers, merge_layers: depth of the D×D head and merge layers (0 removes one).
        residual: "outer" (authors' code, default) or "subtoken" (v1 Eq. 6), see the module doc.

    With router="xmoe" in its paper form the routing dim defaults to 16 // H (v1), at least 1;
    pass router_kwargs={"dim": 16} for the authors'-code choice.

    forward(x, token_mask=None) -> MoEOutput with y of x's shape; `stats` count sub-tokens and
    `stats.top_experts` is (T·H, K), sub-token j of token i in row i·H + j.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        activation: Activation = "gelu",
        router: RouterName | Router = "softmax",
        router_kwargs: dict | None = None,
        multi_head_layers: int = 1,
        merge_layers: int = 1,
        residual: str = "outer",
        capacity_factor: float | None = None,
        balance_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        num_shared_experts: int = 0,
        shared_expert_hidden: int | None = None,
        dispatch: DispatchName = "auto",
        recompute: bool = False,
    ):
        super().__init__()
        check_positive(d_model=d_model, num_heads=num_heads)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        for name, n in (("multi_head_layers", multi_head_layers), ("merge_layers", merge_layers)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
        if residual not in RESIDUALS:
            raise ValueError(f"unknown residual {residual!r}; choose one of {RESIDUALS}")
        router_kwargs = subtoken_router_kwargs(router, router_kwargs, num_heads)
        self.d_model, self.num_heads, self.head_dim, self.residual = d_model, num_heads, d_model // num_heads, residual
        self.multi_head_layers, self.merge_layers = multi_head_layers, merge_layers
        # v1 init: head layer xavier-uniform with gain 1/√2 and PyTorch's default bias; merge layer gain 1, bias 0.
        self.multi_head_layer = projection(d_model, multi_head_layers, gain=1 / math.sqrt(2), zero_bias=False)
        self.moe = SparseMoE(
            d_model=self.head_dim,
            num_experts=num_experts,
            top_k=top_k,
            expert_hidden=expert_hidden,
            activation=activation,
            router=router,
            router_kwargs=router_kwargs,
            capacity_factor=capacity_factor,
            balance_loss_coef=balance_loss_coef,
            z_loss_coef=z_loss_coef,
            num_shared_experts=num_shared_experts,
            shared_expert_hidden=shared_expert_hidden,
            dispatch=dispatch,
            recompute=recompute,
        )
        self.merge_layer = projection(d_model, merge_layers, gain=1.0, zero_bias=True)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        check_input(x, self.d_model, "MHMoE")
        valid_T = check_token_mask(token_mask, x)
        h_TD = self.multi_head_layer(x.reshape(-1, self.d_model))  # 1. multi-head layer
        h_Sd = h_TD.reshape(-1, self.head_dim)  # 2. split: sub-token j of token i is row i·H + j
        valid_S = None if valid_T is None else valid_T.repeat_interleave(self.num_heads)
        routed = self.moe(h_Sd, valid_S)  # 3-4. route each sub-token, run its experts
        o_Sd = routed.y + h_Sd if self.residual == "subtoken" else routed.y
        y_TD = self.merge_layer(o_Sd.reshape(-1, self.d_model))  # 5-6. merge, merge layer
        return MoEOutput(y_TD.view(x.shape), routed.aux_loss, routed.stats)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def top_k(self) -> int:
        return self.moe.top_k

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, residual={self.residual!r}"
