"""Swap-in conversion: the MoE blocks of transformers' models become this library's `SparseMoE`, with the same
weights and the same routing (for the fast path, expert parallelism and the routing analyses).

Shape legend: D model dim, E experts, K top-k, F expert hidden, Fs shared-expert hidden.

Blocks are recognised by their parts, not their class, so any model built the same way converts (the layouts of
transformers 5, whose experts are fused tensors; 4.x's per-expert modules are not recognised):

    fused experts   `gate`, a router with `weight` (E, D) and `top_k`, and `experts` with `gate_up_proj`
                    (E, 2F, D) holding [gate; up], `down_proj` (E, D, F) and `act_fn` (a GLU):
                    Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3
        the router  `e_score_correction_bias`: the sigmoid router (DeepSeek-V3; n_group / topk_group ->
                    num_groups / top_groups, routed_scaling_factor -> scale, norm_topk_prob -> renormalize);
                    `norm_topk_prob`: softmax, renormalised as set (Qwen, OLMoE); neither: softmax, always
                    renormalised (Mixtral, whose top-1 gate is p/p = 1)
        shared      `shared_expert` + `shared_expert_gate` (Qwen2-MoE: a sigmoid-gated shared expert) or
                    `shared_experts` (DeepSeek-V3): a gate_proj / up_proj / down_proj MLP of width Fs
    latent          `gate` (the sigmoid router above), `experts` with `up_proj` (E, F, L) and `down_proj` (E, L, F)
                    and a plain `act_fn`, `fc1_latent_proj` / `fc2_latent_proj` (D -> L, L -> D; Identity when L
                    = D) and `shared_experts` (an up_proj / down_proj MLP on the full-width token): NemotronH,
                    LatentMoE (arXiv 2601.18089) -> `SparseMoE` with `latent_dim`
    Switch          `router` with `classifier` (E, D, no bias), `expert_capacity`, `jitter_noise`, and
                    `experts` of `expert_i` (wi, wo, act): top-1, the gate is the probability, a fixed capacity
                    per sequence (Switch Transformers)

Losses take the model config's coefficients and the peer's form: all K choices counted for Mixtral, Qwen and
OLMoE (`balance_loss="all_choices"`); first choices per sequence, plus the z-loss, for Switch; none for
DeepSeek-V3, whose balancing is the sigmoid router's bias (set `balance_loss_coef` = α / K for its
sequence-wise loss: token_group="sequence" is set). transformers pools the statistics of all layers before its
balance loss (and averages Switch's z-loss over layers); here each layer has its own loss and
`moe_aux_loss(model)` sums them: equal for one MoE layer. What maps and what does not: README, "Peers".
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mhmoe.convert.wrap import MoEFFN, outermost, set_submodule
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.moe import SparseMoE
from mhmoe.layers.routers import RouterConfig, SigmoidRouter
from mhmoe.ops.activations import Activation, activation_of_module


@dataclass
class PeerBlock:
    """A recognised block, its weights in this library's layout (`Experts`, `DenseFFN`)."""

    config: MoEConfig
    router_weight: Tensor  # (E, D)
    expert_bias: Tensor | None  # (E,) the sigmoid router's choice bias (e_score_correction_bias)
    w_in: Tensor  # (E, D, g·F)
    w_out: Tensor  # (E, F, D)
    shared_in: Tensor | None = None  # (D, 2·Fs) [gate | up]
    shared_out: Tensor | None = None  # (Fs, D)
    shared_gate: Tensor | None = None  # (1, D)
    latent_down: Tensor | None = None  # (L, D) LatentMoE's down projection
    latent_up: Tensor | None = None  # (D, L) and its up projection


def _activation(act: Any, glu: bool, where: str) -> Activation:
    name = activation_of_module(act, glu)
    if name is None:
        raise ValueError(
            f"{where}: activation {type(act).__name__} has no exact counterpart here (silu, gelu, relu, relu2"
            f"{' and the GLU forms of the first three' if glu else ''}); it cannot be converted"
        )
    return name


