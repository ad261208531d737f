"""SparseMoE: route each token to top-k of E experts, run them, add the weighted outputs.

Shape legend: S routed items (tokens here; sub-tokens inside MH-MoE), d their width, E experts,
K top-k, F expert hidden.

    route     : router(x_Sd) -> top_experts_SK, gates_SK, probabilities, logits
    capacity  : optional; assignments past ceil(c·K·S/E) per expert get gate 0 (GShard priority)
    experts   : y_Sd = Σ_k gates_SK · expert_{top_experts_SK}(x_Sd)     (dispatch.py)
    shared    : optional always-on experts added for every item (DeepSeekMoE / Qwen-MoE)
    losses    : aux_loss = balance_loss_coef · balance + z_loss_coef · z, returned, never stored

Parallelism plugs in from outside through two attributes, both None (single process) by default:
`expert_runner` (an `ExpertRunner`: who runs the experts on the rows sorted by expert, e.g. an
all-to-all to the ranks that hold them) and `loss_reduce` (sums router-loss statistics over the
data-parallel batch, for a balance loss over the global batch). `mhmoe.parallel` sets them.

NaN/Inf input: the router upcasts and routes what it gets; a non-finite item gets a non-finite
output and makes `aux_loss` non-finite, which the trainer must catch. In dropless mode the other
items' outputs are unaffected (each row is computed on its own); with a capacity the bad item
still takes an expert slot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from mhmoe.layers.dispatch import (
    DISPATCHES,
    DispatchName,
    ExpertRunner,
    capacity_keep,
    compute_dtype,
    dispatch_reference,
    dispatch_sorted,
    expert_capacity,
    resolve_backend,
)
from mhmoe.layers.experts import Activation, DenseFFN, Experts, check_positive
from mhmoe.layers.losses import Reduce, balance_loss, z_loss
from mhmoe.layers.routers import Router, RouterName, make_router


class MoEStats(NamedTuple):
    tokens_per_expert: Tensor  # (E,) int64: routed assignments per expert in this call (before capacity)
    dropped_fraction: Tensor  # () share of routed assignments dropped by capacity; 0 when dropless
    balance_loss: Tensor  # () unweighted balance loss
    z_loss: Tensor  # () unweighted router z-loss
    top_experts: Tensor  # (S, K) int64: each routed item's experts, best first (padding included)


class MoEOutput(NamedTuple):
    y: Tensor  # same shape as the input
    aux_loss: Tensor  # () weighted auxiliary loss, ready to add to the task loss
    stats: MoEStats


def check_input(x: Tensor, d_model: int, layer: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} expects a tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"{layer} expects a floating-point input, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"{layer} expects input of shape (..., {d_model}), got {tuple(x.shape)}")


def check_token_mask(token_mask: Tensor | None, x: Tensor) -> Tensor | None:
    """(...) bool, True for tokens to route, flattened to (S,)."""
    if token_mask is None:
        return None
    if token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask must have shape {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}")
    if token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be bool (True = route this token), got {token_mask.dtype}")
    return token_mask.reshape(-1)


class SparseMoE(nn.Module):
    """A sparse mixture-of-experts FFN over the last dimension of its input.

    Args:
        d_model: width of the routed items.
        num_experts, top_k: E experts, each item goes to K of them.
        expert_hidden: hidden width F of each expert.
        activation: "gelu", "relu" or "swiglu".
        router: a name from `mhmoe.layers.routers.ROUTERS` or a `Router` object; router_kwargs go to its constructor.
        capacity_factor: None (default) is dropless; c drops assignments past ceil(c·K·S/E) per expert
            (S counts all items, padding included, so the capacity is a static number).
        balance_loss_coef, z_loss_coef: weights of the two router losses in `aux_loss`
            (α = 0.01 is the paper's; the z-loss is off by default, as in the paper).
        num_shared_experts, shared_expert_hidden: always-on experts (a dense FFN of width
            num_shared_experts · shared_expert_hidden, which equals their sum); hidden defaults to expert_hidden.
        dispatch: "auto" (fast path, backend chosen by `resolve_backend`), "grouped_mm", "slices",
            or "reference" (the per-expert loop, for tests).
        recompute: keep no expert activations for the backward and recompute them there (one more
            expert GEMM per layer; see `benchmarks/README.md` for time and memory). Not with
            dispatch "reference"; under expert parallelism the combine still keeps the experts'
            (R, d) outputs.

    forward(x, token_mask=None) -> MoEOutput; x: (..., d_model); token_mask: (...) bool, False for
    padding, which is not routed, gets no routed output and counts in no loss or statistic.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int,
        expert_hidden: int,
        activation: Activation = "gelu",
        router: RouterName | Router = "softmax",
        router_kwargs: dict | None = None,
        capacity_factor: float | None = None,
        balance_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        num_shared_experts: int = 0,
        shared_expert_hidden: int | None = None,
        dispatch: DispatchName = "auto",
        recompute: bool = False,
    ):
        super().__init__()
        check_positive(d_model=d_model, num_experts=num_experts, expert_hidden=expert_hidden)
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be True or False, got {recompute!r}")
        if recompute and dispatch == "reference":
            raise ValueError("recompute is not supported with dispatch='reference' (the test oracle); use 'auto'")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
        if shared_expert_hidden is not None and not num_shared_experts:
            raise ValueError(f"shared_expert_hidden={shared_expert_hidden} given but num_shared_experts is 0")
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {DISPATCHES}")
        for name, coef in (("balance_loss_coef", balance_loss_coef), ("z_loss_coef", z_loss_coef)):
            if coef < 0:
                raise ValueError(f"{name} must be >= 0, got {coef}")
        self.d_model, self.num_experts, self.top_k, self.expert_hidden = d_model, num_experts, top_k, expert_hidden
        self.activation, self.capacity_factor, self.dispatch = activation, capacity_factor, dispatch
        self.recompute = recompute
        self.balance_loss_coef, self.z_loss_coef = balance_loss_coef, z_loss_coef
        self.router = make_router(
            router, d_model=d_model, num_experts=num_experts, top_k=top_k, **(router_kwargs or {})
        )
        self.experts = Experts(num_experts=num_experts, d_model=d_model, hidden=expert_hidden, activation=activation)
        self.num_shared_experts = num_shared_experts
        self.shared_expert_hidden = shared_expert_hidden or expert_hidden
        self.shared_experts = (
            DenseFFN(d_model=d_model, hidden=num_shared_experts * self.shared_expert_hidden, activation=activation)
            if num_shared_experts
            else None
        )
        # Extension points for parallelism (module doc); plain attributes, not state.
        self.expert_runner: ExpertRunner | None = None
        self.loss_reduce: Reduce | None = None

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> MoEOutput:
        check_input(x, self.d_model, "SparseMoE")
        valid_S = check_token_mask(token_mask, x)
        x_Sd = x.reshape(-1, self.d_model)
        r = self.router(x_Sd, valid_S)
        gates_SK = r.gates if valid_S is None else r.gates * valid_S.unsqueeze(-1)

        dropped_fraction = gates_SK.new_zeros(())
        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, x_Sd.shape[0], self.top_k, self.num_experts)
            keep_SK = capacity_keep(r.top_experts, capacity, self.num_experts, valid_S)
            routed = torch.as_tensor(keep_SK.numel() if valid_S is None else valid_S.sum() * self.top_k)
            dropped_fraction = (routed - keep_SK.sum()) / routed.clamp_min(1)  # 0, not 1, when nothing is routed
            gates_SK = gates_SK * keep_SK

        if self.dispatch == "reference":
            if self.expert_runner is not None:
                raise ValueError("dispatch='reference' runs every expert here; it cannot use an expert_runner")
            y_Sd = dispatch_reference(x_Sd, self.experts, r.top_experts, gates_SK)
        else:
            dims = (self.d_model, self.expert_hidden)
            backend = resolve_backend(self.dispatch, compute_dtype(x_Sd), x_Sd.device, dims)
            y_Sd = dispatch_sorted(
                x_Sd, self.experts, r.top_experts, gates_SK, backend, self.expert_runner, self.recompute
            )
        if self.shared_experts is not None:
            y_Sd = y_Sd + self.shared_experts(x_Sd)

        balance = balance_loss(r.balance_probs, r.top_experts[:, 0], valid_S, self.loss_reduce)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.z_loss_coef != 0):  # a statistic only at 0
            z = z_loss(r.logits, valid_S, self.loss_reduce)
        aux_loss = self.balance_loss_coef * balance + self.z_loss_coef * z
        stats = MoEStats(
            tokens_per_expert=tokens_per_expert(r.top_experts, self.num_experts, valid_S),
            dropped_fraction=dropped_fraction.detach().float(),
            balance_loss=balance.detach(),
            z_loss=z.detach(),
            top_experts=r.top_experts,
        )
        return MoEOutput(y_Sd.view(x.shape), aux_loss, stats)

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, balance_loss_coef={self.balance_loss_coef}, "
            f"z_loss_coef={self.z_loss_coef}, dispatch={self.dispatch!r}, recompute={self.recompute}"
        )


def tokens_per_expert(top_experts_SK: Tensor, num_experts: int, valid_S: Tensor | None) -> Tensor:
    """(E,) int64 count of routed assignments per expert; padding excluded."""
    ones = torch.ones_like(top_experts_SK)
    if valid_S is not None:
        ones = ones * valid_S.unsqueeze(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=top_experts_SK.device)
    return counts.scatter_add_(0, top_experts_SK.reshape(-1), ones.reshape(-1))
