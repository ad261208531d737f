"""MoE-ify a dense model: replace its dense FFN/MLP modules by SparseMoE or MH-MoE layers (upcycling).

Shape legend: T tokens, D model dim, F dense hidden, E experts, H MH-MoE heads, d = D/H, R routed rows.

Dense FFNs are recognised by their parts, not their class, so any model built the same way converts:
    mhmoe `DenseFFN`         fc_in, fc_out (nn.Linear; SwiGLU's fc_in holds [gate | up]), `activation`
    GPT-2 style MLP          c_fc, c_proj (transformers Conv1D, weight (in, out)) with biases, act, dropout
    Llama / Qwen / Mistral   gate_proj, up_proj, down_proj (nn.Linear, biases optional), act_fn:
                             down(act(gate(x)) · up(x))
Each becomes a `MoEFFN` (`mhmoe.convert.wrap`): it returns a tensor like the module it replaces (so the host
model's code is untouched) and keeps the `MoEOutput` of its last call; `moe_aux_loss(model)` sums their weighted
auxiliary losses, to add to the task loss after each forward (`moe_outputs(model)` gives the routing statistics).
FFNs inside MoE layers (shared experts) are not dense FFNs here; MoE models convert with `mhmoe.convert.peers`.

The converted experts are bias-free GELU / ReLU / SwiGLU experts. A dense FFN with biases (GPT-2) or another
activation (GPT-2's tanh GELU) gets an `ExpertExtras` runner: per-expert biases and the original activation
module, applied around the same grouped GEMMs (`SparseMoE.expert_runner`). Upcycled experts are then exact
copies of the dense FFN, biases included.

Initialisation (`init`):
    "upcycle" (default) SMoE: every expert a copy of the dense FFN (Komatsuzaki et al. 2023, sparse upcycling);
        the router is left random and its k gates renormalised to sum 1, so at initialisation the output equals
        the dense FFN's whatever the router picks (exact up to float rounding; tests/test_convert.py).
        MH-MoE: multi-head and merge layers set to the identity; expert e is the dense FFN restricted to head
        h = e mod H's slice of the model dim: input weights W_in[h·d:(h+1)·d, :], output weights
        W_out[:, h·d:(h+1)·d], hidden F (all units). A sub-token routed to an expert of its own head then
        gets the dense output with the other heads' input terms dropped; H = 1 is exactly the SMoE upcycling.
        This is an approximation (README: measured gap); `calibrate` then fits each layer to its dense FFN.
    "random": the layers' own initialisation (training from scratch inside the pretrained model).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhmoe.convert.peers import find_moe_blocks
from mhmoe.convert.wrap import MoEFFN, set_submodule
from mhmoe.layers.experts import DenseFFN
from mhmoe.layers.moe import MoELayer, SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.ops.backend import Backend, compute_dtype
from mhmoe.ops.grouped import expert_matmul
from mhmoe.ops.reference import ExpertWeights

Kind = Literal["smoe", "mhmoe"]
Init = Literal["upcycle", "random"]


@dataclass
class DenseWeights:
    """A dense FFN as y = act_glu(x @ w_in + b_in) @ w_out + b_out, weights in (in, out) layout."""

    w_in: Tensor  # (D, g·F), g = 2 for a GLU ([gate | up]), else 1
    b_in: Tensor | None  # (g·F,)
    w_out: Tensor  # (F, D)
    b_out: Tensor | None  # (D,)
    activation: str  # "gelu", "relu" or "swiglu" when our experts compute it exactly, else "custom"
    act: Callable[[Tensor], Tensor]  # the module's own activation (SiLU for a GLU gate)
    glu: bool
    dropout: nn.Module | None  # applied after the FFN by the original module (GPT-2)

    @property
    def d_model(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_out.shape[0]


def _activation_name(act: Callable, glu: bool) -> str:
    """Our expert activation that computes `act` exactly (same PyTorch op), or "custom"."""
    name = type(act).__name__
    if glu:
        return "swiglu" if isinstance(act, nn.SiLU) or name in ("SiLUActivation", "SiLU") or act is F.silu else "custom"
    if isinstance(act, nn.ReLU) or act is F.relu:
        return "relu"
    if (isinstance(act, nn.GELU) and act.approximate == "none") or name == "GELUActivation" or act is F.gelu:
        return "gelu"
    return "custom"


def dense_weights(module: nn.Module) -> DenseWeights | None:
    """The weights of a supported dense FFN module (see the module doc), or None for anything else."""
    if isinstance(module, DenseFFN):
        act = _ACTIVATION_FNS[module.activation]
        return DenseWeights(
            module.fc_in.weight.t(),
            module.fc_in.bias,
            module.fc_out.weight.t(),
            module.fc_out.bias,
            module.activation,
            F.silu if module.activation == "swiglu" else act,
            module.activation == "swiglu",
            None,
        )
    c_fc, c_proj, gpt2_act = (getattr(module, name, None) for name in ("c_fc", "c_proj", "act"))
    if _is_conv1d(c_fc) and _is_conv1d(c_proj) and callable(gpt2_act):
        dropout = getattr(module, "dropout", None)
        return DenseWeights(
            c_fc.weight,
            c_fc.bias,
            c_proj.weight,
            c_proj.bias,
            _activation_name(gpt2_act, False),
            gpt2_act,
            False,
            dropout if isinstance(dropout, nn.Dropout) else None,
        )
    gate, up, down, act_fn = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and callable(act_fn):
        if (gate.bias is None) != (up.bias is None):
            return None
        return DenseWeights(
            torch.cat([gate.weight.t(), up.weight.t()], dim=1),
            None if gate.bias is None or up.bias is None else torch.cat([gate.bias, up.bias]),
            down.weight.t(),
            down.bias,
            _activation_name(act_fn, True),
            act_fn,
            True,
            None,
        )
    return None


_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "swiglu": F.silu}


def _is_conv1d(module: Any) -> TypeGuard[Any]:
    """transformers' Conv1D (a linear layer with weight (in, out)), without importing transformers."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), Tensor)


