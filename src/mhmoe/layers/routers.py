"""Routers: pick top-k experts per (sub-)token and their gate values.

Shape legend: S routed items ((sub-)tokens), d their width, E experts, K top-k.

Every router computes in at least float32 (bf16/fp16 inputs and weights are upcast, float64
stays float64): a bf16 softmax over many experts skews the top-k and the balance loss.
A router returns `RouterOutput`; the MoE layer turns it into losses and dispatch. Routers keep
no per-call state, except `SigmoidRouter`'s load counter (a buffer, updated in training mode).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhmoe.layers.experts import integer

RouterName = Literal["softmax", "switch", "xmoe", "sigmoid"]
XMoEForm = Literal["paper", "code"]


class RouterOutput(NamedTuple):
    """A router's decision for S items: the experts and gates, and what the balance loss and z-loss read."""

    top_experts: Tensor  # (S, K) int64: chosen experts, best first
    gates: Tensor  # (S, K) router dtype: weights of the chosen experts' outputs
    balance_probs: Tensor  # (S, E) probabilities entering the balance loss
    logits: Tensor  # (S, E) pre-normalisation scores entering the z-loss


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class Router(nn.Module):
    """Base class. Subclasses implement `route(x_Sd) -> RouterOutput` on upcast input.

    jitter: multiplicative input noise U(1 - jitter, 1 + jitter) in training mode (Switch
    Transformer); 0 disables it.
    pools: 1 for one pool of experts; P for a router that routes item i·P + j within pool j only
        (`HeadRouters`): its balance probabilities and logits are then each item's over its own pool.
    """

    pools: int = 1

    def __init__(self, d_model: int, num_experts: int, top_k: int, jitter: float = 0.0):
        super().__init__()
        d_model, num_experts, top_k = integer(d_model), integer(num_experts), integer(top_k)
        check_top_k(top_k, num_experts)
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.d_model, self.num_experts, self.top_k, self.jitter = d_model, num_experts, top_k, jitter

    def forward(self, x_Sd: Tensor, valid_S: Tensor | None = None) -> RouterOutput:
        """x_Sd: (S, d); valid_S: (S,) bool, False for padding (used only by stateful routers)."""
        x_Sd = x_Sd.to(router_dtype(x_Sd.dtype))
        if self.training and self.jitter > 0:
            x_Sd = x_Sd * torch.empty_like(x_Sd).uniform_(1 - self.jitter, 1 + self.jitter)
        return self.route(x_Sd, valid_S)

    def route(self, x_Sd: Tensor, valid_S: Tensor | None) -> RouterOutput:
        raise NotImplementedError

    def _weight(self, w: Tensor, x: Tensor) -> Tensor:
        return w.to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, jitter={self.jitter}"


def largest_k(scores_SE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of each row's k largest scores, best first, as `Tensor.topk`.

    On the CPU, k = 2 takes two argmax passes instead: torch.topk over a few dozen columns is slower there
    (benchmarks/README.md, "Design measurements"). Ties go to the lower index.
    """
    if scores_SE.device.type != "cpu" or k != 2:
        return scores_SE.topk(k, dim=-1)
    first_S1 = scores_SE.detach().argmax(-1, keepdim=True)
    second_S1 = scores_SE.detach().scatter(-1, first_S1, -torch.inf).argmax(-1, keepdim=True)
    indices_SK = torch.cat([first_S1, second_S1], dim=-1)
    return scores_SE.gather(-1, indices_SK), indices_SK


def top_k_gates(probs_SE: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    gates_SK, top_experts_SK = largest_k(probs_SE, top_k)
    if renormalize:
        gates_SK = gates_SK / gates_SK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_SK.dtype).tiny)
    return top_experts_SK, gates_SK


class SoftmaxRouter(Router):
    """g = softmax(x W_gᵀ), top-k; the k kept gates renormalised to sum 1 when k > 1 (v1 Eq. 5).

    renormalize=True with k = 1 gives Mixtral's gate p/p = 1; scale multiplies the gates (DeepSeek's
    routed_scaling_factor).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        renormalize: bool | None = None,
        scale: float = 1.0,
        jitter: float = 0.0,
    ):
        super().__init__(d_model, num_experts, top_k, jitter)
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.scale = check_scale(scale)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def route(self, x_Sd: Tensor, valid_S: Tensor | None) -> RouterOutput:
        logits_SE = x_Sd @ self._weight(self.weight, x_Sd).t()
        probs_SE = logits_SE.softmax(-1)
        top_experts_SK, gates_SK = top_k_gates(probs_SE, self.top_k, self.renormalize)
        gates_SK = gates_SK if self.scale == 1.0 else gates_SK * self.scale
        return RouterOutput(top_experts_SK, gates_SK, probs_SE, logits_SE)


