"""Router losses, computed per layer and returned (never kept in globals).

Shape legend: S routed (sub-)tokens, E experts. `valid_S` (bool) excludes padding; with no valid
item a loss is 0, not NaN.

`reduce` (optional) turns a loss over this call's items into one over a larger batch split across
callers: it must return the sum of its argument over all of them, differentiably (data-parallel
training passes an all-reduce; `mhmoe.parallel` does). The means are then taken over every
caller's items, one `reduce` call per loss, so the value is the same however the batch is split.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a 1-D tensor over all parts of the batch, differentiably


def _masked_mean(values_S: Tensor, valid_S: Tensor | None) -> Tensor:
    """Mean over dim 0 of values (S, ...) counting only valid rows; 0 when there are none."""
    if valid_S is None:
        return values_S.sum(0) / max(values_S.shape[0], 1)
    w = valid_S.to(values_S.dtype).reshape(-1, *([1] * (values_S.dim() - 1)))
    return (values_S * w).sum(0) / w.sum().clamp_min(1)


def _means(values: list[Tensor], valid_S: Tensor | None, reduce: Reduce | None) -> list[Tensor]:
    """`_masked_mean` of each (S, ...) tensor; with `reduce`, over every caller's items (one reduce call)."""
    if reduce is None:
        return [_masked_mean(v, valid_S) for v in values]
    first = values[0]
    w_S = first.new_ones(first.shape[0]) if valid_S is None else valid_S.to(first.dtype)
    sums = [(v * w_S.reshape(-1, *([1] * (v.dim() - 1)))).sum(0) for v in values]
    packed = reduce(torch.cat([s.reshape(-1) for s in sums] + [w_S.sum().reshape(1)]))
    count = packed[-1].clamp_min(1)
    parts = packed[:-1].split([s.numel() for s in sums])
    return [part.view(s.shape) / count for part, s in zip(parts, sums)]


def balance_loss(
    probs_SE: Tensor, first_choice_S: Tensor, valid_S: Tensor | None = None, reduce: Reduce | None = None
) -> Tensor:
    """Switch/GShard load-balancing loss: E · Σ_e mean_s(p_se) · frac_s(e) (PAPER.md §2.9).

    frac_s(e) is the share of (sub-)tokens whose first choice is e. The loss is 1 when routing is
    uniform (p = 1/E, whatever frac is) and when the load is even; its gradient flows through p only.
    With `reduce`, both means run over the whole (global) batch.
    """
    num_experts = probs_SE.shape[-1]
    one_hot_SE = torch.nn.functional.one_hot(first_choice_S, num_experts).to(probs_SE.dtype)
    mean_prob_E, frac_E = _means([probs_SE, one_hot_SE], valid_S, reduce)
    return num_experts * (mean_prob_E * frac_E).sum()


def z_loss(logits_SE: Tensor, valid_S: Tensor | None = None, reduce: Reduce | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)² — keeps router logits small."""
    (mean,) = _means([torch.logsumexp(logits_SE, dim=-1).square()], valid_S, reduce)
    return mean