def _coefficient(model_config: Any, name: str) -> float:
    return float(getattr(model_config, name, 0.0) or 0.0)


def _fused_router(gate: Any) -> RouterConfig:
    if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3
        return RouterConfig(
            kind="sigmoid", renormalize=bool(gate.norm_topk_prob), scale=float(gate.routed_scaling_factor),
            num_groups=int(gate.num_group), top_groups=int(gate.topk_group),
        )  # fmt: skip
    renormalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral always renormalises
    return RouterConfig(kind="softmax", renormalize=renormalize)


def _shared_mlp(mlp: Any, activation: str, where: str) -> tuple[Tensor, Tensor]:
    parts: list[Any] = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts):
        raise ValueError(f"{where}: the shared expert is not a bias-free gate_proj / up_proj / down_proj MLP")
    if _activation(mlp.act_fn, True, where) != activation:
        raise ValueError(f"{where}: the shared expert's activation differs from the experts'")
    gate, up, down = parts
    return torch.cat([gate.weight.t(), up.weight.t()], dim=1), down.weight.t()


def _read_fused(block: Any, model_config: Any, where: str) -> PeerBlock:
    gate, experts = block.gate, block.experts
    layout = {n: getattr(experts, n, d) for n, d in (("is_transposed", False), ("is_concatenated", True),
              ("has_bias", False), ("has_gate", True), ("has_post_expert_norm", False))}  # fmt: skip
    if layout != {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                  "has_post_expert_norm": False}:  # fmt: skip
        raise ValueError(f"{where}: experts laid out as {layout} are not supported (concatenated [gate; up], no bias)")
    activation = _activation(experts.act_fn, True, where)
    E, D = gate.weight.shape
    router = dataclasses.replace(_fused_router(gate), jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0))
    sigmoid = router.kind == "sigmoid"
    shared_mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    config = MoEConfig(
        num_experts=E, top_k=int(gate.top_k), expert_hidden=experts.down_proj.shape[-1], activation=activation,
        router=router, balance_loss="all_choices", token_group="sequence" if sigmoid else "call",
        balance_loss_coef=0.0 if sigmoid else _coefficient(model_config, "router_aux_loss_coef"),
        num_shared_experts=int(shared_mlp is not None),
        shared_expert_hidden=None if shared_mlp is None else shared_mlp.down_proj.in_features,
        shared_expert_gate=shared_gate is not None,
    )  # fmt: skip
    peer = PeerBlock(
        config, gate.weight, gate.e_score_correction_bias if sigmoid else None,
        experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2),
    )  # fmt: skip
    if shared_mlp is not None:
        peer.shared_in, peer.shared_out = _shared_mlp(shared_mlp, activation, where)
    if shared_gate is not None:
        if not isinstance(shared_gate, nn.Linear) or shared_gate.bias is not None or shared_gate.out_features != 1:
            raise ValueError(f"{where}: shared_expert_gate is not a bias-free Linear({D}, 1)")
        peer.shared_gate = shared_gate.weight
    return peer


def _latent_projections(block: Any, where: str) -> tuple[Tensor, Tensor] | None:
    down, up = block.fc1_latent_proj, block.fc2_latent_proj
    if isinstance(down, nn.Identity) and isinstance(up, nn.Identity):
        return None
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in (down, up)):
        raise ValueError(f"{where}: the latent projections are not bias-free Linear layers (mlp_bias=True)")
    return down.weight, up.weight


