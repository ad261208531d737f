"""`MoEFFN`: this library's layer standing in for another model's FFN or MoE block, and the helpers that find
the converted layers again (their latest outputs, their summed auxiliary loss)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhmoe.layers.moe import MoELayer, MoEOutput


class MoEFFN(nn.Module):
    """A SparseMoE / MHMoE standing in for a dense FFN or another library's MoE block: forward(x) -> a tensor of
    x's shape, like the module it replaces.

    `last_output` holds the MoEOutput (aux_loss, stats) of the latest call, for `moe_aux_loss` / `moe_outputs`;
    it is overwritten by every call, so read it after each forward. `dropout` is the original module's
    output dropout (GPT-2), kept so training behaves as before.
    """

    def __init__(self, moe: MoELayer, dropout: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.last_output: MoEOutput | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.moe(x)
        self.last_output = out
        return self.dropout(out.y)


def moe_outputs(model: nn.Module) -> list[MoEOutput]:
    """The latest MoEOutput of every MoEFFN in `model`, in module order (those that have run)."""
    return [m.last_output for m in model.modules() if isinstance(m, MoEFFN) and m.last_output is not None]


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of the MoEFFN layers' latest calls: add it to the task loss."""
    losses = [out.aux_loss for out in moe_outputs(model)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def converted_layer(model: nn.Module, name: str) -> MoELayer:
    """The layer at `name`: a MoEFFN's, or a MoELayer itself (this library's own models hold them directly)."""
    module = model.get_submodule(name)
    layer = module.moe if isinstance(module, MoEFFN) else module
    if not isinstance(layer, MoELayer):
        raise ValueError(f"{name} is a {type(module).__name__}, neither a converted MoEFFN nor a SparseMoE / MHMoE")
    return layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def outermost(names: list[str]) -> list[str]:
    """The names not nested inside another of them (module names from `named_modules`, in order)."""
    kept: list[str] = []
    for name in names:
        if not any(name.startswith(f"{outer}.") for outer in kept):
            kept.append(name)
    return kept
