"""Exact parameter counts and FLOPs per token, and the sized presets of the papers derived from them.

Conventions:
- params_total: every parameter of the layer (equals sum(p.numel()); buffers excluded).
- params_active: parameters one token's computation reads. For SparseMoE: router + K experts +
  shared experts. For MHMoE a token's H sub-tokens reach at most min(E, H·K) distinct experts;
  that upper bound is counted, plus the head and merge layers.
- flops_per_token: forward matmul FLOPs per token, 2 per multiply-add (router, experts, shared
  experts, head and merge layers). Softmax, activations, sorting and copies are not counted;
  a training step costs about 3× this. Recomputation (`recompute=True`) is not the model's own
  work and is not counted either.

The counters read the layers' own configuration (`MoEConfig`, or `LayerSpec` for any FFN), so a
layer and its cost are described once: `cost_of(SparseMoE(cfg, d_model=D)) == sparse_moe_cost(cfg, d_model=D)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import nn

from mhmoe.layers.config import MoEConfig
from mhmoe.layers.experts import DenseFFN
from mhmoe.layers.moe import MoELayer
from mhmoe.layers.multihead import MHMoE
from mhmoe.layers.routers import HeadRouters, Router, RouterConfig, XMoERouter
from mhmoe.models.ffn import LayerSpec
from mhmoe.ops.activations import glu_factor


@dataclass(frozen=True)
class Cost:
    params_total: int
    params_active: int
    flops_per_token: int


def _ffn_params(d_model: int, hidden: int, activation: str) -> int:
    return d_model * glu_factor(activation) * hidden + hidden * d_model


def _expert_params(c: MoEConfig, width: int) -> int:
    """One expert of `c` over items of `width`, biases included (they are read, but cost no matmul FLOPs)."""
    bias = glu_factor(c.activation) * c.expert_hidden + width if c.expert_bias else 0
    return _ffn_params(width, c.expert_hidden, c.activation) + bias


def _config(config: MoEConfig | None, options: dict[str, Any]) -> MoEConfig:
    if config is None:
        return MoEConfig.from_kwargs(**options)
    if options:
        raise TypeError(f"unexpected layer arguments {sorted(options)} beside a MoEConfig")
    return config


def _router_cost(router: RouterConfig | Router, d_model: int, num_experts: int) -> tuple[int, int]:
    """(params, flops per routed item) of a router over items of width d_model."""
    if isinstance(router, Router):
        params = sum(p.numel() for p in router.parameters())
        dim = router.dim if isinstance(router, XMoERouter) else None
    else:
        dim = (router.dim or 16) if router.kind == "xmoe" else None
        if dim is None:
            params = num_experts * d_model
        else:
            params = d_model * dim + num_experts * dim + (router.form == "paper")
    flops = 2 * num_experts * d_model if dim is None else 2 * (d_model * dim + dim * num_experts)
    return params, flops


def dense_cost(*, d_model: int, hidden: int, activation: str = "gelu", bias: bool = False) -> Cost:
    params = _ffn_params(d_model, hidden, activation)
    bias_params = (glu_factor(activation) * hidden + d_model) if bias else 0
    return Cost(params + bias_params, params + bias_params, 2 * params)


def sparse_moe_cost(config: MoEConfig | None = None, *, d_model: int, router: Any = None, **options: Any) -> Cost:
    """The cost of `SparseMoE(config, d_model=d_model)` (or its keyword form). A `Router` object as `router`
    is counted as it is built. With `latent_dim` L (LatentMoE) the experts work at width L and every routed item
    passes the D×L down and L×D up projections once."""
    router_object = router if isinstance(router, Router) else None
    if router is not None and router_object is None:
        options["router"] = router
    c = _config(config, options)
    width = c.latent_dim or d_model
    router_params, router_flops = _router_cost(router_object or c.router, d_model, c.num_experts)
    expert, expert_matmul = _expert_params(c, width), _ffn_params(width, c.expert_hidden, c.activation)
    shared = _ffn_params(d_model, c.num_shared_experts * (c.shared_expert_hidden or c.expert_hidden), c.activation)
    shared += d_model if c.shared_expert_gate else 0  # Qwen2-MoE's d -> 1 gate
    latent = 2 * d_model * width if c.latent_dim else 0  # LatentMoE's down and up projections, no biases
    return Cost(
        params_total=router_params + c.num_experts * expert + shared + latent,
        params_active=router_params + c.top_k * expert + shared + latent,
        flops_per_token=router_flops + 2 * (c.top_k * expert_matmul + shared + latent),
    )


def _projections(d_in: int, d_out: int, depth: int) -> tuple[int, int]:
    """(params, flops per token) of MH-MoE's head or merge layer: `depth` linear layers with biases, the first
    d_in -> d_out, the rest d_out -> d_out."""
    weights = 0 if depth == 0 else d_in * d_out + (depth - 1) * d_out * d_out
    return weights + depth * d_out, 2 * weights


def mhmoe_cost(config: MoEConfig | None = None, *, d_model: int, router: Any = None, **options: Any) -> Cost:
    """The cost of `MHMoE(config, d_model=d_model)` (or its keyword form), any member of its family: a latent width
    L (head layer D×L, merge layer L×D, sub-tokens L/H wide) and a router and pool per head (`per_head_experts`:
    H·E experts, and a token's H sub-tokens reach H·K of them; with one shared pool at most min(E, H·K))."""
    router_object = router if isinstance(router, Router) else None
    if router is not None and router_object is None:
        options["router"] = router
    c = _config(config, options)
    latent = c.latent_dim or d_model
    H, head_dim = c.num_heads, latent // c.num_heads
    pools = H if c.per_head_experts else 1
    head_router = router_object.head(0) if isinstance(router_object, HeadRouters) else router_object
    one_pool = dataclasses.replace(c.subtoken(), num_experts=c.num_experts)
    inner = sparse_moe_cost(one_pool, d_model=head_dim, **({"router": head_router} if head_router else {}))
    router_params, _ = _router_cost(head_router or one_pool.router, head_dim, c.num_experts)
    expert = _expert_params(c, head_dim)
    reached = H * c.top_k if pools > 1 else min(c.num_experts, H * c.top_k)
    head_params, head_flops = _projections(d_model, latent, c.multi_head_layers)
    merge_params, merge_flops = _projections(latent, d_model, c.merge_layers)
    projections = head_params + merge_params
    other_pools = (pools - 1) * (router_params + c.num_experts * expert)
    return Cost(
        params_total=projections + inner.params_total + other_pools,
        params_active=projections + inner.params_active + (pools - 1) * router_params + (reached - c.top_k) * expert,
        flops_per_token=head_flops + merge_flops + H * inner.flops_per_token,
    )


def all_to_all_values_per_token(
    config: MoEConfig, *, d_model: int, layer: Literal["smoe", "mhmoe"], parallel: Literal["expert", "head"], size: int
) -> float:
    """Values one token sends to other ranks through one layer's all-to-alls in the forward pass (dispatch and
    combine; the backward sends as many again), under expert or head parallelism over `size` ranks. Multiply by the
    bytes of the dtype for bytes.

    expert: each of the token's routed rows (K per item; H items for MH-MoE, 1 for SMoE) of the experts' width (D,
        LatentMoE's L, or a sub-token's L/H) goes to the rank of its expert and back: 2·items·K·width·(size-1)/size,
        the expectation when routing spreads evenly over the ranks (the rows that stay on their rank are not sent;
        uneven routing moves it), plus a size exchange of E counts per rank per call, not per token.
    head: the token's sub-tokens of the heads other ranks hold go there and back: 2·L·(size-1)/size, exact, whatever
        K and the routing (Multi-Head LatentMoE with per-head pools only; module `mhmoe.parallel.head`).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    remote = (size - 1) / size
    latent = config.latent_dim or d_model
    if parallel == "head":
        if layer != "mhmoe" or not config.per_head_experts:
            raise ValueError("head parallelism places the heads of an MHMoE with per_head_experts=True only")
        if config.num_heads % size:
            raise ValueError(f"num_heads ({config.num_heads}) must be divisible by the head-parallel size ({size})")
        return 2 * latent * remote
    if parallel != "expert":
        raise ValueError(f"unknown parallel {parallel!r}; choose 'expert' or 'head'")
    items, width = (config.num_heads, latent // config.num_heads) if layer == "mhmoe" else (1, latent)
    return 2 * items * config.top_k * width * remote


def layer_cost(spec: LayerSpec) -> Cost:
    if spec.kind == "dense":
        return dense_cost(d_model=spec.d_model, hidden=spec.hidden, activation=spec.activation, bias=spec.bias)
    count = sparse_moe_cost if spec.kind == "smoe" else mhmoe_cost
    return count(spec.moe, d_model=spec.d_model)


def cost_of(layer: nn.Module) -> Cost:
    """The `Cost` of a built DenseFFN, SparseMoE or MHMoE, from its configuration (and its router as built)."""
    if isinstance(layer, DenseFFN):
        return dense_cost(d_model=layer.d_model, hidden=layer.hidden, activation=layer.activation, bias=layer.bias)
    if isinstance(layer, MoELayer):
        count = mhmoe_cost if isinstance(layer, MHMoE) else sparse_moe_cost
        return count(layer.config, d_model=layer.d_model, router=layer.routed.router)
    raise TypeError(f"cost_of knows DenseFFN, SparseMoE and MHMoE, got {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------
# Presets (docs/paper-notes.md §4: v1 parameter-matched, v2 FLOPs-matched). Sizes are solved with the
# counters above, never typed in, except the baselines' own published sizes.


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _solve_linear(f: Callable[[int], int], target: int, x0: int = 1) -> float:
    """x with f(x) = target, for f affine in x (costs are affine in hidden size and expert count), from f at
    the valid points x0 and x0 + 1."""
    f0, f1 = f(x0), f(x0 + 1)
    return x0 + (target - f0) / (f1 - f0)


def _moe(config: MoEConfig, **changes: Any) -> MoEConfig:
    return dataclasses.replace(config, **changes)


class SizeMatchError(ValueError):
    """A sized preset cannot meet its target: the message names the constraint and what to relax."""


def _check_match(solver: str, what: str, got: int, target: int, tolerance: float, relax: str) -> None:
    ratio = got / target
    if abs(ratio - 1) > tolerance:
        raise SizeMatchError(
            f"{solver}: {what} is {ratio:.3f}× the SMoE's ({got:,} vs {target:,}), outside the tolerance "
            f"±{tolerance:.0%}; {relax}"
        )


def flops_matched_mhmoe(
    d_model: int,
    smoe: MoEConfig,
    *,
    num_heads: int,
    top_k: int,
    hidden_multiple: int = 64,
    experts_multiple: int = 8,
    tolerance: float = 0.05,
    latent_dim: int | None = None,
    per_head_experts: bool = False,
) -> MoEConfig:
    """v2-style MH-MoE: expert hidden chosen for equal FLOPs per token with `smoe`, then the expert
    count raised for roughly equal total parameters (v2 Table 1: H=2 → 40 experts × 768,
    H=3 → 96 × 512 against an 8 × 2048 SwiGLU SMoE at D = 768, within 1.5% FLOPs and 3.2% parameters).
    With `latent_dim` L and `per_head_experts` it sizes Multi-Head LatentMoE the same way (head layer D×L, merge
    layer L×D, a router and a pool of the solved expert count per head).

    Both must hold within `tolerance` (relative); otherwise `SizeMatchError` says which cannot and what to relax
    (a small SMoE's FLOPs may not even cover MH-MoE's head and merge layers).
    """
    base = sparse_moe_cost(smoe, d_model=d_model)
    family = dict(latent_dim=latent_dim, per_head_experts=per_head_experts)
    mh = _moe(smoe, num_heads=num_heads, top_k=top_k, **family)
    relax = "fewer heads, a smaller top_k, multi_head_layers / merge_layers = 0, a smaller hidden_multiple, or a larger tolerance"

    def too_costly(fixed: int) -> str:
        projections = 2 * (mh.multi_head_layers + mh.merge_layers) * d_model * (latent_dim or d_model)
        return (
            f"the head and merge layers cost {projections:,} ({projections / base.flops_per_token:.2f}×) and "
            f"the routers of {mh.num_experts} experts (the count parameter matching asks for) "
            f"{fixed - projections:,} more; relax it: {relax}"
        )

    return _match_flops_then_params(
        "flops_matched_mhmoe",
        mh,
        lambda config: mhmoe_cost(config, d_model=d_model),
        base,
        hidden_multiple,
        experts_multiple,
        tolerance,
        relax,
        too_costly,
    )


def _match_flops_then_params(
    solver: str,
    config: MoEConfig,
    cost: Callable[[MoEConfig], Cost],
    base: Cost,
    hidden_multiple: int,
    experts_multiple: int,
    tolerance: float,
    relax: str,
    too_costly: Callable[[int], str],
) -> MoEConfig:
    """`config` with the expert hidden (a multiple of `hidden_multiple`) that meets `base`'s FLOPs per token, then
    the expert count (a multiple of `experts_multiple`, at least top_k) that meets its total parameters, both
    within `tolerance`, or `SizeMatchError` (`too_costly(fixed FLOPs)` says why when no hidden can meet the FLOPs;
    `relax` what to relax)."""

    def of(**changes: Any) -> Cost:
        return cost(_moe(config, **changes))

    for _ in range(3):  # expert count and hidden size depend on each other only through the router
        hidden = _solve_linear(lambda f: of(expert_hidden=f).flops_per_token, base.flops_per_token)
        if hidden < 1:  # f -> FLOPs is affine: its value at 0 is what the experts cannot go below
            fixed = 2 * of(expert_hidden=1).flops_per_token - of(expert_hidden=2).flops_per_token
            raise SizeMatchError(
                f"{solver}: no expert_hidden can match the SMoE's {base.flops_per_token:,} FLOPs per token: "
                + too_costly(fixed)
            )
        config = _moe(config, expert_hidden=_round_to(hidden, hidden_multiple))
        experts = _solve_linear(lambda e: of(num_experts=e).params_total, base.params_total, x0=config.top_k)
        config = _moe(config, num_experts=max(_round_to(experts, experts_multiple), config.top_k))
    note = (
        f"the exact solution is expert_hidden ≈ {hidden:.0f} (rounded to a multiple of {hidden_multiple}); relax it: "
    )
    _check_match(solver, "FLOPs per token", of().flops_per_token, base.flops_per_token, tolerance, note + relax)
    relax = f"the exact expert count is ≈ {experts:.1f}; use a smaller experts_multiple or a larger tolerance"
    _check_match(solver, "params_total", of().params_total, base.params_total, tolerance, relax)
    return config


def params_matched_mhmoe(
    d_model: int, smoe: MoEConfig, *, num_heads: int, hidden_multiple: int = 64, tolerance: float = 0.05
) -> MoEConfig:
    """v1-style MH-MoE: same experts and top-k as `smoe`, expert hidden chosen for equal total
    parameters — so expert FLOPs grow about H-fold (the authors' code hard-codes 11520 at D = 768,
    H = 4; the exact match with head and merge layers counted is what this returns). Within `tolerance`
    (relative), or `SizeMatchError`."""
    return _match_hidden(
        "params_matched_mhmoe",
        _moe(smoe, num_heads=num_heads),
        lambda config: mhmoe_cost(config, d_model=d_model).params_total,
        sparse_moe_cost(smoe, d_model=d_model).params_total,
        "params_total",
        hidden_multiple,
        tolerance,
        "smaller hidden_multiple, fewer heads or more experts",
    )


def fine_grained_smoe(
    d_model: int, smoe: MoEConfig, *, granularity: int, hidden_multiple: int = 64, tolerance: float = 0.05
) -> MoEConfig:
    """E·g experts, top-(K·g), hidden solved for equal FLOPs (v2's 16 × 1024 top-2 at g = 2), within
    `tolerance` (relative), or `SizeMatchError`."""
    return _match_hidden(
        "fine_grained_smoe",
        _moe(smoe, num_experts=smoe.num_experts * granularity, top_k=smoe.top_k * granularity),
        lambda config: sparse_moe_cost(config, d_model=d_model).flops_per_token,
        sparse_moe_cost(smoe, d_model=d_model).flops_per_token,
        "FLOPs per token",
        hidden_multiple,
        tolerance,
        "smaller hidden_multiple or granularity",
    )


def flops_matched_latent_moe(
    d_model: int,
    smoe: MoEConfig,
    *,
    latent_dim: int,
    hidden_multiple: int = 64,
    experts_multiple: int = 8,
    tolerance: float = 0.05,
) -> MoEConfig:
    """LatentMoE (arXiv 2601.18089) at `smoe`'s FLOPs per token: the experts work at width L = `latent_dim` and,
    by the paper's rule, the top-k grows by α = D/L (as does the expert count, an α-times finer split at the same
    total expert width); the expert hidden is solved for equal FLOPs with the D×L down and L×D up projections
    counted, then the expert count for about equal total parameters (it stays α·E where the projections are small
    beside the experts: at D = 128 and 384 with L = D/2). Both within `tolerance` (relative), and α a whole
    number, or `SizeMatchError`."""
    if latent_dim <= 0 or d_model % latent_dim:
        raise SizeMatchError(
            f"flops_matched_latent_moe: latent_dim ({latent_dim}) must divide d_model ({d_model}), so that the "
            f"top-k grows by the whole factor D/L; choose a divisor such as {d_model // 2} or {d_model // 4}"
        )
    alpha = d_model // latent_dim
    latent = _moe(smoe, latent_dim=latent_dim, num_experts=smoe.num_experts * alpha, top_k=smoe.top_k * alpha)
    relax = "a larger latent_dim, a smaller hidden_multiple, or a larger tolerance"

    def too_costly(fixed: int) -> str:
        projections = 4 * d_model * latent_dim
        return f"the down and up projections alone cost {projections:,} and the router {fixed - projections:,}; {relax}"

    return _match_flops_then_params(
        "flops_matched_latent_moe",
        latent,
        lambda config: sparse_moe_cost(config, d_model=d_model),
        sparse_moe_cost(smoe, d_model=d_model),
        hidden_multiple,
        experts_multiple,
        tolerance,
        relax,
        too_costly,
    )


def communication_matched(
    d_model: int,
    smoe: MoEConfig,
    member: MoEConfig,
    *,
    layer: Literal["smoe", "mhmoe"],
    parallel: Literal["expert", "head"],
    size: int = 4,
    latent_multiple: int | None = None,
    hidden_multiple: int = 64,
    experts_multiple: int = 8,
    tolerance: float = 0.05,
) -> MoEConfig:
    """A latent member of the family (`member` as a `layer`, its latent_dim left to solve) that sends as many
    all-to-all values per token under `parallel` over `size` ranks as `smoe` does under expert parallelism, then
    costs its FLOPs per token and about its parameters: the latent width L first (the traffic is c·L, whatever the
    experts' count and hidden: `all_to_all_values_per_token`), a multiple of `latent_multiple` (default 8·H), then the
    expert hidden and count as `flops_matched_mhmoe` solves them. Under head parallelism Multi-Head LatentMoE moves
    2·L·(P−1)/P values, SMoE under expert parallelism 2·K·D·(P−1)/P, so L = K·D. Each match within `tolerance`
    (relative), or `SizeMatchError` naming what to relax."""
    if size < 2:
        raise SizeMatchError(f"communication_matched: {size} rank(s) send nothing to match; give size >= 2")
    multiple = latent_multiple or 8 * member.num_heads
    if multiple % member.num_heads:
        raise SizeMatchError(
            f"communication_matched: latent_multiple ({multiple}) must be divisible by num_heads ({member.num_heads})"
        )

    def traffic(latent: int) -> float:
        config = _moe(member, latent_dim=latent)
        return all_to_all_values_per_token(config, d_model=d_model, layer=layer, parallel=parallel, size=size)

    target = all_to_all_values_per_token(smoe, d_model=d_model, layer="smoe", parallel="expert", size=size)
    exact = target / traffic(multiple) * multiple  # the traffic is proportional to L
    latent = _round_to(exact, multiple)
    _check_match(
        "communication_matched",
        f"the all-to-all values per token under {parallel} parallelism",
        round(traffic(latent)),
        round(target),
        tolerance,
        f"the exact latent width is ≈ {exact:.0f} (rounded to a multiple of {multiple}); use a smaller "
        "latent_multiple or a larger tolerance",
    )
    count = mhmoe_cost if layer == "mhmoe" else sparse_moe_cost
    return _match_flops_then_params(
        "communication_matched",
        _moe(member, latent_dim=latent),
        lambda config: count(config, d_model=d_model),
        sparse_moe_cost(smoe, d_model=d_model),
        hidden_multiple,
        experts_multiple,
        tolerance,
        "fewer heads, a smaller top_k, a smaller hidden_multiple, or a larger tolerance",
        lambda fixed: f"the latent width {latent} that the traffic asks for costs {fixed:,} beside the experts",
    )


def layer_all_to_all_values(spec: LayerSpec, parallel: Literal["expert", "head"], size: int) -> float | None:
    """`all_to_all_values_per_token` of a sized layer, None where `parallel` cannot place it over `size` ranks (a
    dense layer; head parallelism without a pool per head, or with a head count `size` does not divide)."""
    if spec.kind == "dense" or spec.moe is None:
        return None
    layer: Literal["smoe", "mhmoe"] = "mhmoe" if spec.kind == "mhmoe" else "smoe"
    config = spec.moe if layer == "mhmoe" else spec.moe.routed_part()
    if parallel == "head" and (layer != "mhmoe" or not config.per_head_experts or config.num_heads % size):
        return None
    return all_to_all_values_per_token(config, d_model=spec.d_model, layer=layer, parallel=parallel, size=size)


def _match_hidden(
    solver: str,
    config: MoEConfig,
    measure: Callable[[MoEConfig], int],
    target: int,
    what: str,
    hidden_multiple: int,
    tolerance: float,
    smaller: str,
) -> MoEConfig:
    """`config` with the expert_hidden (a multiple of `hidden_multiple`) at which `measure` meets `target` within
    `tolerance`, or `SizeMatchError` naming the exact solution and what to relax (`smaller`)."""
    hidden = _solve_linear(lambda f: measure(_moe(config, expert_hidden=f)), target)
    sized = _moe(config, expert_hidden=_round_to(hidden, hidden_multiple))
    relax = (
        f"the exact solution is expert_hidden ≈ {hidden:.0f} (rounded to a multiple of {hidden_multiple}); use a "
        f"{smaller}, or a larger tolerance"
    )
    _check_match(solver, what, measure(sized), target, tolerance, relax)
    return sized


V1_XMOE = MoEConfig(num_experts=8, top_k=2, expert_hidden=3072, activation="gelu", router=RouterConfig(kind="xmoe"))
V2_SMOE = MoEConfig(num_experts=8, top_k=1, expert_hidden=2048, activation="swiglu")


def presets() -> dict[str, LayerSpec]:
    """Named layer sizes of docs/paper-notes.md §4 (all at D = 768)."""
    D = 768
    return {
        "v1-dense": LayerSpec("dense", D, hidden=3072, activation="gelu"),
        "v1-xmoe-8e": LayerSpec("smoe", D, V1_XMOE),
        "v1-mhmoe-8e-h4": LayerSpec("mhmoe", D, params_matched_mhmoe(D, V1_XMOE, num_heads=4)),
        "v1-xmoe-32e": LayerSpec("smoe", D, _moe(V1_XMOE, num_experts=32)),
        "v1-mhmoe-32e-h4": LayerSpec("mhmoe", D, params_matched_mhmoe(D, _moe(V1_XMOE, num_experts=32), num_heads=4)),
        "v2-smoe": LayerSpec("smoe", D, V2_SMOE),
        "v2-fine-grained": LayerSpec("smoe", D, fine_grained_smoe(D, V2_SMOE, granularity=2)),
        "v2-mhmoe-h2": LayerSpec("mhmoe", D, flops_matched_mhmoe(D, V2_SMOE, num_heads=2, top_k=2)),
        "v2-mhmoe-h3": LayerSpec("mhmoe", D, flops_matched_mhmoe(D, V2_SMOE, num_heads=3, top_k=3)),
        **family_presets(D, V2_SMOE),
    }


def family_presets(d_model: int, smoe: MoEConfig) -> dict[str, LayerSpec]:
    """The multi-head family beside `smoe` at its FLOPs per token and about its parameters (docs/family.md):
    LatentMoE at L = D/2 (the paper's rule: 2× the experts and the top-k), Multi-Head LatentMoE at L = D/2 with 4
    heads and a pool each, and Multi-Head LatentMoE matched on communication: its head-parallel all-to-all over 4
    ranks equal to `smoe`'s expert-parallel one (L = K·D)."""
    D, H = d_model, 4
    per_head = _moe(smoe, num_heads=H, top_k=2, per_head_experts=True)
    even = dict(experts_multiple=2)  # 8 would leave them 11% short of the parameters (18 experts per pool)
    return {
        "latent-moe": LayerSpec("smoe", D, flops_matched_latent_moe(D, smoe, latent_dim=D // 2, **even)),
        "mh-latent-moe-h4": LayerSpec(
            "mhmoe",
            D,
            flops_matched_mhmoe(D, smoe, num_heads=H, top_k=2, latent_dim=D // 2, per_head_experts=True, **even),
        ),
        "mh-latent-moe-h4-hp-comm": LayerSpec(
            "mhmoe", D, communication_matched(D, smoe, per_head, layer="mhmoe", parallel="head", size=4, **even)
        ),
    }


def build_preset(name: str, **changes: Any) -> nn.Module:
    """The preset's layer, with MoEConfig fields changed (e.g. dispatch="reference")."""
    table = presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
    spec = table[name]
    if changes:
        if spec.moe is None:
            raise ValueError(f"preset {name!r} is dense; it has no MoE options to change ({sorted(changes)})")
        spec = dataclasses.replace(spec, moe=_moe(spec.moe, **changes))
    return spec.build()