def _read_latent(block: Any, model_config: Any, where: str) -> PeerBlock:
    gate, experts, shared = block.gate, block.experts, block.shared_experts
    activation = _activation(experts.act_fn, False, where)
    if any(not isinstance(getattr(shared, n, None), nn.Linear) or getattr(shared, n).bias is not None
           for n in ("up_proj", "down_proj")):  # fmt: skip
        raise ValueError(f"{where}: the shared expert is not a bias-free up_proj / down_proj MLP")
    if _activation(shared.act_fn, False, where) != activation:
        raise ValueError(f"{where}: the shared expert's activation differs from the experts'")
    projections = _latent_projections(block, where)
    E, F, L = experts.up_proj.shape
    config = MoEConfig(
        num_experts=E, top_k=int(gate.top_k), expert_hidden=F, activation=activation, router=_fused_router(gate),
        balance_loss="all_choices", token_group="sequence", balance_loss_coef=0.0, num_shared_experts=1,
        shared_expert_hidden=shared.up_proj.out_features, latent_dim=None if projections is None else L,
    )  # fmt: skip
    peer = PeerBlock(
        config, gate.weight, gate.e_score_correction_bias, experts.up_proj.transpose(1, 2),
        experts.down_proj.transpose(1, 2), shared.up_proj.weight.t(), shared.down_proj.weight.t(),
    )  # fmt: skip
    if projections is not None:
        peer.latent_down, peer.latent_up = projections
    return peer


def _read_switch(block: Any, model_config: Any, where: str) -> PeerBlock:
    router, experts = block.router, block.experts
    if router.classifier.bias is not None:
        raise ValueError(f"{where}: a Switch router with a bias (router_bias=True) has no counterpart here")
    modules = [experts[f"expert_{e}"] for e in range(len(experts))]
    if any(m.wi.bias is not None or m.wo.bias is not None for m in modules):
        raise ValueError(f"{where}: Switch experts with biases are not supported")
    dropout = max(float(getattr(m.dropout, "p", 0.0)) for m in modules)
    if dropout > 0:
        warnings.warn(
            f"{where}: the Switch experts' inner dropout (p={dropout}) is not converted (training only)", stacklevel=3
        )
    config = MoEConfig(
        num_experts=len(modules), top_k=1, expert_hidden=modules[0].wi.out_features,
        activation=_activation(modules[0].act, False, where),
        router=RouterConfig(kind="switch", jitter=float(router.jitter_noise or 0.0)),
        expert_capacity=int(router.expert_capacity), token_group="sequence", balance_loss="first_choice",
        balance_loss_coef=_coefficient(model_config, "router_aux_loss_coef"),
        z_loss_coef=_coefficient(model_config, "router_z_loss_coef"),
    )  # fmt: skip
    w_in = torch.stack([m.wi.weight.t() for m in modules])
    return PeerBlock(config, router.classifier.weight, None, w_in, torch.stack([m.wo.weight.t() for m in modules]))


def _is_fused(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        isinstance(getattr(gate, "weight", None), Tensor)
        and hasattr(gate, "top_k")
        and all(isinstance(getattr(experts, n, None), Tensor) for n in ("gate_up_proj", "down_proj"))
    )


def _is_latent(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        isinstance(getattr(gate, "weight", None), Tensor)
        and hasattr(gate, "e_score_correction_bias")
        and all(isinstance(getattr(experts, n, None), Tensor) for n in ("up_proj", "down_proj"))
        and hasattr(module, "fc1_latent_proj")
        and hasattr(module, "shared_experts")
    )


def _is_switch(module: nn.Module) -> bool:
    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    return (
        isinstance(getattr(router, "classifier", None), nn.Linear)
        and hasattr(router, "expert_capacity")
        and isinstance(experts, nn.ModuleDict)
        and "expert_0" in experts
    )


READERS: dict[str, tuple[Callable[[nn.Module], bool], Callable[[Any, Any, str], PeerBlock]]] = {
    "fused experts": (_is_fused, _read_fused),
    "latent": (_is_latent, _read_latent),
    "switch": (_is_switch, _read_switch),
}


