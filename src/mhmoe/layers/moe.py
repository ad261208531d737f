"""SparseMoE: route each token to top-k of E experts, run them, add the weighted outputs.

Shape legend: S routed items (tokens here; sub-tokens inside MH-MoE), d their width, E experts,
K top-k, F expert hidden.

    route     : router(x_Sd) -> top_experts_SK, gates_SK, probabilities, logits
    capacity  : optional; assignments past ceil(c·K·S/E) per expert get gate 0 (GShard priority), per call
                or per sequence (`token_group`), or a fixed number, or fairseq's rules (`SparseMoE.capacity`)
    experts   : y_Sd = Σ_k gates_SK · expert_{top_experts_SK}(x_Sd)     (mhmoe.ops: reference, sorted)
    shared    : optional always-on experts added for every item (DeepSeekMoE / Qwen-MoE), optionally
                scaled by a sigmoid gate (Qwen2-MoE)
    losses    : aux_loss = balance_loss_coef · balance + z_loss_coef · z, returned, never stored

Every option is a field of `MoEConfig` (layers/config.py). Parallelism plugs in from outside through two
attributes, both None (single process) by default:
`expert_runner` (an `ExpertRunner`: who runs the experts on the rows sorted by expert, e.g. an
all-to-all to the ranks that hold them) and `loss_reduce` (sums router-loss statistics over the
data-parallel batch, for a balance loss over the global batch). `mhmoe.parallel` sets them.

NaN/Inf input: the router upcasts and routes what it gets; a non-finite item gets a non-finite
output and makes `aux_loss` non-finite, which the trainer must catch. In dropless mode the other
items' outputs are unaffected (each row is computed on its own); with a capacity the bad item
still takes an expert slot. A non-finite item masked out by `token_mask` (padding) is replaced by zeros
first (`mask_padding`), so it reaches no loss and no gradient (0 · NaN would be NaN); finite inputs are
computed exactly as without that step.

Dtypes: the input must have the weights' dtype, except under torch.autocast (which picks the compute dtype).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mhmoe.layers.config import MoEConfig
from mhmoe.layers.experts import DenseFFN, Experts, check_positive, integer
from mhmoe.layers.losses import Reduce, balance_loss, pool_balance_loss, z_loss
from mhmoe.layers.routers import Router, RouterOutput, make_router
from mhmoe.ops.backend import DispatchName, compute_dtype, resolve_backend
from mhmoe.ops.capacity import capacity_keep, expert_capacity
from mhmoe.ops.reference import dispatch_reference
from mhmoe.ops.sorted import ExpertRunner, dispatch_sorted


class MoEStats(NamedTuple):
    """What one call routed, for logging and analysis: returned, never kept by the layer."""

    tokens_per_expert: Tensor  # (E,) int64: routed assignments per expert in this call (before capacity)
    dropped_fraction: Tensor  # () share of routed assignments dropped by capacity; 0 when dropless
    balance_loss: Tensor  # () unweighted balance loss
    z_loss: Tensor  # () unweighted router z-loss
    top_experts: Tensor  # (S, K) int64: each routed item's experts, best first (padding included)


class MoEOutput(NamedTuple):
    """What a SparseMoE or MHMoE call returns: the output, the auxiliary loss to add to the task loss, the stats."""

    y: Tensor  # same shape as the input
    aux_loss: Tensor  # () weighted auxiliary loss, ready to add to the task loss
    stats: MoEStats


def check_input(x: Tensor, d_model: int, layer: str, weights: Tensor | None = None) -> None:
    """x is a floating-point (..., d_model) tensor of the dtype of `weights` (any dtype under autocast)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} expects a tensor, got {type(x).__name__}")
    devices = {x.device, *([weights.device] if weights is not None else [])}
    if any(d.type == "meta" for d in devices):  # shapes without values: routing needs the values
        raise ValueError(
            f"{layer} cannot run on the meta device (input on {x.device}, weights on "
            f"{weights.device if weights is not None else '-'}): routing needs values; move the layer and its input "
            "to a real device (layer.to_empty(device='cpu') then load or initialise its weights)"
        )
    if not (x.is_floating_point()):
        raise TypeError(f"{layer} expects a floating-point input, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"{layer} expects input of shape (..., {d_model}), got {tuple(x.shape)}")
    if weights is not None and x.dtype != weights.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{layer} got a {x.dtype} input but its weights are {weights.dtype}; cast one to the other "
            f"(x.to({weights.dtype}) or layer.to({x.dtype})), or run under torch.autocast"
        )


