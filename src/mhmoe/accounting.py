"""Exact parameter counts and FLOPs per token, and the sized presets of PAPER.md §4 derived from them.

Conventions:
- params_total: every parameter of the layer (equals sum(p.numel()); buffers excluded).
- params_active: parameters one token's computation reads. For SparseMoE: router + K experts +
  shared experts. For MHMoE a token's H sub-tokens reach at most min(E, H·K) distinct experts;
  that upper bound is counted, plus the head and merge layers.
- flops_per_token: forward matmul FLOPs per token, 2 per multiply-add (router, experts, shared
  experts, head and merge layers). Softmax, activations, sorting and copies are not counted;
  a training step costs about 3× this.

The layer functions take the same keyword arguments as the layer constructors, so
`MHMoE(**kw)` and `mhmoe_cost(**kw)` describe one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mhmoe.layers.experts import DenseFFN, glu_factor
from mhmoe.layers.moe import SparseMoE
from mhmoe.layers.multihead import MHMoE, subtoken_router_kwargs
from mhmoe.layers.routers import Router, XMoERouter

# Constructor arguments that change no size. recompute adds backward work, but model FLOPs (and MFU)
# count the model's own FLOPs, not recomputation, by convention.
_COST_FREE = {"capacity_factor", "balance_loss_coef", "z_loss_coef", "dispatch", "residual", "recompute"}


@dataclass(frozen=True)
class Cost:
    params_total: int
    params_active: int
    flops_per_token: int


def _check_cost_free(kwargs: dict) -> None:
    unknown = set(kwargs) - _COST_FREE
    if unknown:
        raise TypeError(f"unexpected layer arguments {sorted(unknown)}")


def _ffn_params(d_model: int, hidden: int, activation: str) -> int:
    return d_model * glu_factor(activation) * hidden + hidden * d_model


def _router_cost(router: str | Router, d_model: int, num_experts: int, router_kwargs: dict | None) -> tuple[int, int]:
    """(params, flops per routed item)."""
    if isinstance(router, Router):
        params = sum(p.numel() for p in router.parameters())
        dim = router.dim if isinstance(router, XMoERouter) else None
    else:
        kwargs = router_kwargs or {}
        dim = kwargs.get("dim", 16) if router == "xmoe" else None
        if dim is None:
            params = num_experts * d_model
        else:
            params = d_model * dim + num_experts * dim + (kwargs.get("form", "paper") == "paper")
    flops = 2 * num_experts * d_model if dim is None else 2 * (d_model * dim + dim * num_experts)
    return params, flops


def dense_cost(*, d_model: int, hidden: int, activation: str = "gelu", bias: bool = False) -> Cost:
    params = _ffn_params(d_model, hidden, activation)
    bias_params = (glu_factor(activation) * hidden + d_model) if bias else 0
    return Cost(params + bias_params, params + bias_params, 2 * params)


def sparse_moe_cost(
    *,
    d_model: int,
    num_experts: int,
    top_k: int,
    expert_hidden: int,
    activation: str = "gelu",
    router: str | Router = "softmax",
    router_kwargs: dict | None = None,
    num_shared_experts: int = 0,
    shared_expert_hidden: int | None = None,
    **cost_free: Any,
) -> Cost:
    _check_cost_free(cost_free)
    router_params, router_flops = _router_cost(router, d_model, num_experts, router_kwargs)
    expert = _ffn_params(d_model, expert_hidden, activation)
    shared = _ffn_params(d_model, num_shared_experts * (shared_expert_hidden or expert_hidden), activation)
    return Cost(
        params_total=router_params + num_experts * expert + shared,
        params_active=router_params + top_k * expert + shared,
        flops_per_token=router_flops + 2 * (top_k * expert + shared),
    )


def mhmoe_cost(
    *,
    d_model: int,
    num_heads: int,
    num_experts: int,
    top_k: int,
    expert_hidden: int,
    activation: str = "gelu",
    router: str | Router = "softmax",
    router_kwargs: dict | None = None,
    multi_head_layers: int = 1,
    merge_layers: int = 1,
    num_shared_experts: int = 0,
    shared_expert_hidden: int | None = None,
    **cost_free: Any,
) -> Cost:
    _check_cost_free(cost_free)
    head_dim = d_model // num_heads
    inner = sparse_moe_cost(
        d_model=head_dim,
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=expert_hidden,
        activation=activation,
        router=router,
        router_kwargs=subtoken_router_kwargs(router, router_kwargs, num_heads),
        num_shared_experts=num_shared_experts,
        shared_expert_hidden=shared_expert_hidden,
    )
    expert = _ffn_params(head_dim, expert_hidden, activation)
    reached = min(num_experts, num_heads * top_k)
    projections = (multi_head_layers + merge_layers) * (d_model * d_model + d_model)
    return Cost(
        params_total=projections + inner.params_total,
        params_active=projections + inner.params_active + (reached - top_k) * expert,
        flops_per_token=2 * (multi_head_layers + merge_layers) * d_model * d_model + num_heads * inner.flops_per_token,
    )


def cost_of(layer: nn.Module) -> Cost:
    """The `Cost` of a built DenseFFN, SparseMoE or MHMoE, from its hyperparameters."""
    if isinstance(layer, DenseFFN):
        return dense_cost(d_model=layer.d_model, hidden=layer.hidden, activation=layer.activation, bias=layer.bias)
    if isinstance(layer, (SparseMoE, MHMoE)):
        moe = layer.moe if isinstance(layer, MHMoE) else layer
        kwargs: dict[str, Any] = dict(
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            expert_hidden=moe.expert_hidden,
            activation=moe.activation,
            router=moe.router,
            num_shared_experts=moe.num_shared_experts,
            shared_expert_hidden=moe.shared_expert_hidden,
        )
        if isinstance(layer, SparseMoE):
            return sparse_moe_cost(d_model=layer.d_model, **kwargs)
        return mhmoe_cost(
            d_model=layer.d_model,
            num_heads=layer.num_heads,
            multi_head_layers=layer.multi_head_layers,
            merge_layers=layer.merge_layers,
            **kwargs,
        )
    raise TypeError(f"cost_of knows DenseFFN, SparseMoE and MHMoE, got {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------
# Presets (PAPER.md §4). A preset is (kind, kwargs) with kind in LAYER_KINDS; sizes are solved
# with the counters above, never typed in, except the baselines' own published sizes.

LAYER_KINDS: dict[str, Callable[..., nn.Module]] = {"dense": DenseFFN, "smoe": SparseMoE, "mhmoe": MHMoE}
COSTS: dict[str, Callable[..., Cost]] = {"dense": dense_cost, "smoe": sparse_moe_cost, "mhmoe": mhmoe_cost}


def layer_cost(kind: str, kwargs: dict) -> Cost:
    return COSTS[kind](**kwargs)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _solve_linear(f: Callable[[int], int], target: int) -> float:
    """x with f(x) = target, for f affine in x (costs are affine in hidden size and expert count)."""
    f0, f1 = f(0), f(1)
    return (target - f0) / (f1 - f0)


def flops_matched_mhmoe(
    smoe: dict, *, num_heads: int, top_k: int, hidden_multiple: int = 64, experts_multiple: int = 8
) -> dict:
    """v2-style MH-MoE: expert hidden chosen for equal FLOPs per token with `smoe`, then the expert
    count raised for roughly equal total parameters (v2 Table 1: H=2 → 40 experts × 768,
    H=3 → 96 × 512 against an 8 × 2048 SwiGLU SMoE at D = 768)."""
    base = sparse_moe_cost(**smoe)
    kw = {k: v for k, v in smoe.items() if k not in ("top_k", "expert_hidden")}
    kw.update(num_heads=num_heads, top_k=top_k)
    for _ in range(3):  # expert count and hidden size depend on each other only through the router
        hidden = _solve_linear(lambda f: mhmoe_cost(**{**kw, "expert_hidden": f}).flops_per_token, base.flops_per_token)
        kw["expert_hidden"] = _round_to(hidden, hidden_multiple)
        experts = _solve_linear(lambda e: mhmoe_cost(**{**kw, "num_experts": e}).params_total, base.params_total)
        kw["num_experts"] = max(_round_to(experts, experts_multiple), top_k)
    return kw


def params_matched_mhmoe(smoe: dict, *, num_heads: int, hidden_multiple: int = 64) -> dict:
    """v1-style MH-MoE: same experts and top-k as `smoe`, expert hidden chosen for equal total
    parameters — so expert FLOPs grow about H-fold (the authors' code hard-codes 11520 at D = 768,
    H = 4; the exact match with head and merge layers counted is what this returns)."""
    base = sparse_moe_cost(**smoe)
    kw = {**smoe, "num_heads": num_heads}
    hidden = _solve_linear(lambda f: mhmoe_cost(**{**kw, "expert_hidden": f}).params_total, base.params_total)
    kw["expert_hidden"] = _round_to(hidden, hidden_multiple)
    return kw


def fine_grained_smoe(smoe: dict, *, granularity: int, hidden_multiple: int = 64) -> dict:
    """E·g experts, top-(K·g), hidden solved for equal FLOPs (v2's 16 × 1024 top-2 at g = 2)."""
    base = sparse_moe_cost(**smoe)
    kw = {**smoe, "num_experts": smoe["num_experts"] * granularity, "top_k": smoe["top_k"] * granularity}
    hidden = _solve_linear(
        lambda f: sparse_moe_cost(**{**kw, "expert_hidden": f}).flops_per_token, base.flops_per_token
    )
    kw["expert_hidden"] = _round_to(hidden, hidden_multiple)
    return kw


V1_XMOE = dict(d_model=768, num_experts=8, top_k=2, expert_hidden=3072, activation="gelu", router="xmoe")
V2_SMOE = dict(d_model=768, num_experts=8, top_k=1, expert_hidden=2048, activation="swiglu", router="softmax")


def presets() -> dict[str, tuple[str, dict]]:
    """Named layer sizes of PAPER.md §4 as (kind, constructor kwargs)."""
    return {
        "v1-dense": ("dense", dict(d_model=768, hidden=3072, activation="gelu")),
        "v1-xmoe-8e": ("smoe", dict(V1_XMOE)),
        "v1-mhmoe-8e-h4": ("mhmoe", params_matched_mhmoe(V1_XMOE, num_heads=4)),
        "v1-xmoe-32e": ("smoe", {**V1_XMOE, "num_experts": 32}),
        "v1-mhmoe-32e-h4": ("mhmoe", params_matched_mhmoe({**V1_XMOE, "num_experts": 32}, num_heads=4)),
        "v2-smoe": ("smoe", dict(V2_SMOE)),
        "v2-fine-grained": ("smoe", fine_grained_smoe(V2_SMOE, granularity=2)),
        "v2-mhmoe-h2": ("mhmoe", flops_matched_mhmoe(V2_SMOE, num_heads=2, top_k=2)),
        "v2-mhmoe-h3": ("mhmoe", flops_matched_mhmoe(V2_SMOE, num_heads=3, top_k=3)),
    }


def build_preset(name: str, **overrides: Any) -> nn.Module:
    table = presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
    kind, kwargs = table[name]
    return LAYER_KINDS[kind](**{**kwargs, **overrides})
