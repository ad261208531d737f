"""Routing metrics (`routing`), figures (`plots`) and the evaluation and analysis of finished runs (`runs`)."""

from mhmoe.analysis.routing import (
    DEFAULT_ACTIVATION_THRESHOLD,
    LayerRouting,
    activation_ratio,
    effective_experts,
    effective_fraction,
    expert_shares,
    head_usage,
    language_expert_information,
    mean_divergence,
    selection_ratio,
    subtoken_divergence,
    summarize,
)

__all__ = [
    "DEFAULT_ACTIVATION_THRESHOLD",
    "LayerRouting",
    "activation_ratio",
    "effective_experts",
    "effective_fraction",
    "expert_shares",
    "head_usage",
    "language_expert_information",
    "mean_divergence",
    "selection_ratio",
    "subtoken_divergence",
    "summarize",
]