def read_moe_block(block: nn.Module, model_config: Any = None, where: str = "block") -> PeerBlock | None:
    """The recognised parts of another library's MoE block (module doc), or None if it is not one.
    model_config: where the loss coefficients come from (the model's config). A block that has the parts but
    something this library cannot compute exactly is an error naming it."""
    for recognise, read in READERS.values():
        if recognise(block):
            return read(block, model_config, where)
    return None


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every recognised MoE block in `model`, none nested in another."""
    names = [n for n, m in model.named_modules() if n and any(rec(m) for rec, _ in READERS.values())]
    return [(n, model.get_submodule(n)) for n in outermost(names)]


def layer_from_block(block: nn.Module, model_config: Any = None, where: str = "block", **changes: Any) -> SparseMoE:
    """A SparseMoE computing what `block` computes (same weights and routing), in its dtype and on its device.
    changes: MoEConfig fields to change (dispatch, recompute, the loss coefficients, ...)."""
    peer = read_moe_block(block, model_config, where)
    if peer is None:
        raise ValueError(f"{where} ({type(block).__name__}) is not a MoE block this library recognises")
    config = dataclasses.replace(peer.config, **changes)
    with torch.device("meta"):  # no initialisation: every weight is copied below
        layer = SparseMoE(config, d_model=peer.router_weight.shape[1])
    layer = layer.to_empty(device=peer.w_in.device).to(peer.w_in.dtype)
    load_block(layer, peer)
    return layer


@torch.no_grad()
def load_block(layer: SparseMoE, peer: PeerBlock) -> None:
    """Copy a recognised block's weights into `layer` (built from `peer.config`). The router keeps the block's
    router dtype (DeepSeek-V3 keeps its router in float32 in a bf16 model)."""
    layer.router.to(peer.router_weight.dtype)
    layer.router.weight.copy_(peer.router_weight)  # type: ignore[operator]
    if isinstance(layer.router, SigmoidRouter):
        layer.router.load.zero_()
        layer.router.expert_bias.zero_()
        if peer.expert_bias is not None:
            layer.router.expert_bias.copy_(peer.expert_bias)
    layer.experts.w_in.copy_(peer.w_in)
    layer.experts.w_out.copy_(peer.w_out)
    if layer.shared_experts is not None:
        layer.shared_experts.fc_in.weight.copy_(peer.shared_in.t())  # type: ignore[union-attr]
        layer.shared_experts.fc_out.weight.copy_(peer.shared_out.t())  # type: ignore[union-attr]
    if layer.shared_expert_gate is not None:
        layer.shared_expert_gate.weight.copy_(peer.shared_gate)  # type: ignore[arg-type]
    if layer.latent_down is not None and layer.latent_up is not None:
        layer.latent_down.weight.copy_(peer.latent_down)  # type: ignore[arg-type]
        layer.latent_up.weight.copy_(peer.latent_up)  # type: ignore[arg-type]


def swap_moe_blocks(model: nn.Module, *, only: Callable[[str], bool] | None = None, **changes: Any) -> list[str]:
    """Replace every recognised MoE block of `model` in place by `MoEFFN(SparseMoE)` with its weights and routing;
    return the replaced names. changes: MoEConfig fields for every new layer (e.g. dispatch="slices")."""
    blocks = [(n, m) for n, m in find_moe_blocks(model) if only is None or only(n)]
    if not blocks:
        raise ValueError(
            f"no MoE block found in {type(model).__name__}: recognised are Mixtral / Qwen-MoE / OLMoE / DeepSeek-V3 "
            "style blocks (gate + experts.gate_up_proj / down_proj), NemotronH's LatentMoE blocks (gate + "
            "experts.up_proj / down_proj + fc1_latent_proj / fc2_latent_proj) and Switch Transformers' "
            "(router.classifier + experts.expert_i)"
        )
    model_config: Any = getattr(model, "config", None)
    for name, block in blocks:
        set_submodule(model, name, MoEFFN(layer_from_block(block, model_config, name, **changes)))
    if getattr(model_config, "output_router_logits", None) is not None:
        model_config.output_router_logits = False
        model.register_forward_pre_hook(_refuse_router_logits, with_kwargs=True)
    return [name for name, _ in blocks]


def _refuse_router_logits(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """transformers records router logits from its own router modules, which a swapped model no longer has."""
    if kwargs.get("output_router_logits") or getattr(module.config, "output_router_logits", False):
        raise ValueError(
            "the MoE blocks were swapped for mhmoe layers, which record no router_logits: call the model without "
            "output_router_logits and add mhmoe.convert.moe_aux_loss(model) to the loss (each layer's balance loss)"
        )
