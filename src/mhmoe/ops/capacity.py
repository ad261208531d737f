"""Expert capacity (GShard): which routed assignments an expert keeps when it may take at most C of them.

Shape legend: S routed items, K top-k, E experts, G groups of L consecutive items. Assignments are ranked
choice-major (all first choices before second choices), so a capacity drops second choices before first ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_capacity(
    capacity_factor: float, num_items: int, top_k: int, num_experts: int, per_choice: bool = False
) -> int:
    """Rows each expert may take, at least 1: ceil(capacity_factor · K · S / E), or with `per_choice`
    K · ceil(capacity_factor · S / E) (fairseq's top-k gate, the MH-MoE authors' code)."""
    rows = capacity_factor * (num_items / num_experts if per_choice else top_k * num_items / num_experts)
    if not rows < 2**62:  # inf, or past what an int64 tensor compares with
        raise ValueError(
            f"capacity_factor={capacity_factor} overflows the capacity (K={top_k}, S={num_items}, E={num_experts}); "
            f"c = E/K = {num_experts / top_k:g} already keeps every assignment: use it, or None (dropless)"
        )
    if per_choice:
        return max(1, top_k * math.ceil(capacity_factor * num_items / num_experts))
    return max(1, math.ceil(capacity_factor * top_k * num_items / num_experts))


def capacity_keep(
    top_experts_SK: Tensor, capacity: int, num_experts: int, valid_S: Tensor | None, group_size: int | None = None
) -> Tensor:
    """(S, K) bool: assignments within their expert's capacity, first choices before second (GShard).

    Invalid (padding) items take no capacity and are not kept. group_size: None shares the capacity among all
    S items; L gives each run of L consecutive items (a sequence) its own capacity C per expert.
    """
    S, K = top_experts_SK.shape
    expert_R = top_experts_SK.t().reshape(-1)
    if group_size is not None:  # expert e of group g becomes bucket g·E + e
        group_R = (torch.arange(S, device=expert_R.device) // group_size).repeat(K)
        expert_R = group_R * num_experts + expert_R
        num_experts = num_experts * -(-S // group_size)
    if valid_S is not None:
        expert_R = torch.where(valid_S.repeat(K), expert_R, num_experts)  # padding sorts last
    order_R = torch.argsort(expert_R, stable=True)
    sorted_expert_R = expert_R[order_R]
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_R.device)
    counts.scatter_add_(0, expert_R, torch.ones_like(expert_R))
    starts = counts.cumsum(0) - counts
    position_R = torch.arange(K * S, device=expert_R.device) - starts[sorted_expert_R]
    keep_sorted_R = (position_R < capacity) & (sorted_expert_R < num_experts)
    keep_R = torch.empty_like(keep_sorted_R).scatter_(0, order_R, keep_sorted_R)
    return keep_R.view(K, S).t()
