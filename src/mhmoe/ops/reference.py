"""The obviously correct loops every fast path is tested against: one expert at a time, one assignment at a time.

Shape legend: S routed items, d their width, K top-k, E experts.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mhmoe.ops.activations import ffn


class ExpertWeights(Protocol):
    """E stacked expert FFNs: w_in (E, d, glu_factor·F), w_out (E, F, d) and their activation name."""

    @property
    def w_in(self) -> Tensor: ...
    @property
    def w_out(self) -> Tensor: ...
    @property
    def activation(self) -> str: ...


def capacity_keep_reference(top_experts_SK: Tensor, capacity: int, num_experts: int, valid_S: Tensor | None) -> Tensor:
    """Loop form of `capacity_keep`, for tests."""
    S, K = top_experts_SK.shape
    keep = torch.zeros(S, K, dtype=torch.bool)
    used = [0] * num_experts
    for k in range(K):
        for s in range(S):
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
    # unbind once: indexing w[e] per expert would make backward add E full-size zero gradients
    for e, (w_in, w_out) in enumerate(zip(experts.w_in.unbind(0), experts.w_out.unbind(0))):
        s_N, k_N = torch.nonzero(top_experts_SK == e, as_tuple=True)
        out_Nd = ffn(x_Sd[s_N], w_in, w_out, experts.activation)
        y_Sd = y_Sd.index_add(0, s_N, gates_SK[s_N, k_N, None] * out_Nd)
    return y_Sd.to(x_Sd.dtype)
