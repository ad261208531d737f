"""Feed-forward experts: the dense baseline `DenseFFN` and `Experts`, E FFNs stored stacked.

Shape legend: T tokens, D model dim, d expert input dim, F expert hidden, E experts, R routed rows.
A GLU activation (SwiGLU) doubles the first projection: its output holds [gate | up] halves
(`mhmoe.ops.activations`).

Experts have no biases (as in Mixtral, DeepSeek, Qwen and OLMoE MoEs): a bias would cost one
(R, F) gather per call on the fast path for no measured gain.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mhmoe.ops.activations import Activation, activate, check_activation, ffn, glu_factor


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class DenseFFN(nn.Module):
    """The dense baseline: D -> F -> D with GELU/ReLU, or SwiGLU (`fc_in` holds [gate | up]).

    Returns a plain tensor of the input's shape, like any FFN.
    """

    def __init__(self, *, d_model: int, hidden: int, activation: Activation = "gelu", bias: bool = False):
        super().__init__()
        check_positive(d_model=d_model, hidden=hidden)
        check_activation(activation)
        self.d_model, self.hidden, self.activation, self.bias = d_model, hidden, activation, bias
        self.fc_in = nn.Linear(d_model, glu_factor(activation) * hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(activate(self.fc_in(x), self.activation))


class Experts(nn.Module):
    """E independent FFNs d -> F -> d, weights stacked for grouped GEMMs.

    w_in: (E, d, glu_factor·F), w_out: (E, F, d); expert e computes act(x @ w_in[e]) @ w_out[e].
    Initialised like `nn.Linear` (uniform in ±1/sqrt(fan_in)), so an expert and a `DenseFFN`
    start from the same distribution.
    """

    def __init__(self, *, num_experts: int, d_model: int, hidden: int, activation: Activation = "gelu"):
        super().__init__()
        check_positive(num_experts=num_experts, d_model=d_model, hidden=hidden)
        check_activation(activation)
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, glu_factor(activation) * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w_in, self.d_model), (self.w_out, self.hidden)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def expert(self, e: int, x_Nd: Tensor) -> Tensor:
        """Expert e on rows x_Nd (N, d) -> (N, d)."""
        return ffn(x_Nd, self.w_in[e], self.w_out[e], self.activation)

    def load_dense(self, e: int, ffn: DenseFFN) -> None:
        """Copy a bias-free `DenseFFN` of matching shape into expert e (for tests and upcycling)."""
        if ffn.bias or (ffn.d_model, ffn.hidden, ffn.activation) != (self.d_model, self.hidden, self.activation):
            raise ValueError(
                f"DenseFFN(d_model={ffn.d_model}, hidden={ffn.hidden}, activation={ffn.activation!r}, "
                f"bias={ffn.bias}) does not fit experts of d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation!r} without bias"
            )
        with torch.no_grad():
            self.w_in[e].copy_(ffn.fc_in.weight.t())
            self.w_out[e].copy_(ffn.fc_out.weight.t())
