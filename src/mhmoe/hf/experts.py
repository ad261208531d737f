"""mhmoe as a transformers experts implementation: after `import mhmoe.hf`,
`from_pretrained(..., experts_implementation="mhmoe")` runs the experts of every transformers model whose experts
class is decorated with `@use_experts_implementation` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, ...)
through mhmoe's sorted grouped-GEMM path (`mhmoe.ops.sorted.dispatch_sorted`); `"mhmoe_triton"` runs them
through the Triton kernels (CUDA; the CPU under TRITON_INTERPRET=1).

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden, g = 2 for gated (GLU) experts, else 1.

transformers' layout (the decorator's flags)                     ours (`ExpertWeights`)
    gate_up_proj (E, g·F, D), [gate; up]; up_proj without a gate     w_in  (E, D, g·F)  a transposed view
        is_transposed: (E, D, g·F)                                                     the tensor itself
    down_proj (E, D, F); is_transposed: (E, F, D)                     w_out (E, F, D)
    gate_up_proj_bias / up_proj_bias (E, g·F), down_proj_bias (E, D)  b_in, b_out
Views, never copies, so the gradients reach transformers' own parameters. The router stays transformers': this
module sees the experts' call `(hidden_states_TD, top_k_index_TK, top_k_weights_TK) -> (T, D)` only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate

from mhmoe.errors import UserError
from mhmoe.ops.activations import Activation, activation_of_module
from mhmoe.ops.backend import compute_dtype, resolve_backend
from mhmoe.ops.sorted import dispatch_sorted

# experts_implementation name -> the dispatch it asks `resolve_backend` for
IMPLEMENTATIONS: dict[str, str] = {"mhmoe": "auto", "mhmoe_triton": "triton"}
HANDLED = (
    "experts_implementation='mhmoe' handles experts with [gate; up] concatenated (or no gate), stored either way "
    "round (is_transposed), with or without biases, gated by act(gate)·up with act silu, gelu or relu, without a "
    "post-expert norm and without expert parallelism"
)


class ExpertsLayoutError(UserError, ValueError):
    """An experts module laid out in a way the mhmoe implementation does not handle."""


@dataclass(frozen=True)
class HFExperts:
    """A transformers experts module's weights seen in mhmoe's layout (`mhmoe.ops.reference.ExpertWeights`)."""

    w_in: Tensor  # (E, D, g·F)
    w_out: Tensor  # (E, F, D)
    activation: Activation
    b_in: Tensor | None = None  # (E, g·F)
    b_out: Tensor | None = None  # (E, D)


_FLAGS = ("has_gate", "is_concatenated", "is_transposed", "has_bias", "has_post_expert_norm")


def _unhandled(module: nn.Module) -> str | None:
    """Why `hf_experts` cannot read this module, or None."""
    flags = {n: getattr(module, n, None) for n in _FLAGS}
    if None in flags.values():
        return "it is not a transformers experts module (no use_experts_implementation flags)"
    if flags["has_gate"] and not flags["is_concatenated"]:
        return "its gate and up rows are interleaved"
    if flags["has_gate"] and getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return "it gates with its own _apply_gate"
    if flags["has_post_expert_norm"]:
        return "it has a post-expert norm"
    if getattr(module, "_is_expert_parallel", False):
        return "it runs under expert parallelism"
    act = getattr(module, "act_fn", None)
    if activation_of_module(act, glu=bool(flags["has_gate"])) is None:
        return f"its activation {type(act).__name__} has no exact counterpart here"
    return None


def hf_experts(module: nn.Module) -> HFExperts:
    """The weights of an experts module decorated with transformers' `use_experts_implementation`, as views.

    Raises ExpertsLayoutError (one line naming what is handled) for any other layout."""
    problem = _unhandled(module)
    activation = activation_of_module(getattr(module, "act_fn", None), glu=bool(getattr(module, "has_gate", 0)))
    if problem is not None or activation is None:
        raise ExpertsLayoutError(f"{type(module).__name__}: {problem}; {HANDLED}")
    first = "gate_up_proj" if module.has_gate else "up_proj"
    w_in: Tensor = module.get_parameter(first)
    w_out: Tensor = module.get_parameter("down_proj")
    if not module.is_transposed:  # (E, n, k) -> (E, k, n)
        w_in, w_out = w_in.transpose(-1, -2), w_out.transpose(-1, -2)
    if not module.has_bias:
        return HFExperts(w_in, w_out, activation)
    return HFExperts(
        w_in, w_out, activation, module.get_parameter(f"{first}_bias"), module.get_parameter("down_proj_bias")
    )


def mhmoe_experts_forward(
    module: nn.Module, hidden_states_TD: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor, *, dispatch: str
) -> Tensor:
    """The experts' forward of transformers' contract, Σ_k weight_{t,k} · expert_{index_{t,k}}(x_t): (T, D)."""
    experts = hf_experts(module)
    if dispatch == "triton" and experts.b_in is not None:
        raise ExpertsLayoutError(
            f"{type(module).__name__} has expert biases, which the Triton kernels lack; use "
            f"experts_implementation='mhmoe'"
        )
    dims = (experts.w_in.shape[1], experts.w_out.shape[1])  # (D, F): grouped_mm's rows must be 16-byte multiples
    rows_per_expert = top_k_index_TK.numel() / experts.w_in.shape[0]  # < 1 when decoding: see resolve_backend
    backend = resolve_backend(dispatch, compute_dtype(hidden_states_TD), hidden_states_TD.device, dims, rows_per_expert)
    return dispatch_sorted(hidden_states_TD, experts, top_k_index_TK, top_k_weights_TK, backend)


def register() -> None:
    """Register "mhmoe" and "mhmoe_triton" in transformers' experts registry (idempotent)."""
    for name, dispatch in IMPLEMENTATIONS.items():
        ALL_EXPERTS_FUNCTIONS.register(name, functools.partial(mhmoe_experts_forward, dispatch=dispatch))
