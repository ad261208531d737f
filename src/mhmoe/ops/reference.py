"""The obviously correct loops every fast path is tested against: one expert at a time, one assignment at a time.

Shape legend: S routed items, d their width, K top-k, E experts.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mhmoe.ops.activations import ffn


class ExpertWeights(Protocol):
    """E stacked expert FFNs: w_in (E, d, glu_factor·F), w_out (E, F, d) and their activation name; biases
    b_in (E, glu_factor·F) and b_out (E, d) are optional attributes (`expert_biases`)."""

    @property
    def w_in(self) -> Tensor: ...
    @property
    def w_out(self) -> Tensor: ...
    @property
    def activation(self) -> str: ...


def expert_biases(experts: ExpertWeights) -> tuple[Tensor | None, Tensor | None]:
    """(b_in, b_out) of experts that may have none (an object without the attributes has no biases)."""
    return getattr(experts, "b_in", None), getattr(experts, "b_out", None)


def capacity_keep_reference(
    top_experts_SK: Tensor, capacity: int, num_experts: int, valid_S: Tensor | None, group_size: int | None = None
) -> Tensor:
    """Loop form of `capacity_keep`, for tests."""
    S, K = top_experts_SK.shape
    keep = torch.zeros(S, K, dtype=torch.bool)
    L = group_size or max(S, 1)
    for start in range(0, S, L):  # each group on its own
        used = [0] * num_experts
        for k in range(K):
            for s in range(start, min(start + L, S)):
                if valid_S is not None and not valid_S[s]:
                    continue
                e = int(top_experts_SK[s, k])
                if used[e] < capacity:
                    keep[s, k] = True
                    used[e] += 1
    return keep.to(top_experts_SK.device)


def dispatch_reference(x_Sd: Tensor, experts: ExpertWeights, top_experts_SK: Tensor, gates_SK: Tensor) -> Tensor:
    """y_s = Σ_k gates[s, k] · expert_{top[s, k]}(x_s), one expert at a time. (S, d) -> (S, d)."""
    y_Sd = torch.zeros(x_Sd.shape, dtype=gates_SK.dtype, device=x_Sd.device)
    E = experts.w_in.shape[0]
    # unbind once: indexing w[e] per expert would make backward add E full-size zero gradients
    b_in, b_out = (b.unbind(0) if b is not None else [None] * E for b in expert_biases(experts))
    for e, (w_in, w_out) in enumerate(zip(experts.w_in.unbind(0), experts.w_out.unbind(0))):
        s_N, k_N = torch.nonzero(top_experts_SK == e, as_tuple=True)
        out_Nd = ffn(x_Sd[s_N], w_in, w_out, experts.activation, b_in[e], b_out[e])
        y_Sd = y_Sd.index_add(0, s_N, gates_SK[s_N, k_N, None] * out_Nd)
    return y_Sd.to(x_Sd.dtype)