class SwitchRouter(SoftmaxRouter):
    """Switch Transformer: top-1 softmax, the gate is the chosen expert's probability."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, jitter: float = 0.0):
        if top_k != 1:
            raise ValueError(f"the switch router is top-1; got top_k={top_k} (use router='softmax' for top-k)")
        super().__init__(d_model, num_experts, 1, renormalize=False, jitter=jitter)


class XMoERouter(Router):
    """X-MoE (Chi et al. 2022): route on cosine similarity in a low-dimensional space.

    form="paper": s_e = cos(W x, e_e), probs = softmax(s / τ) with a learnable τ (kept ≥ 0.01;
        initial value 0.3); the balance loss uses softmax(s / balance_temperature) with a fixed
        τ0 (0.3 for softmax gating, as X-MoE and v1's hyperparameters give it; docs/paper-notes.md §3).
    form="code": as the authors' code (fairseq/torchscale `Top1Gate(use_xmoe=True)`): only the
        expert embeddings are normalised (logits = (W x)·ê_e), no temperature, and the embeddings
        are rescaled in place to norm 1.5 at every training forward; the balance loss uses the
        routing softmax itself.
    Both: W is a bias-free d -> dim projection (dim 16 in X-MoE; v1 says 16/H for MH-MoE, the
    authors' code keeps 16), embeddings (E, dim) orthogonally initialised with gain 0.32.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        *,
        form: XMoEForm = "paper",
        dim: int = 16,
        init_temperature: float = 0.3,
        balance_temperature: float = 0.3,
        renormalize: bool | None = None,
        jitter: float = 0.0,
    ):
        super().__init__(d_model, num_experts, top_k, jitter)
        if form not in ("paper", "code"):
            raise ValueError(f"unknown X-MoE form {form!r}; choose 'paper' or 'code'")
        if dim < 1:
            raise ValueError(f"X-MoE routing dim must be >= 1, got {dim}")
        for name, t in (("init_temperature", init_temperature), ("balance_temperature", balance_temperature)):
            if not t > 0:
                raise ValueError(f"{name} must be > 0, got {t}")
        self.form, self.dim, self.balance_temperature = form, dim, balance_temperature
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.projection = nn.Linear(d_model, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)
        if form == "paper":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def route(self, x_Sd: Tensor, valid_S: Tensor | None) -> RouterOutput:
        emb_Eh: Tensor = self.expert_embeddings
        if self.form == "code" and self.training:
            with torch.no_grad():
                emb_Eh.mul_(1.5 / emb_Eh.norm(dim=1, keepdim=True).clamp_min(1e-4))
            # The graph must not save the parameter itself: the next training forward rescales it in
            # place, which would break the backward of a graph holding two forwards.
            emb_Eh = emb_Eh.clone()
        z_Sh = x_Sd @ self._weight(self.projection.weight, x_Sd).t()
        e_Eh = F.normalize(self._weight(emb_Eh, x_Sd), dim=-1, eps=1e-4)
        if self.form == "code":
            logits_SE = z_Sh @ e_Eh.t()
            probs_SE = logits_SE.softmax(-1)
            balance_probs_SE = probs_SE
        else:
            cos_SE = F.normalize(z_Sh, dim=-1, eps=1e-4) @ e_Eh.t()
            temperature = self.log_temperature.to(x_Sd.dtype).exp().clamp_min(0.01)
            logits_SE = cos_SE / temperature
            probs_SE = logits_SE.softmax(-1)
            balance_probs_SE = (cos_SE / self.balance_temperature).softmax(-1)
        top_experts_SK, gates_SK = top_k_gates(probs_SE, self.top_k, self.renormalize)
        return RouterOutput(top_experts_SK, gates_SK, balance_probs_SE, logits_SE)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form!r}, dim={self.dim}"


