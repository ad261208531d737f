"""Expert activations and their gradients, written once for every expert implementation.

Shape legend: N rows, d row width, F hidden width. A GLU activation (Shazeer 2020, "GLU variants") doubles the
first projection: its output holds [gate | up] halves and the hidden is act(gate) · up, so `glu_factor` says how
many F-wide outputs the first projection has. The plain activations and their GLU forms:

    plain   GLU      hidden
    gelu    geglu    gelu(gate) · up
    relu    reglu    relu(gate) · up      (the authors' code's "relu" expert; docs/paper-notes.md §2.4)
    silu    swiglu   silu(gate) · up      (Llama, Mixtral, Qwen-MoE, OLMoE, DeepSeek)
    relu2   -        relu(h)²             (squared ReLU, So et al. 2021: NemotronH's experts; plain only)
"""

from __future__ import annotations

from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = Literal["gelu", "relu", "silu", "relu2", "swiglu", "geglu", "reglu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
GLU_GATES: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}  # GLU form -> its gate's activation


# The activation modules of torch and transformers with an exact counterpart here, by class name (a
# tanh-approximated GELU, `nn.GELU(approximate="tanh")` or transformers' "gelu_new", has none).
_MODULE_NAMES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}


def activation_of_module(module: object, glu: bool) -> Activation | None:
    """The name here of a torch / transformers activation module (its GLU form with glu), or None when it has no
    exact counterpart. Matched by class name, exactly: a subclass may compute something else."""
    name = _MODULE_NAMES.get(type(module).__name__)
    if name is None or getattr(module, "approximate", "none") != "none":
        return None
    if not glu:
        return cast(Activation, name)
    glu_name = {gate: glu_form for glu_form, gate in GLU_GATES.items()}.get(name)  # relu2 has no GLU form
    return None if glu_name is None else cast(Activation, glu_name)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def glu_factor(activation: str) -> int:
    """How many hidden-width outputs the first projection has: 2 for a GLU ([gate | up]), else 1."""
    return 2 if activation in GLU_GATES else 1


def _plain(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    if activation == "relu2":
        return F.relu(h).square()
    return F.relu(h)


def _plain_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    if activation == "relu2":
        return grad * 2 * F.relu(h)
    return grad * (h > 0)


def activate(h: Tensor, activation: str) -> Tensor:
    """(..., glu_factor·F) -> (..., F)."""
    gate_activation = GLU_GATES.get(activation)
    if gate_activation is not None:
        gate, up = h.chunk(2, dim=-1)
        return _plain(gate, gate_activation) * up
    return _plain(h, activation)


def activate_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """The gradient of `activate` at h: (..., F) grad of its output -> (..., glu_factor·F) grad of h."""
    gate_activation = GLU_GATES.get(activation)
    if gate_activation is not None:
        gate, up = h.chunk(2, dim=-1)
        grad_gate = _plain_backward(grad * up, gate, gate_activation)
        return torch.cat([grad_gate, grad * _plain(gate, gate_activation)], dim=-1)
    return _plain_backward(grad, h, activation)


def ffn(
    x_Nd: Tensor, w_in: Tensor, w_out: Tensor, activation: str, b_in: Tensor | None = None, b_out: Tensor | None = None
) -> Tensor:
    """act(x @ w_in + b_in) @ w_out + b_out for one expert's weights (biases optional): (N, d) -> (N, d)."""
    h = x_Nd @ w_in if b_in is None else x_Nd @ w_in + b_in
    y = activate(h, activation) @ w_out
    return y if b_out is None else y + b_out
