"""Router losses, computed per layer and returned (never kept in globals).

Shape legend: S routed (sub-)tokens, E experts. `valid_S` (bool) excludes padding; with no valid
item a loss is 0, not NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean(values_S: Tensor, valid_S: Tensor | None) -> Tensor:
    """Mean over dim 0 of values (S, ...) counting only valid rows; 0 when there are none."""
    if valid_S is None:
        return values_S.sum(0) / max(values_S.shape[0], 1)
    w = valid_S.to(values_S.dtype).reshape(-1, *([1] * (values_S.dim() - 1)))
    return (values_S * w).sum(0) / w.sum().clamp_min(1)


def balance_loss(probs_SE: Tensor, first_choice_S: Tensor, valid_S: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balancing loss: E · Σ_e mean_s(p_se) · frac_s(e) (PAPER.md §2.9).

    frac_s(e) is the share of (sub-)tokens whose first choice is e. The loss is 1 when routing is
    uniform (p = 1/E, whatever frac is) and when the load is even; its gradient flows through p only.
    """
    num_experts = probs_SE.shape[-1]
    mean_prob_E = _masked_mean(probs_SE, valid_S)
    one_hot_SE = torch.nn.functional.one_hot(first_choice_S, num_experts).to(probs_SE.dtype)
    frac_E = _masked_mean(one_hot_SE, valid_S)
    return num_experts * (mean_prob_E * frac_E).sum()


def z_loss(logits_SE: Tensor, valid_S: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)² — keeps router logits small."""
    return _masked_mean(torch.logsumexp(logits_SE, dim=-1).square(), valid_S)