def find_dense_ffns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every supported dense FFN in `model`, outermost first, none nested in another
    and none inside a MoE layer (the shared experts of SparseMoE, Qwen2-MoE or DeepSeek-V3 stay as they are)."""
    moe = [n for n, m in model.named_modules() if isinstance(m, (MoELayer, MoEFFN))]
    moe += [n for n, _ in find_moe_blocks(model)]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name == outer or name.startswith(f"{outer}.") for outer in [*moe, *(n for n, _ in found)]):
            continue
        if name and dense_weights(module) is not None:
            found.append((name, module))
    return found


class ExpertExtras(nn.Module):
    """An `ExpertRunner` adding what bias-free GELU/ReLU/SwiGLU experts lack: per-expert biases and any
    activation module. Expert e computes act_glu(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e] with the
    experts' stacked weights and the same grouped GEMMs as the default runner.

    b_in: (E, g·F) or None; b_out: (E, d) or None; act: the activation (the gate's, for a GLU).
    """

    def __init__(self, num_experts: int, act: Callable, glu: bool, b_in: Tensor | None, b_out: Tensor | None):
        super().__init__()
        self.num_experts, self.act, self.glu = num_experts, act, glu
        self.b_in = None if b_in is None else nn.Parameter(b_in.detach().clone())
        self.b_out = None if b_out is None else nn.Parameter(b_out.detach().clone())

    def forward(
        self, x_Rd: Tensor, counts_E: Tensor, experts: ExpertWeights, backend: Backend, recompute: bool
    ) -> Tensor:
        if recompute:
            raise ValueError("recompute is not supported for converted experts with biases (ExpertExtras)")
        dtype = compute_dtype(x_Rd)
        w_in, w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
        if x_Rd.shape[0] == 0:  # grouped_mm cannot differentiate empty inputs: zero gradients instead
            return x_Rd.to(dtype) + 0 * sum(p.sum() for p in (w_in, w_out, *self.parameters()))
        ends_E = counts_E.cumsum(0)
        expert_R = torch.searchsorted(ends_E, torch.arange(x_Rd.shape[0], device=x_Rd.device), right=True)
        h_RF = expert_matmul(x_Rd.to(dtype), w_in, counts_E, backend)
        if self.b_in is not None:
            h_RF = h_RF + self.b_in.to(dtype).index_select(0, expert_R)
        if self.glu:
            gate_RF, up_RF = h_RF.chunk(2, dim=-1)
            h_RF = self.act(gate_RF) * up_RF
        else:
            h_RF = self.act(h_RF)
        y_Rd = expert_matmul(h_RF, w_out, counts_E, backend)
        if self.b_out is not None:
            y_Rd = y_Rd + self.b_out.to(dtype).index_select(0, expert_R)
        return y_Rd


def _build_layer(kind: Kind, dense: DenseWeights, num_experts: int, top_k: int, **kwargs: Any) -> MoELayer:
    activation = dense.activation if dense.activation != "custom" else ("swiglu" if dense.glu else "gelu")
    if not dense.glu and activation == "swiglu":
        raise ValueError("a non-GLU dense FFN cannot become SwiGLU experts")
    common = dict(d_model=dense.d_model, num_experts=num_experts, top_k=top_k, activation=activation, **kwargs)
    common.setdefault("expert_hidden", dense.hidden)
    if kind == "smoe":
        return SparseMoE(**common)
    if kind == "mhmoe":
        return MHMoE(**common)
    raise ValueError(f"unknown MoE kind {kind!r}; choose 'smoe' or 'mhmoe'")


def _upcycle(layer: MoELayer, dense: DenseWeights) -> None:
    """Load the dense FFN into `layer` (see the module doc: copies for SMoE, head slices for MH-MoE)."""
    moe = layer.routed
    if moe.expert_hidden != dense.hidden:
        raise ValueError(
            f"upcycling copies the dense FFN, so expert_hidden must equal its hidden width {dense.hidden}, "
            f"got {moe.expert_hidden}; pass init='random' for other sizes"
        )
    heads = layer.num_heads
    if isinstance(layer, MHMoE):
        for proj in (layer.multi_head_layer, layer.merge_layer):
            if not isinstance(proj, nn.Linear):
                raise ValueError("MH-MoE upcycling needs exactly one multi-head and one merge layer")
            with torch.no_grad():
                proj.weight.copy_(torch.eye(proj.in_features))
                proj.bias.zero_()
    d = dense.d_model // heads
    E = moe.num_experts
    slices = [slice((e % heads) * d, (e % heads + 1) * d) for e in range(E)]
    with torch.no_grad():
        for e, rows in enumerate(slices):
            moe.experts.w_in[e].copy_(dense.w_in[rows])
            moe.experts.w_out[e].copy_(dense.w_out[:, rows])
    extras = moe.expert_runner
    if isinstance(extras, ExpertExtras):
        with torch.no_grad():
            if extras.b_in is not None and dense.b_in is not None:
                extras.b_in.copy_(dense.b_in.expand(E, -1))
            if extras.b_out is not None and dense.b_out is not None:
                extras.b_out.copy_(torch.stack([dense.b_out[rows] for rows in slices]))


def _add_extras(layer: MoELayer, dense: DenseWeights) -> None:
    """Give the experts the dense FFN's kind of biases (zero) and its activation, when ours lack them."""
    if dense.activation != "custom" and dense.b_in is None and dense.b_out is None:
        return
    moe = layer.routed
    E, d = moe.num_experts, moe.d_model
    b_in = None if dense.b_in is None else dense.w_in.new_zeros(E, moe.experts.w_in.shape[-1])
    b_out = None if dense.b_out is None else dense.w_in.new_zeros(E, d)
    moe.expert_runner = ExpertExtras(E, dense.act, dense.glu, b_in, b_out)


def _router_kwargs(router: str, router_kwargs: dict | None, init: Init) -> dict | None:
    """Upcycling needs the k gates to sum to 1 (identical experts then give the dense output)."""
    router_kwargs = dict(router_kwargs or {})
    if init == "upcycle":
        if router == "switch":
            raise ValueError(
                "router='switch' gates by the expert's probability (< 1), so upcycling is not exact; "
                "use 'softmax' with top_k=1"
            )
        router_kwargs.setdefault("renormalize", True)
    return router_kwargs or None


def moeify(
    model: nn.Module,
    kind: Kind = "smoe",
    *,
    num_experts: int = 8,
    top_k: int = 2,
    every: int = 1,
    init: Init = "upcycle",
    router: str = "softmax",
    router_kwargs: dict | None = None,
    only: Callable[[str], bool] | None = None,
    **layer_kwargs: Any,
) -> list[str]:
    """Replace dense FFNs of `model` in place by `MoEFFN(SparseMoE | MHMoE)`; return the replaced names.

    every: convert the every-th FFN (1-based: every=2 converts the 2nd, 4th, …, as the paper places MoE);
    only: a predicate on the qualified name, applied first. layer_kwargs go to SparseMoE / MHMoE (num_heads,
    expert_hidden, capacity_factor, balance_loss_coef, …); expert_hidden defaults to the dense hidden width.
    The new layers take the dtype and device of the dense weights they replace.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if init not in ("upcycle", "random"):
        raise ValueError(f"unknown init {init!r}; choose 'upcycle' or 'random'")
    ffns = [(n, m) for n, m in find_dense_ffns(model) if only is None or only(n)]
    if not ffns:
        raise ValueError(
            f"no dense FFN found in {type(model).__name__}: supported are mhmoe DenseFFN, GPT-2 style MLPs "
            "(c_fc/c_proj) and Llama/Qwen style MLPs (gate_proj/up_proj/down_proj)"
        )
    replaced = []
    kwargs = dict(layer_kwargs, router=router, router_kwargs=_router_kwargs(router, router_kwargs, init))
    for i, (name, module) in enumerate(ffns):
        if (i + 1) % every:
            continue
        dense = dense_weights(module)
        assert dense is not None
        layer = _build_layer(kind, dense, num_experts, top_k, **kwargs).to(dense.w_in)
        _add_extras(layer, dense)
        if init == "upcycle":
            _upcycle(layer, dense)
        set_submodule(model, name, MoEFFN(layer, copy.deepcopy(dense.dropout)))
        replaced.append(name)
    return replaced
