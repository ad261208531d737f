"""Expert activations and their gradients, written once for every expert implementation.

Shape legend: N rows, d row width, F hidden width. A GLU activation (SwiGLU) doubles the first projection:
its output holds [gate | up] halves, so `glu_factor` says how many F-wide outputs the first projection has.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["gelu", "relu", "swiglu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def glu_factor(activation: str) -> int:
    """How many hidden-width outputs the first projection has: 2 for SwiGLU ([gate | up]), else 1."""
    return 2 if activation == "swiglu" else 1


def activate(h: Tensor, activation: str) -> Tensor:
    """(..., glu_factor·F) -> (..., F)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    return F.relu(h)


def activate_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """The gradient of `activate` at h: (..., F) grad of its output -> (..., glu_factor·F) grad of h."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return grad * (h > 0)


def ffn(x_Nd: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """act(x @ w_in) @ w_out for one expert's weights: (N, d) -> (N, d)."""
    return activate(x_Nd @ w_in, activation) @ w_out