class SigmoidRouter(Router):
    """DeepSeek-V3 style: sigmoid scores, top-k chosen on score + bias, auxiliary-loss-free balancing.

    The bias (a buffer, no gradient) only affects which experts are chosen; gates are the chosen
    experts' sigmoid scores, normalised to sum 1 when k > 1, times `scale` (routed_scaling_factor).
    In training mode the router counts the
    (sub-)tokens each expert received in `load`; the trainer calls `update_bias()` once per
    optimiser step (after all-reducing `load` when data-parallel): bias_e += rate · sign(mean load − load_e).
    The balance loss, if its coefficient is non-zero, uses the scores normalised per (sub-)token.

    Group-limited routing (DeepSeek-V3's n_group / topk_group): the E experts form `num_groups` groups of
    consecutive experts; each item keeps the `top_groups` groups whose two best biased scores sum highest
    and chooses its top-k among their experts only. num_groups=1 (default) is plain top-k.
    """

    expert_bias: Tensor  # (E,) buffer, >= float32
    load: Tensor  # (E,) buffer, >= float32

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        bias_update_rate: float = 1e-3,
        renormalize: bool | None = None,
        scale: float = 1.0,
        num_groups: int = 1,
        top_groups: int | None = None,
        jitter: float = 0.0,
    ):
        super().__init__(d_model, num_experts, top_k, jitter)
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.bias_update_rate = bias_update_rate
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.scale = check_scale(scale)
        self.num_groups, self.top_groups = check_groups(num_groups, top_groups, num_experts, top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float32))

    def route(self, x_Sd: Tensor, valid_S: Tensor | None) -> RouterOutput:
        logits_SE = x_Sd @ self._weight(self.weight, x_Sd).t()
        scores_SE = logits_SE.sigmoid()
        choice_SE = scores_SE.detach() + self.expert_bias.to(scores_SE.dtype)
        if self.top_groups < self.num_groups:
            choice_SE = limit_groups(choice_SE, self.num_groups, self.top_groups)
        _, top_experts_SK = largest_k(choice_SE, self.top_k)
        gates_SK = scores_SE.gather(-1, top_experts_SK)
        if self.renormalize:
            gates_SK = gates_SK / gates_SK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_SK.dtype).tiny)
        if self.scale != 1.0:
            gates_SK = gates_SK * self.scale
        if self.training:
            chosen_R = top_experts_SK.flatten()
            weight_R = torch.ones_like(chosen_R, dtype=self.load.dtype)
            if valid_S is not None:
                weight_R = valid_S.repeat_interleave(self.top_k).to(self.load.dtype)
            self.load.scatter_add_(0, chosen_R, weight_R)
        balance_probs_SE = scores_SE / scores_SE.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_SE.dtype).tiny)
        return RouterOutput(top_experts_SK, gates_SK, balance_probs_SE, logits_SE)

    def _apply(self, fn, recurse=True):
        # Module.to(torch.bfloat16) casts buffers too; the balancing state stays >= float32 (a bf16
        # counter stops counting exactly past 256, and a 1e-3 bias step vanishes next to 0.5).
        kept = {name: getattr(self, name) for name in ("expert_bias", "load")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if router_dtype(after.dtype) != after.dtype:
                setattr(self, name, before.to(after.device))
        return self

    @torch.no_grad()
    def update_bias(self, load: Tensor | None = None) -> None:
        """One auxiliary-loss-free balancing step, outside autograd; resets the load counter.

        load: (E,) tokens per expert since the last update; defaults to the router's own count.
        """
        load = self.load if load is None else load.to(self.load)
        assert load is not None
        if load.shape != (self.num_experts,):
            raise ValueError(f"load must have shape ({self.num_experts},), got {tuple(load.shape)}")
        self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.load.zero_()


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def check_groups(num_groups: int, top_groups: int | None, num_experts: int, top_k: int) -> tuple[int, int]:
    """(num_groups, top_groups) checked: groups of equal size, enough kept experts for top-k."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= num_experts:
        raise ValueError(f"num_groups must be an integer in 1..num_experts ({num_experts}), got {num_groups!r}")
    if num_experts % num_groups:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_groups ({num_groups})")
    top_groups = num_groups if top_groups is None else top_groups
    if isinstance(top_groups, bool) or not isinstance(top_groups, int) or not 1 <= top_groups <= num_groups:
        raise ValueError(f"top_groups must be an integer in 1..num_groups ({num_groups}), got {top_groups!r}")
    if top_groups * (num_experts // num_groups) < top_k:
        raise ValueError(
            f"top_groups={top_groups} groups of {num_experts // num_groups} experts hold fewer than top_k={top_k}"
        )
    return num_groups, top_groups


def limit_groups(choice_SE: Tensor, num_groups: int, top_groups: int) -> Tensor:
    """DeepSeek-V3's group-limited routing: choice scores outside each item's `top_groups` best groups set to
    −inf; a group's score is the sum of its two best choice scores (its one score for groups of one)."""
    S, E = choice_SE.shape
    grouped_SGn = choice_SE.view(S, num_groups, E // num_groups)
    group_score_SG = grouped_SGn.topk(min(2, E // num_groups), dim=-1).values.sum(-1)
    kept_SG = torch.zeros_like(group_score_SG, dtype=torch.bool)
    kept_SG.scatter_(1, group_score_SG.topk(top_groups, dim=-1).indices, True)
    return grouped_SGn.masked_fill(~kept_SG.unsqueeze(-1), -torch.inf).view(S, E)


ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "switch": SwitchRouter,
    "xmoe": XMoERouter,
    "sigmoid": SigmoidRouter,
}
"""The router classes by the names `RouterConfig.kind` takes (and a layer's `router="xmoe"` keyword form)."""


def check_top_k(top_k: int, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in 1..num_experts ({num_experts}), got {top_k!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Which router picks each item's experts, and its options (each read by the routers that take it).

    An option the chosen router does not take must keep its default: `RouterConfig(kind="softmax",
    form="code")` is an error, not a silently ignored setting.
    """

    kind: RouterName = "softmax"  # softmax, switch, xmoe or sigmoid (`ROUTERS`)
    jitter: float = 0.0  # every router: multiplicative input noise U(1 ± jitter) in training (Switch); 0 = off
    renormalize: bool | None = None  # softmax, xmoe, sigmoid: k kept gates summed to 1; None = when k > 1
    form: XMoEForm = "paper"  # xmoe: "paper" (cosine, learnable temperature) or "code" (the authors' code)
    dim: int | None = (
        None  # xmoe routing dim; None = 16, or 16 // H inside MH-MoE in the paper form (docs/paper-notes.md §3)
    )
    init_temperature: float = 0.3  # xmoe paper form: initial learnable temperature
    balance_temperature: float = 0.3  # xmoe paper form: fixed τ0 of the balance loss's softmax
    bias_update_rate: float = 1e-3  # sigmoid: auxiliary-loss-free balancing step (DeepSeek-V3)
    scale: float = 1.0  # softmax, sigmoid: gates multiplied by it (DeepSeek's routed_scaling_factor)
    num_groups: int = 1  # sigmoid: experts in num_groups groups (DeepSeek-V3's n_group); 1 = no groups
    top_groups: int | None = None  # sigmoid: groups an item may use (topk_group); None = all

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy integers where ints go: stored as ints
            object.__setattr__(self, f.name, integer(getattr(self, f.name)))
        if not isinstance(self.kind, str):
            raise TypeError(f"router must be a name or a Router, got {type(self.kind).__name__}")
        if self.kind not in ROUTERS:
            close = difflib.get_close_matches(self.kind, ROUTERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown router {self.kind!r}{hint}; choose one of {sorted(ROUTERS)}")
        accepted = _constructor_options(ROUTERS[self.kind])
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "kind" and f.name not in accepted and value != f.default:
                raise ValueError(
                    f"router option {f.name}={value!r} does not apply to the {self.kind} router "
                    f"(it takes {', '.join(sorted(accepted)) or 'no options'})"
                )

    def options(self) -> dict[str, Any]:
        """Keyword arguments of the `kind` router's constructor (dim only when set)."""
        accepted = _constructor_options(ROUTERS[self.kind])
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in accepted}
        if values.get("dim", 0) is None:
            del values["dim"]
        return values

    @classmethod
    def from_kwargs(cls, kind: str, router_kwargs: dict | None = None) -> RouterConfig:
        """A router name with its constructor's keyword arguments (the layers' `router_kwargs`)."""
        options = dict(router_kwargs or {})
        names = [f.name for f in dataclasses.fields(cls) if f.name != "kind"]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument {', '.join(map(repr, unknown))} in router_kwargs "
                f"(router options: {', '.join(names)})"
            )
        return cls(kind=cast(RouterName, kind), **options)  # the name is checked in __post_init__


def _constructor_options(router: type[Router]) -> set[str]:
    """The keyword-only options a router class takes (its constructor's arguments after d_model, E, top_k)."""
    parameters = inspect.signature(router.__init__).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_router(router: RouterConfig | Router, *, d_model: int, num_experts: int, top_k: int) -> Router:
    """The router a `RouterConfig` describes, or a `Router` object checked to fit."""
    if isinstance(router, Router):
        got = (router.d_model, router.num_experts, router.top_k)
        if got != (d_model, num_experts, top_k):
            raise ValueError(
                f"router has (d_model, num_experts, top_k) = {got}, the layer needs {(d_model, num_experts, top_k)}"
            )
        return router
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a name or a Router, got {type(router).__name__}")
    return ROUTERS[router.kind](d_model, num_experts, top_k, **router.options())


class HeadRouters(Router):
    """A router per head, each over a pool of its own experts (Multi-Head LatentMoE, arXiv 2602.04870), seen from
    the layer as one router over the H·E experts of all pools: sub-token j of token i (row i·H + j) is routed by
    router j among experts j·E … (j+1)·E − 1. `top_experts` are global expert indices; `balance_probs` and `logits`
    are (S, E), each row's over its own pool, so the z-loss is each head's own and the layer's balance loss the mean
    of the heads' own (SparseMoE). Each head's router keeps its own state (a sigmoid router's load and bias).
    """

    def __init__(self, routers: list[Router]):
        first = routers[0]
        if any((r.d_model, r.num_experts, r.top_k) != (first.d_model, first.num_experts, first.top_k) for r in routers):
            raise ValueError("every head's router must have the same (d_model, num_experts, top_k)")
        super().__init__(first.d_model, len(routers) * first.num_experts, first.top_k)
        self.heads = nn.ModuleList(routers)
        self.pools, self.pool_size = len(routers), first.num_experts

    def head(self, j: int) -> Router:
        """Head j's router."""
        router = self.heads[j]
        assert isinstance(router, Router)
        return router

    def forward(self, x_Sd: Tensor, valid_S: Tensor | None = None) -> RouterOutput:
        H, d = self.pools, x_Sd.shape[-1]
        x_THd = x_Sd.view(-1, H, d)
        valid_TH = None if valid_S is None else valid_S.view(-1, H)
        outs = [
            router(x_THd[:, j], None if valid_TH is None else valid_TH[:, j]) for j, router in enumerate(self.heads)
        ]
        offset_H1 = torch.arange(H, device=x_Sd.device).unsqueeze(-1) * self.pool_size

        def interleave(parts: list[Tensor]) -> Tensor:  # H × (T, ...) -> (T·H, ...), row i·H + j from head j
            return torch.stack(parts, dim=1).flatten(0, 1)

        return RouterOutput(
            top_experts=interleave([o.top_experts + offset_H1[j] for j, o in enumerate(outs)]),
            gates=interleave([o.gates for o in outs]),
            balance_probs=interleave([o.balance_probs for o in outs]),
            logits=interleave([o.logits for o in outs]),
        )

    def extra_repr(self) -> str:
        return f"heads={self.pools}, experts_per_head={self.pool_size}, top_k={self.top_k}"