def check_token_mask(token_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """(...) bool, True for tokens to route, flattened to (S,)."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, Tensor):
        raise TypeError(
            f"token_mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got {type(token_mask).__name__}; "
            "pass torch.tensor(mask, dtype=torch.bool)"
        )
    if token_mask.device != x.device:
        raise ValueError(f"token_mask is on {token_mask.device} but the input is on {x.device}; move it there")
    if token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask must have shape {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}")
    if token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be bool (True = route this token), got {token_mask.dtype}")
    return token_mask.reshape(-1)


def mask_padding(x_Sd: Tensor, valid_S: Tensor) -> Tensor:
    """x with its non-finite padding rows (valid False) set to 0, so that padding never makes a loss or a gradient
    NaN; every other row, and a finite input as a whole, is returned as is (the same values, bit for bit)."""
    keep_S = valid_S | torch.isfinite(x_Sd).all(-1)
    return torch.where(keep_S.unsqueeze(-1), x_Sd, 0)


def layer_config(config: MoEConfig | None, options: dict[str, Any], layer: str) -> tuple[MoEConfig, Router | None]:
    """(config, router object or None) from a layer's arguments: a MoEConfig, or the keyword form
    (`MoEConfig.from_kwargs`'s); either may come with `router=` a `Router` object, used instead of
    the config's router."""
    options = dict(options)
    router = options.pop("router") if isinstance(options.get("router"), Router) else None
    if router is not None and options.get("router_kwargs"):
        raise ValueError(
            f"router_kwargs {sorted(options['router_kwargs'])} given with a router object; set them on the object"
        )
    if router is not None:
        options.pop("router_kwargs", None)
    if config is None:
        return MoEConfig.from_kwargs(**options), router
    if options:
        raise TypeError(f"{layer} takes a MoEConfig or keyword options, not both (got {sorted(options)})")
    return config, router


class MoELayer(nn.Module):
    """What SparseMoE and MHMoE have in common: a `config` and a width `d_model`, called as
    layer(x, token_mask=None) -> MoEOutput. `routed` is the SparseMoE that routes (the layer itself, or
    MH-MoE's inner one over sub-tokens): its router, experts and hooks are where parallelism plugs in."""

    config: MoEConfig
    d_model: int

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def routed(self) -> SparseMoE:
        raise NotImplementedError

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        raise NotImplementedError


class SparseMoE(MoELayer):
    """A sparse mixture-of-experts FFN over the last dimension of its input.

    SparseMoE(config, d_model=D) or the keyword form SparseMoE(d_model=D, num_experts=E, top_k=K,
    expert_hidden=F, ...) with `MoEConfig`'s fields as keywords; there `router` may be a name (its options
    in `router_kwargs`), a `RouterConfig` or a `Router` object. A config's multi-head fields are not read.

    Capacity (`capacity_factor` c) drops assignments past ceil(c·K·S/E) per expert, where S counts all
    items of the call (or of each sequence, with token_group="sequence"), padding included, so the
    capacity is a static number.

    forward(x, token_mask=None) -> MoEOutput; x: (..., d_model); token_mask: (...) bool, False for
    padding, which is not routed, gets no routed output and counts in no loss or statistic.
    """

    def __init__(self, config: MoEConfig | None = None, *, d_model: int, **options: Any):
        super().__init__()
        d_model = integer(d_model)
        check_positive(d_model=d_model)
        config, router = layer_config(config, options, "SparseMoE")
        self.d_model, self.config = d_model, config.routed_part()
        self.router = make_router(
            router or config.router, d_model=d_model, num_experts=config.num_experts, top_k=config.top_k
        )
        # LatentMoE (arXiv 2601.18089): the routed item is projected down to the experts' width L and their
        # weighted sum back up to D; the router and the shared experts read the full-width item.
        self.expert_dim = config.latent_dim or d_model
        self.latent_down = nn.Linear(d_model, self.expert_dim, bias=False) if config.latent_dim else None
        self.latent_up = nn.Linear(self.expert_dim, d_model, bias=False) if config.latent_dim else None
        self.experts = Experts(
            num_experts=config.num_experts, d_model=self.expert_dim, hidden=config.expert_hidden,
            activation=config.activation, bias=config.expert_bias,
        )  # fmt: skip
        self.shared_experts = (
            DenseFFN(d_model=d_model, hidden=config.num_shared_experts * self.shared_expert_hidden,
                     activation=config.activation)
            if config.num_shared_experts
            else None
        )  # fmt: skip
        # Qwen2-MoE: the shared experts' output is scaled by sigmoid(x · w) per item
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if config.shared_expert_gate else None
        # Extension points for parallelism (module doc); plain attributes, not state.
        self.expert_runner: ExpertRunner | None = None
        self.loss_reduce: Reduce | None = None

    @property
    def routed(self) -> SparseMoE:
        return self

    # Execution choices (same weights, same results up to rounding) may change after construction.
    @property
    def dispatch(self) -> DispatchName:
        return self.config.dispatch

    @dispatch.setter
    def dispatch(self, value: DispatchName) -> None:
        self.config = dataclasses.replace(self.config, dispatch=value)

    @property
    def recompute(self) -> bool:
        return self.config.recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self.config = dataclasses.replace(self.config, recompute=value)

    @property
    def expert_hidden(self) -> int:
        return self.config.expert_hidden

    @property
    def activation(self) -> str:
        return self.config.activation

    @property
    def shared_expert_hidden(self) -> int:
        return self.config.shared_expert_hidden or self.config.expert_hidden

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        c = self.config
        check_input(x, self.d_model, "SparseMoE", next(self.experts.parameters()))  # w_in (a wrapper: its own)
        valid_S = check_token_mask(token_mask, x)
        if c.route_padding:  # the authors' code: padding is routed like any item
            valid_S = None
        x_Sd = x.reshape(-1, self.d_model)
        group_size = _sequence_length(x) if c.token_group == "sequence" else None
        if valid_S is not None:
            x_Sd = mask_padding(x_Sd, valid_S)
        r = self.router(x_Sd, valid_S)
        gates_SK = r.gates if valid_S is None else torch.where(valid_S.unsqueeze(-1), r.gates, 0)
        gates_SK, dropped_fraction = self._apply_capacity(r.top_experts, gates_SK, valid_S, group_size)

        h_SL = x_Sd if self.latent_down is None else self.latent_down(x_Sd)  # LatentMoE: down to L
        y_SL = self.experts(lambda experts: self._dispatch(h_SL, experts, r.top_experts, gates_SK))
        y_Sd = y_SL if self.latent_up is None else self.latent_up(y_SL)  # and back up to D
        if self.shared_experts is not None:
            shared_Sd = self.shared_experts(x_Sd)
            if self.shared_expert_gate is not None:
                shared_Sd = torch.sigmoid(self.shared_expert_gate(x_Sd)) * shared_Sd
            y_Sd = y_Sd + shared_Sd

        balance = self._balance_loss(r, valid_S, group_size)
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.z_loss_coef != 0):  # a statistic only at 0
            z = z_loss(r.logits, valid_S, self.loss_reduce)
        aux_loss = c.balance_loss_coef * balance + c.z_loss_coef * z
        stats = MoEStats(
            tokens_per_expert=tokens_per_expert(r.top_experts, c.num_experts, valid_S),
            dropped_fraction=dropped_fraction.detach().float(),
            balance_loss=balance.detach(),
            z_loss=z.detach(),
            top_experts=r.top_experts,
        )
        return MoEOutput(y_Sd.view(x.shape), aux_loss, stats)

    def _balance_loss(self, r: RouterOutput, valid_S: Tensor | None, group_size: int | None) -> Tensor:
        """The balance loss over the call (or each sequence); with a router per pool (`HeadRouters`) each pool's
        items on their own, and the mean over pools (and sequences): the heads' own losses, averaged."""
        choices = r.top_experts if self.config.balance_loss == "all_choices" else r.top_experts[:, 0]
        P = self.router.pools
        if P == 1:
            return balance_loss(r.balance_probs, choices, valid_S, self.loss_reduce, group_size)
        if group_size is None:  # each pool's loss over all its items (of the global batch, with loss_reduce)
            E = self.num_experts // P
            probs, local = r.balance_probs.view(-1, P, E), (choices % E).view(-1, P, choices.shape[1:].numel())
            valid = None if valid_S is None else valid_S.view(-1, P).t()
            return pool_balance_loss(probs.transpose(0, 1), local.transpose(0, 1), valid, self.loss_reduce)
        group_size //= P
        probs, local = _pool_major(r.balance_probs, P), _pool_major(choices % (self.num_experts // P), P)
        valid = None if valid_S is None else _pool_major(valid_S, P)
        return balance_loss(probs, local, valid, self.loss_reduce, group_size)

    def _dispatch(self, x_Sd: Tensor, experts: Experts, top_experts_SK: Tensor, gates_SK: Tensor) -> Tensor:
        """y_Sd = Σ_k gates_SK · expert_{top_experts_SK}(x_Sd), by the configured dispatch (x at the experts' width)."""
        c = self.config
        if c.dispatch == "reference":
            if self.expert_runner is not None:
                raise ValueError("dispatch='reference' runs every expert here; it cannot use an expert_runner")
            return dispatch_reference(x_Sd, experts, top_experts_SK, gates_SK)
        dims = (self.expert_dim, c.expert_hidden)
        backend = resolve_backend(c.dispatch, compute_dtype(x_Sd), x_Sd.device, dims)
        return dispatch_sorted(x_Sd, experts, top_experts_SK, gates_SK, backend, self.expert_runner, c.recompute)

    def capacity(self, num_items: int) -> int | None:
        """Assignments each expert may keep among `num_items` items (a call's, or a sequence's), or None
        (dropless). In eval mode with `eval_capacity_fraction` f: ceil(f · num_items) (fairseq)."""
        c = self.config
        if not self.training and c.eval_capacity_fraction is not None:
            return max(1, math.ceil(c.eval_capacity_fraction * num_items))
        if c.expert_capacity is not None:
            return c.expert_capacity
        if c.capacity_factor is None:
            return None
        per_choice = c.capacity_rounding == "per_choice"
        return expert_capacity(c.capacity_factor, num_items, c.top_k, c.num_experts, per_choice)

    def _apply_capacity(
        self, top_experts_SK: Tensor, gates_SK: Tensor, valid_S: Tensor | None, group_size: int | None
    ) -> tuple[Tensor, Tensor]:
        """(gates with the dropped assignments zeroed, share of routed assignments dropped)."""
        S, K = top_experts_SK.shape
        capacity = self.capacity(S if group_size is None else group_size)
        if capacity is None:
            return gates_SK, gates_SK.new_zeros(())
        keep_SK = capacity_keep(top_experts_SK, capacity, self.num_experts, valid_S, group_size)
        routed = torch.as_tensor(keep_SK.numel() if valid_S is None else valid_S.sum() * K)
        dropped_fraction = (routed - keep_SK.sum()) / routed.clamp_min(1)  # 0, not 1, when nothing is routed
        return gates_SK * keep_SK, dropped_fraction

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"capacity_factor={c.capacity_factor}, balance_loss_coef={c.balance_loss_coef}, "
            f"z_loss_coef={c.z_loss_coef}, dispatch={c.dispatch!r}, recompute={c.recompute}"
        )


def _pool_major(t_S: Tensor, pools: int) -> Tensor:
    """Rows i·P + j (item i of pool j) reordered to j·(S/P) + i: each pool's items together, in their order."""
    return t_S.view(-1, pools, *t_S.shape[1:]).transpose(0, 1).reshape(t_S.shape)


def _sequence_length(x: Tensor) -> int:
    """The items per sequence of an input (..., L, d): L (at least 1); a 1-D input is one item."""
    return max(1, x.shape[-2]) if x.dim() >= 2 else 1


def tokens_per_expert(top_experts_SK: Tensor, num_experts: int, valid_S: Tensor | None) -> Tensor:
    """(E,) int64 count of routed assignments per expert; padding excluded."""
    ones = torch.ones_like(top_experts_SK)
    if valid_S is not None:
        ones = ones * valid_S.unsqueeze(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=top_experts_SK.device)
    return counts.scatter_add_(0, top_experts_SK.reshape(-1), ones.reshape(-1))
