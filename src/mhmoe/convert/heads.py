"""MoE → MH-MoE: an existing sparse MoE layer (this library's, or a transformers block swapped in by
`mhmoe.convert.peers`) becomes an MH-MoE layer with head and merge layers and sub-token experts.

Shape legend: D model dim, H heads, d = D/H, E experts of the SMoE, K top-k, F expert hidden, g the GLU factor.

Upcycling (init="upcycle"), for H heads:
- multi-head and merge layers start as the identity;
- expert e becomes H sub-token experts: (e, h), at index e·H + h, is expert e restricted to head h's slice of
  the model dim, w_in[e][h·d:(h+1)·d, :] (d × g·F) and w_out[e][:, h·d:(h+1)·d] (F × d), hidden F (biases:
  b_in[e], b_out[e][h·d:(h+1)·d]). The E·H sub-token experts hold exactly the SMoE's expert parameters, and
  H sub-tokens with top-K read K of them each: the SMoE's expert FLOPs per token, plus 4·D² for the head and
  merge layers;
- the router scores sub-token h against (e, h') with w_r[e]'s slice h' (a partial logit; the sigmoid router's
  choice bias and groups carry over: group g keeps its experts' sub-token experts); an X-MoE router starts anew;
- shared experts become one sub-token shared expert, the mean over heads of the restricted shared expert
  (Qwen2-MoE's gate likewise).
H = 1 is exact. For H > 1 it is an approximation, as for dense → MH-MoE (README: measured gap): record the SMoE
layers' inputs and outputs first (`capture_ffn_io`), then `calibrate` each MH-MoE layer to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from mhmoe.convert.peers import find_moe_blocks, swap_moe_blocks
from mhmoe.convert.wrap import MoEFFN, set_submodule
from mhmoe.layers.moe import SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.layers.routers import SigmoidRouter

Init = Literal["upcycle", "random"]


def mhmoe_from_smoe(
    smoe: SparseMoE,
    *,
    num_heads: int,
    num_experts: int | None = None,
    top_k: int | None = None,
    init: Init = "upcycle",
    **changes: Any,
) -> MHMoE:
    """An MHMoE of smoe's width from a SparseMoE (module doc), in its dtype and on its device.

    num_experts defaults to E·H (what upcycling needs), top_k to smoe's K; changes: other MoEConfig fields."""
    if init not in ("upcycle", "random"):
        raise ValueError(f"unknown init {init!r}; choose 'upcycle' or 'random'")
    E, H = smoe.num_experts, num_heads
    num_experts = E * H if num_experts is None else num_experts
    if init == "upcycle" and num_experts != E * H:
        raise ValueError(
            f"upcycling splits each of the {E} experts into {H} sub-token experts, so num_experts must be {E * H}, "
            f"got {num_experts}; pass init='random' for other sizes"
        )
    config = dataclasses.replace(
        smoe.config, num_heads=H, num_experts=num_experts, top_k=smoe.top_k if top_k is None else top_k,
        multi_head_layers=1, merge_layers=1, residual="outer", **changes,
    )  # fmt: skip
    weight = smoe.experts.w_in
    layer = MHMoE(config, d_model=smoe.d_model).to(device=weight.device, dtype=weight.dtype)
    if init == "upcycle":
        _upcycle(layer, smoe)
    return layer


def _heads(x: Tensor, num_heads: int, dim: int) -> Tensor:
    """x split along `dim` into num_heads slices, stacked on a new dimension after the first: (E, ...) -> (E, H, ...)."""
    return torch.stack(x.chunk(num_heads, dim=dim), dim=1)


@torch.no_grad()
def _upcycle(layer: MHMoE, smoe: SparseMoE) -> None:
    H, inner = layer.num_heads, layer.moe
    for proj in (layer.multi_head_layer, layer.merge_layer):
        assert isinstance(proj, nn.Linear)
        proj.weight.copy_(torch.eye(proj.in_features))
        proj.bias.zero_()
    experts, source = inner.experts, smoe.experts
    experts.w_in.copy_(_heads(source.w_in, H, 1).flatten(0, 1))  # (E, D, gF) -> (E·H, d, gF)
    experts.w_out.copy_(_heads(source.w_out, H, 2).flatten(0, 1))  # (E, F, D) -> (E·H, F, d)
    if experts.b_in is not None and source.b_in is not None and experts.b_out is not None and source.b_out is not None:
        experts.b_in.copy_(source.b_in.repeat_interleave(H, dim=0))
        experts.b_out.copy_(_heads(source.b_out, H, 1).flatten(0, 1))
    router, source_router = cast(Any, inner.router), cast(Any, smoe.router)
    if hasattr(router, "weight") and hasattr(source_router, "weight"):  # softmax, switch, sigmoid
        router.weight.copy_(_heads(source_router.weight, H, 1).flatten(0, 1))  # (E, D) -> (E·H, d)
    if isinstance(router, SigmoidRouter) and isinstance(source_router, SigmoidRouter):
        router.expert_bias.copy_(source_router.expert_bias.repeat_interleave(H))
    if inner.shared_experts is not None and smoe.shared_experts is not None:
        shared, source_shared = inner.shared_experts, smoe.shared_experts
        shared.fc_in.weight.copy_(_heads(source_shared.fc_in.weight, H, 1).mean(1))  # (gFs, D) -> (gFs, d)
        shared.fc_out.weight.copy_(_heads(source_shared.fc_out.weight, H, 0).mean(1))  # (D, Fs) -> (d, Fs)
    if inner.shared_expert_gate is not None and smoe.shared_expert_gate is not None:
        inner.shared_expert_gate.weight.copy_(_heads(smoe.shared_expert_gate.weight, H, 1).mean(1))


def find_smoe_layers(model: nn.Module) -> list[str]:
    """Names of the SparseMoE layers of `model` that are not inside an MH-MoE: bare ones (this library's models)
    and those converted blocks (`MoEFFN`) hold."""
    found: list[str] = []
    claimed: list[str] = []  # found layers and MH-MoE layers: nothing inside them is looked at
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in claimed):
            continue
        if isinstance(module, SparseMoE) or (isinstance(module, MoEFFN) and isinstance(module.moe, SparseMoE)):
            found.append(name)
        if isinstance(module, (SparseMoE, MHMoE)) or name in found:
            claimed.append(name)
    return found


def moe_to_mhmoe(
    model: nn.Module,
    *,
    num_heads: int,
    num_experts: int | None = None,
    top_k: int | None = None,
    init: Init = "upcycle",
    only: Callable[[str], bool] | None = None,
    **changes: Any,
) -> list[str]:
    """Replace every SparseMoE of `model` (module doc) in place by an MHMoE; return the names replaced.
    transformers MoE blocks are first swapped for SparseMoE (`swap_moe_blocks`). Arguments as `mhmoe_from_smoe`."""
    if find_moe_blocks(model):
        swap_moe_blocks(model, only=only)
    names = [n for n in find_smoe_layers(model) if only is None or only(n)]
    if not names:
        raise ValueError(f"no sparse MoE layer found in {type(model).__name__} to turn into MH-MoE")
    for name in names:
        module = model.get_submodule(name)
        smoe = module.moe if isinstance(module, MoEFFN) else module
        assert isinstance(smoe, SparseMoE)
        options = dict(num_heads=num_heads, num_experts=num_experts, top_k=top_k, init=init)
        layer = mhmoe_from_smoe(smoe, **options, **changes)  # type: ignore[arg-type]
        if isinstance(module, MoEFFN):
            module.moe = layer
            module.last_output = None
        else:
            set_submodule(model, name, layer)
    return names
