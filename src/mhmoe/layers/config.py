"""`MoEConfig`: every option of a SparseMoE or MH-MoE layer, written once.

The layers (`SparseMoE`, `MHMoE`), the cost counter (`mhmoe.models.cost`) and the run configuration
(`model.ffn.moe` of `mhmoe train --set ...`) all read this one dataclass, so an option exists everywhere
or nowhere. The width of the routed items is not part of it: a layer's `d_model` is the width of the
model it sits in (`SparseMoE(config, d_model=512)`).

The MH-MoE fields (num_heads, multi_head_layers, merge_layers, residual, per_head_experts) are read by `MHMoE`
only; a `SparseMoE` keeps them at their defaults. `latent_dim` is read by both: the family of the multi-head layer
(LatentMoE, Multi-Head LatentMoE) is these two layers with a latent width and, for the latter, a router and a pool
of experts per head (docs/family.md). Values are checked when the config is made, with one-line
messages naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from mhmoe.layers.experts import check_positive, integer
from mhmoe.layers.routers import RouterConfig, check_groups, check_top_k
from mhmoe.ops.activations import Activation, check_activation
from mhmoe.ops.backend import DISPATCHES, DispatchName

Residual = Literal["outer", "subtoken"]
RESIDUALS: tuple[str, ...] = get_args(Residual)
CapacityRounding = Literal["total", "per_choice"]
TokenGroup = Literal["call", "sequence"]
BalanceLoss = Literal["first_choice", "all_choices"]
CHOICES: dict[str, tuple[str, ...]] = {
    "capacity_rounding": get_args(CapacityRounding),
    "token_group": get_args(TokenGroup),
    "balance_loss": get_args(BalanceLoss),
    "residual": RESIDUALS,
}
XMOE_DIM = 16  # X-MoE's routing dim (Chi et al. 2022); v1 divides it by H inside MH-MoE (docs/paper-notes.md §3)
MULTI_HEAD_FIELDS = ("num_heads", "multi_head_layers", "merge_layers", "residual", "per_head_experts")  # MH-MoE only


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A sparse mixture-of-experts FFN (and, with the last four fields, its multi-head form).

    num_experts, top_k: E experts, each routed item goes to K of them.
    expert_hidden: hidden width F of each expert.
    activation: gelu, relu, silu, relu2 (squared ReLU) or a GLU form (swiglu, geglu, reglu; `mhmoe.ops.activations`).
    expert_bias: experts with biases b_in, b_out (the authors' code by default; Mixtral and the rest have none).
    router: which router and its options (`RouterConfig`).
    capacity_factor: None is dropless; c keeps at most ceil(c·K·S/E) assignments per expert (GShard priority).
    capacity_rounding: "total" is ceil(c·K·S/E); "per_choice" is K·ceil(c·S/E) (fairseq / the authors' code).
    expert_capacity: a fixed number of assignments per expert instead (Switch Transformers' `expert_capacity`).
    eval_capacity_fraction: in eval mode the capacity is ceil(f·S) instead (fairseq; the authors' code: 0.25).
    token_group: the items that share a capacity and a balance loss: "call" (all of them) or "sequence" (each
        sequence, the input's second-to-last dim, on its own, as Switch Transformers and DeepSeek-V3's
        sequence-wise loss; the balance loss is then the mean over sequences).
    balance_loss: "first_choice" counts each item's first choice (Switch / GShard, v1; uniform routing gives 1);
        "all_choices" counts all K (transformers' Mixtral, Qwen-MoE, OLMoE; uniform gives K).
    balance_loss_coef, z_loss_coef: weights of the balance loss (α = 0.01, v1) and the router z-loss in aux_loss.
    num_shared_experts, shared_expert_hidden: always-on experts; their hidden defaults to expert_hidden.
    shared_expert_gate: the shared experts' output times sigmoid(x · w), w learned (Qwen2-MoE).
    route_padding: route masked items too, as the authors' code does (its mask is commented out): they take
        capacity, count in the losses and get an output.
    dispatch: "auto", "grouped_mm", "slices", "triton" or "reference" (the per-expert loop, for tests).
    recompute: keep no expert activations for the backward and recompute them there.
    num_heads: H sub-tokens per token (MHMoE; independent of attention heads).
    multi_head_layers, merge_layers: depth of MH-MoE's D×D head and merge layers (0 removes one).
    residual: "outer" (the authors' code: the block adds x) or "subtoken" (v1 Eq. 6).
    latent_dim: the width L the experts work at, None for the model's. SparseMoE: LatentMoE (arXiv 2601.18089;
        NemotronH's `moe_latent_size`): the router and the shared experts read the full-width item, the routed
        item is projected down D -> L before its experts and their weighted sum back up L -> D. MHMoE: the
        multi-head layer maps D -> L and the merge layer L -> D, so sub-tokens are L/H wide (Multi-Head
        LatentMoE, arXiv 2602.04870).
    per_head_experts: MHMoE only: each head has its own router and its own pool of num_experts experts
        (Multi-Head LatentMoE; H·E experts in all), instead of one router and pool that every head shares.
    """

    num_experts: int
    top_k: int
    expert_hidden: int
    activation: Activation = "gelu"
    expert_bias: bool = False
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity_factor: float | None = None
    capacity_rounding: CapacityRounding = "total"
    expert_capacity: int | None = None
    eval_capacity_fraction: float | None = None
    token_group: TokenGroup = "call"
    balance_loss: BalanceLoss = "first_choice"
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    shared_expert_gate: bool = False
    route_padding: bool = False
    dispatch: DispatchName = "auto"
    recompute: bool = False
    num_heads: int = 1
    multi_head_layers: int = 1
    merge_layers: int = 1
    residual: Residual = "outer"
    latent_dim: int | None = None
    per_head_experts: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy integers where ints go: stored as ints (configs are saved as JSON)
            object.__setattr__(self, f.name, integer(getattr(self, f.name)))
        check_positive(num_experts=self.num_experts, expert_hidden=self.expert_hidden, num_heads=self.num_heads)
        check_top_k(self.top_k, self.num_experts)
        check_activation(self.activation)
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        check_groups(self.router.num_groups, self.router.top_groups, self.num_experts, self.top_k)
        if self.latent_dim is not None:
            check_positive(latent_dim=self.latent_dim)
            if self.latent_dim % self.num_heads:
                raise ValueError(
                    f"latent_dim ({self.latent_dim}) must be divisible by num_heads ({self.num_heads}): "
                    "each head takes latent_dim // num_heads of it"
                )
        for name in ("recompute", "expert_bias", "shared_expert_gate", "route_padding", "per_head_experts"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {choices}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose one of {DISPATCHES}")
        if self.recompute and self.dispatch == "reference":
            raise ValueError("recompute is not supported with dispatch='reference' (the test oracle); use 'auto'")
        if self.expert_bias and self.dispatch == "triton":
            raise ValueError("the triton backend has no expert biases; use dispatch='auto' with expert_bias=True")
        self._check_capacity()
        for name in ("balance_loss_coef", "z_loss_coef"):
            coef = getattr(self, name)
            if not coef >= 0:
                raise ValueError(f"{name} must be >= 0, got {coef}")
            if math.isinf(coef):
                raise ValueError(f"{name} must be finite, got {coef}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int):
            raise ValueError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        for name in ("shared_expert_hidden", "shared_expert_gate"):
            if getattr(self, name) not in (None, False) and not self.num_shared_experts:
                raise ValueError(f"{name}={getattr(self, name)} given but num_shared_experts is 0")
        if self.shared_expert_hidden is not None:
            check_positive(shared_expert_hidden=self.shared_expert_hidden)
        for name in ("multi_head_layers", "merge_layers"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {n!r}")

    def _check_capacity(self) -> None:
        c = self.capacity_factor
        if c is not None and not c > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {c}")
        if c is not None and math.isinf(c):
            raise ValueError(f"capacity_factor must be finite (None is dropless), got {c}")
        if c is not None and not math.isfinite(c * self.top_k):
            raise ValueError(
                f"capacity_factor={c} overflows the capacity c·K·S/E; c = E/K = {self.num_experts / self.top_k:g} "
                "already keeps every assignment: use it, or None (dropless)"
            )
        if self.expert_capacity is not None:
            check_positive(expert_capacity=self.expert_capacity)
            if c is not None:
                raise ValueError(
                    f"expert_capacity={self.expert_capacity} and capacity_factor={c} both given; set one of them"
                )
        if self.capacity_rounding != "total" and c is None:
            raise ValueError(f"capacity_rounding={self.capacity_rounding!r} rounds a capacity_factor; none is given")
        f = self.eval_capacity_fraction
        if f is not None:
            if not 0 < f < math.inf:
                raise ValueError(f"eval_capacity_fraction must be > 0 and finite, or None, got {f}")
            if c is None and self.expert_capacity is None:
                raise ValueError(
                    f"eval_capacity_fraction={f} replaces a capacity in eval mode, but the layer is dropless; "
                    "set capacity_factor (or expert_capacity) too"
                )

    @classmethod
    def from_kwargs(cls, *, router: Any = "softmax", router_kwargs: dict | None = None, **options: Any) -> MoEConfig:
        """The keyword form the layers take: `router` a name (with `router_kwargs` for its options) or a
        RouterConfig; the other keywords are fields. A `Router` object is the layer's business, not a config's."""
        if isinstance(router, RouterConfig):
            if router_kwargs:
                raise ValueError("router_kwargs given with a RouterConfig; set the options on the RouterConfig")
            router_config = router
        else:
            router_config = RouterConfig.from_kwargs(router, router_kwargs)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected MoE option(s) {unknown}; MoEConfig has {sorted(names)}")
        return cls(router=router_config, **options)

    @classmethod
    def authors_code(
        cls,
        *,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        num_heads: int,
        activation_fn: Literal["silu", "relu", "gelu"] = "silu",
        glu: bool = False,
        bias: bool = False,
        use_xmoe: bool = True,
        eval_capacity_fraction: float | None = 0.25,
        **changes: Any,
    ) -> MoEConfig:
        """The MH-MoE layer exactly as the authors' code computes it (torchscale `MOELayer` + `TopkGate`,
        docs/paper-notes.md §8), with their command-line names where ours differ:

        - gates: the top-k softmax probabilities, not renormalised (`--moe-normalize-gate-prob-before-dropping`
          is parsed but never passed to `TopkGate`);
        - capacity: K·ceil(S/E) per expert in training, ceil(0.25·S) in evaluation
          (`--moe-eval-capacity-token-fraction`; a value ≤ 0 there, None here, keeps the training rule), S all
          sub-tokens of the call, overflow dropped choice-major;
        - padding is routed (their mask is commented out): it takes capacity and counts in the balance loss;
        - router: X-MoE in their code form at routing dim 16 whatever H (`use_xmoe`), or a plain softmax gate;
        - balance loss: GShard's over first choices, weight 0.01 (`--moe-gate-loss-wt`), no z-loss;
        - experts: `activation_fn` "silu" and "relu" build a GLU (SwiGLU, ReGLU) as their FeedForwardNetwork
          does, "gelu" a plain one unless `glu`; biases unless `--no-bias` (their run script passes it: bias=False);
        - multi-head and merge layers only when H > 1, residual outside the layer.
        """
        glu_forms = {"silu": "swiglu", "relu": "reglu", "gelu": "geglu" if glu else "gelu"}
        if activation_fn not in glu_forms:
            raise ValueError(f"unknown activation_fn {activation_fn!r}; the authors' code takes {sorted(glu_forms)}")
        router = RouterConfig(kind="xmoe", form="code", dim=XMOE_DIM, renormalize=False) if use_xmoe else (
            RouterConfig(kind="softmax", renormalize=False)
        )  # fmt: skip
        depth = 1 if num_heads > 1 else 0
        options: dict[str, Any] = dict(
            num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden, num_heads=num_heads,
            activation=glu_forms[activation_fn], expert_bias=bias, router=router, capacity_factor=1.0,
            capacity_rounding="per_choice", eval_capacity_fraction=eval_capacity_fraction, route_padding=True,
            balance_loss="first_choice", balance_loss_coef=0.01, z_loss_coef=0.0, multi_head_layers=depth,
            merge_layers=depth, residual="outer",
        )  # fmt: skip
        return cls(**{**options, **changes})

    def subtoken(self) -> MoEConfig:
        """The config of MH-MoE's inner SparseMoE: the multi-head fields at their defaults, no latent width (the
        sub-tokens are already latent), H·E experts when every head has its own pool and, for X-MoE in its paper
        form, the routing dim 16 // H (at least 1) unless set (v1; the authors' code keeps 16)."""
        router = self.router
        if router.kind == "xmoe" and router.form == "paper" and router.dim is None:
            router = dataclasses.replace(router, dim=max(1, XMOE_DIM // self.num_heads))
        pools = self.num_heads if self.per_head_experts else 1
        return dataclasses.replace(
            self.routed_part(), router=router, latent_dim=None, num_experts=pools * self.num_experts
        )

    def routed_part(self) -> MoEConfig:
        """This config with the multi-head fields (`MULTI_HEAD_FIELDS`) at their defaults: what a SparseMoE reads."""
        return dataclasses.replace(
            self, num_heads=1, multi_head_layers=1, merge_layers=1, residual="outer", per_head_experts=False
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        return cls(**{**data, "router": RouterConfig(**data.get("router", {}))})
