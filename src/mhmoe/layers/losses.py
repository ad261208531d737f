"""Router losses, computed per layer and returned (never kept in globals).

Shape legend: S routed (sub-)tokens, E experts. `valid_S` (bool) excludes padding, selected out with
`torch.where` (not multiplied by 0, which keeps a NaN); with no valid item a loss is 0, not NaN.

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


def _means(sums: list[Tensor], count: Tensor, reduce: Reduce | None) -> list[Tensor]:
    """Each sum over this call's valid items divided by their count; with `reduce`, sums and count
    are first totalled over every caller (one reduce call). 0, not NaN, with no valid item."""
    if reduce is not None:
        packed = reduce(torch.cat([s.reshape(-1) for s in sums] + [count.reshape(1)]))
        count = packed[-1]
        sums = [part.view(s.shape) for part, s in zip(packed[:-1].split([s.numel() for s in sums]), sums)]
    count = count.clamp_min(1)
    return [s / count for s in sums]


def _weights(values_S: Tensor, valid_S: Tensor | None) -> Tensor:
    """(S,) 1 for the items that count, 0 for padding, in values' dtype."""
    return values_S.new_ones(values_S.shape[0]) if valid_S is None else valid_S.to(values_S.dtype)


def balance_loss(
    probs_SE: Tensor, first_choice_S: Tensor, valid_S: Tensor | None = None, reduce: Reduce | None = None
) -> Tensor:
    """Switch/GShard load-balancing loss: E · Σ_e mean_s(p_se) · frac_s(e) (docs/paper-notes.md §2.9).

    frac_s(e) is the share of (sub-)tokens whose first choice is e. The loss is 1 when routing is
    uniform (p = 1/E, whatever frac is) and when the load is even; its gradient flows through p only.
    With `reduce`, both means run over the whole (global) batch.
    """
    num_experts = probs_SE.shape[-1]
    w_S = _weights(probs_SE, valid_S)
    prob_sum_E = probs_SE.sum(0) if valid_S is None else torch.where(valid_S.unsqueeze(-1), probs_SE, 0).sum(0)
    first_count_E = torch.zeros_like(prob_sum_E).scatter_add_(0, first_choice_S, w_S)  # no (S, E) one-hot
    mean_prob_E, frac_E = _means([prob_sum_E, first_count_E.detach()], w_S.sum(), reduce)
    return num_experts * (mean_prob_E * frac_E).sum()


def z_loss(logits_SE: Tensor, valid_S: Tensor | None = None, reduce: Reduce | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)² — keeps router logits small."""
    z_S = torch.logsumexp(logits_SE, dim=-1).square()
    w_S = _weights(z_S, valid_S)
    (mean,) = _means([z_S.sum() if valid_S is None else torch.where(valid_S, z_S, 0).sum()], w_S.sum(), reduce)
    return mean
