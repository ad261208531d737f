"""`MoEConfig`: every option of a SparseMoE or MH-MoE layer, written once.

The layers (`SparseMoE`, `MHMoE`), the cost counter (`mhmoe.models.cost`) and the run configuration
(`model.ffn.moe` of `mhmoe train --set ...`) all read this one dataclass, so an option exists everywhere
or nowhere. The width of the routed items is not part of it: a layer's `d_model` is the width of the
model it sits in (`SparseMoE(config, d_model=512)`).

The MH-MoE fields (num_heads, multi_head_layers, merge_layers, residual) are read by `MHMoE` only; a
`SparseMoE` keeps them at their defaults. Values are checked when the config is made, with one-line
messages naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mhmoe.layers.experts import check_positive
from mhmoe.layers.routers import RouterConfig, check_top_k
from mhmoe.ops.activations import Activation, check_activation
from mhmoe.ops.backend import DISPATCHES, DispatchName

Residual = Literal["outer", "subtoken"]
RESIDUALS: tuple[str, ...] = get_args(Residual)
XMOE_DIM = 16  # X-MoE's routing dim (Chi et al. 2022); v1 divides it by H inside MH-MoE (docs/paper-notes.md §3)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A sparse mixture-of-experts FFN (and, with the last four fields, its multi-head form).

    num_experts, top_k: E experts, each routed item goes to K of them.
    expert_hidden: hidden width F of each expert.
    activation: "gelu", "relu" or "swiglu" (experts have no biases).
    router: which router and its options (`RouterConfig`).
    capacity_factor: None is dropless; c keeps at most ceil(c·K·S/E) assignments per expert (GShard priority).
    balance_loss_coef, z_loss_coef: weights of the balance loss (α = 0.01, v1) and the router z-loss in aux_loss.
    num_shared_experts, shared_expert_hidden: always-on experts; their hidden defaults to expert_hidden.
    dispatch: "auto", "grouped_mm", "slices", "triton" or "reference" (the per-expert loop, for tests).
    recompute: keep no expert activations for the backward and recompute them there.
    num_heads: H sub-tokens per token (MHMoE; independent of attention heads).
    multi_head_layers, merge_layers: depth of MH-MoE's D×D head and merge layers (0 removes one).
    residual: "outer" (the authors' code: the block adds x) or "subtoken" (v1 Eq. 6).
    """

    num_experts: int
    top_k: int
    expert_hidden: int
    activation: Activation = "gelu"
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity_factor: float | None = None
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    dispatch: DispatchName = "auto"
    recompute: bool = False
    num_heads: int = 1
    multi_head_layers: int = 1
    merge_layers: int = 1
    residual: Residual = "outer"

    def __post_init__(self) -> None:
        check_positive(num_experts=self.num_experts, expert_hidden=self.expert_hidden, num_heads=self.num_heads)
        check_top_k(self.top_k, self.num_experts)
        check_activation(self.activation)
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        if not isinstance(self.recompute, bool):
            raise TypeError(f"recompute must be True or False, got {self.recompute!r}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose one of {DISPATCHES}")
        if self.recompute and self.dispatch == "reference":
            raise ValueError("recompute is not supported with dispatch='reference' (the test oracle); use 'auto'")
        c = self.capacity_factor
        if c is not None and not c > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {c}")
        if c is not None and math.isinf(c):
            raise ValueError(f"capacity_factor must be finite (None is dropless), got {c}")
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
        if self.shared_expert_hidden is not None:
            check_positive(shared_expert_hidden=self.shared_expert_hidden)
            if not self.num_shared_experts:
                raise ValueError(f"shared_expert_hidden={self.shared_expert_hidden} given but num_shared_experts is 0")
        for name in ("multi_head_layers", "merge_layers"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"unknown residual {self.residual!r}; choose one of {RESIDUALS}")

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

    def subtoken(self) -> MoEConfig:
        """The config of MH-MoE's inner SparseMoE: the multi-head fields at their defaults and, for X-MoE in its
        paper form, the routing dim 16 // H (at least 1) unless set (v1; the authors' code keeps 16)."""
        router = self.router
        if router.kind == "xmoe" and router.form == "paper" and router.dim is None:
            router = dataclasses.replace(router, dim=max(1, XMOE_DIM // self.num_heads))
        return dataclasses.replace(self.routed_part(), router=router)

    def routed_part(self) -> MoEConfig:
        """This config with the multi-head fields at their defaults: what a SparseMoE reads."""
        return dataclasses.replace(self, num_heads=1, multi_head_layers=1, merge_layers=1, residual="outer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        return cls(**{**data, "router": RouterConfig(**data.get("router", {}))})
