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
    probs_SE: Tensor,
    choices_SC: Tensor,
    valid_S: Tensor | None = None,
    reduce: Reduce | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Switch/GShard load-balancing loss: E · Σ_e mean_s(p_se) · frac_s(e) (docs/paper-notes.md §2.9).

    choices_SC: (S,) or (S, C) chosen experts; frac_s(e) counts every column, so it sums to C: pass each
    item's first choice (Switch, GShard, v1: the loss is 1 when routing is uniform or the load even) or all K
    choices (transformers' Mixtral / Qwen-MoE / OLMoE `load_balancing_loss_func`: uniform routing gives K).
    The gradient flows through p only. With `reduce`, both means run over the whole (global) batch.
    group_size: None takes the means over all S items; L computes the loss on each run of L consecutive items
    (a sequence: Switch Transformers, DeepSeek-V3's sequence-wise loss) and returns the mean over the
    sequences that have a valid item.
    """
    num_experts = probs_SE.shape[-1]
    choices_SC = choices_SC.unsqueeze(-1) if choices_SC.dim() == 1 else choices_SC
    w_S = _weights(probs_SE, valid_S)
    if group_size is not None:
        return _sequence_balance_loss(probs_SE, choices_SC, w_S, reduce, group_size)
    prob_sum_E = probs_SE.sum(0) if valid_S is None else torch.where(valid_S.unsqueeze(-1), probs_SE, 0).sum(0)
    w_R = w_S if choices_SC.shape[1] == 1 else w_S.repeat_interleave(choices_SC.shape[1])
    count_E = torch.zeros_like(prob_sum_E).scatter_add_(0, choices_SC.reshape(-1), w_R)  # no (S, E) one-hot
    mean_prob_E, frac_E = _means([prob_sum_E, count_E.detach()], w_S.sum(), reduce)
    return num_experts * (mean_prob_E * frac_E).sum()


def _sequence_balance_loss(
    probs_SE: Tensor, choices_SC: Tensor, w_S: Tensor, reduce: Reduce | None, group_size: int
) -> Tensor:
    """`balance_loss` on each group of `group_size` consecutive items (G groups), averaged over the groups
    with a valid item: E · mean_g Σ_e mean_{s∈g}(p_se) · frac_{s∈g}(e)."""
    (S, E), C = probs_SE.shape, choices_SC.shape[1]
    G = S // group_size
    group_S = torch.arange(S, device=probs_SE.device) // group_size
    prob_sum_GE = torch.where(w_S.unsqueeze(-1) > 0, probs_SE, 0).view(G, group_size, E).sum(1)  # NaN-safe
    slot_R = (group_S.unsqueeze(-1) * E + choices_SC).reshape(-1)
    count_GE = probs_SE.new_zeros(G * E).scatter_add_(0, slot_R, w_S.repeat_interleave(C)).view(G, E)
    items_G1 = w_S.view(G, group_size).sum(1, keepdim=True)
    loss_G = E * ((prob_sum_GE / items_G1.clamp_min(1)) * (count_GE.detach() / items_G1.clamp_min(1))).sum(-1)
    has_items_G = (items_G1.squeeze(-1) > 0).to(loss_G.dtype)
    (mean,) = _means([(loss_G * has_items_G).sum()], has_items_G.sum(), reduce)
    return mean


def pool_balance_loss(
    probs_PSE: Tensor, choices_PSC: Tensor, valid_PS: Tensor | None = None, reduce: Reduce | None = None
) -> Tensor:
    """`balance_loss` of each of P pools of experts (a router per pool, `HeadRouters`) on its own items, averaged over
    the pools that have a valid item: probs_PSE (P, S, E) each pool's items' probabilities over its own E experts,
    choices_PSC (P, S, C) in 0 … E−1. With `reduce`, each pool's means run over its items in the whole batch (one
    reduce call for all pools), so a pool's loss is the one over the global batch however the batch is split."""
    P, S, E = probs_PSE.shape
    C = choices_PSC.shape[-1]
    w_PS = _weights(probs_PSE.reshape(P * S, E), None if valid_PS is None else valid_PS.reshape(-1)).view(P, S)
    prob_sum_PE = torch.where(w_PS.unsqueeze(-1) > 0, probs_PSE, 0).sum(1)  # NaN-safe
    slot_R = (torch.arange(P, device=probs_PSE.device).view(P, 1, 1) * E + choices_PSC).reshape(-1)
    count_PE = probs_PSE.new_zeros(P * E).scatter_add_(0, slot_R, w_PS.repeat_interleave(C, dim=1).reshape(-1))
    stats = [prob_sum_PE, count_PE.view(P, E).detach(), w_PS.sum(1)]
    if reduce is not None:
        packed = reduce(torch.cat([t.reshape(-1) for t in stats]))
        stats = [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in stats]), stats)]
    prob_sum_PE, count_PE, items_P = stats
    per_item_P1 = items_P.clamp_min(1).unsqueeze(-1)
    loss_P = E * ((prob_sum_PE / per_item_P1) * (count_PE / per_item_P1)).sum(-1)
    has_items_P = (items_P > 0).to(loss_P.dtype)
    return (loss_P * has_items_P).sum() / has_items_P.sum().clamp_min(1)


def z_loss(logits_SE: Tensor, valid_S: Tensor | None = None, reduce: Reduce | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)² — keeps router logits small."""
    z_S = torch.logsumexp(logits_SE, dim=-1).square()
    w_S = _weights(z_S, valid_S)
    (mean,) = _means([z_S.sum() if valid_S is None else torch.where(valid_S, z_S, 0).sum()], w_S.sum(), reduce)
    return mean
