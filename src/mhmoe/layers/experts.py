"""Feed-forward experts: the dense baseline `DenseFFN` and `Experts`, E FFNs stored stacked.

Shape legend: T tokens, D model dim, d expert input dim, F expert hidden, E experts, R routed rows.
A GLU activation (SwiGLU, GeGLU, ReGLU) doubles the first projection: its output holds [gate | up] halves
(`mhmoe.ops.activations`).

Experts have no biases by default (as in Mixtral, DeepSeek, Qwen and OLMoE MoEs); `bias=True` adds b_in and
b_out per expert (as the authors' code without --no-bias, and GPT-2 style FFNs), which the sorted path adds
after each grouped GEMM: one (R, F) and one (R, d) gather per call.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mhmoe.ops.activations import Activation, activate, check_activation, ffn, glu_factor


def integer(value: Any) -> Any:
    """A numpy (or any `numbers.Integral`) integer as a Python int, so sizes and saved configs hold plain ints;
    anything else unchanged, for the checks to refuse."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


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
        d_model, hidden = integer(d_model), integer(hidden)
        check_positive(d_model=d_model, hidden=hidden)
        check_activation(activation)
        self.d_model, self.hidden, self.activation, self.bias = d_model, hidden, activation, bias
        self.fc_in = nn.Linear(d_model, glu_factor(activation) * hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(activate(self.fc_in(x), self.activation))


class Experts(nn.Module):
    """E independent FFNs d -> F -> d, weights stacked for grouped GEMMs.

    w_in: (E, d, glu_factor·F), w_out: (E, F, d); with bias, b_in: (E, glu_factor·F) and b_out: (E, d)
    (else None). Expert e computes act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e].
    Initialised like `nn.Linear` (uniform in ±1/sqrt(fan_in)), so an expert and a `DenseFFN`
    start from the same distribution.
    """

    b_in: nn.Parameter | None
    b_out: nn.Parameter | None

    def __init__(
        self, *, num_experts: int, d_model: int, hidden: int, activation: Activation = "gelu", bias: bool = False
    ):
        super().__init__()
        num_experts, d_model, hidden = integer(num_experts), integer(d_model), integer(hidden)
        check_positive(num_experts=num_experts, d_model=d_model, hidden=hidden)
        check_activation(activation)
        self.num_experts, self.d_model, self.hidden, self.activation = num_experts, d_model, hidden, activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, glu_factor(activation) * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.b_in = nn.Parameter(torch.empty(num_experts, glu_factor(activation) * hidden)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    @property
    def bias(self) -> bool:
        return self.b_in is not None

    def forward(self, compute: Callable[[Experts], Tensor]) -> Tensor:
        """compute(self): the owning layer's dispatch of its routed rows through these experts. The layer calls the
        module rather than reading its weights from outside so that module wrappers act on the call: PEFT's LoRA on
        the stacked weights (`LoraConfig(target_parameters=["experts.w_in", "experts.w_out"])`) adds its low-rank
        update to w_in / w_out for the duration of the call."""
        return compute(self)

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w_in, self.d_model), (self.w_out, self.hidden)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b, fan_in in ((self.b_in, self.d_model), (self.b_out, self.hidden)):
            if b is not None:  # after the weights: bias-free experts draw the same numbers as before
                nn.init.uniform_(b, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def expert(self, e: int, x_Nd: Tensor) -> Tensor:
        """Expert e on rows x_Nd (N, d) -> (N, d)."""
        b_in, b_out = (None if b is None else b[e] for b in (self.b_in, self.b_out))
        return ffn(x_Nd, self.w_in[e], self.w_out[e], self.activation, b_in, b_out)

    def load_dense(self, e: int, ffn: DenseFFN) -> None:
        """Copy a `DenseFFN` of matching shape (and bias) into expert e (for tests and upcycling)."""
        mine = (self.d_model, self.hidden, self.activation, self.bias)
        if (ffn.d_model, ffn.hidden, ffn.activation, ffn.bias) != mine:
            raise ValueError(
                f"DenseFFN(d_model={ffn.d_model}, hidden={ffn.hidden}, activation={ffn.activation!r}, "
                f"bias={ffn.bias}) does not fit experts of d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation!r}, bias={self.bias}"
            )
        with torch.no_grad():
            self.w_in[e].copy_(ffn.fc_in.weight.t())
            self.w_out[e].copy_(ffn.fc_out.weight.t())
            if self.b_in is not None and self.b_out is not None:
                self.b_in[e].copy_(ffn.fc_in.bias)
                self.b_out[e].copy_(ffn.fc_out.bias)
