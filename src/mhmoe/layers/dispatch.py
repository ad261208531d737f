"""Dispatch: send routed (sub-)tokens to their experts and combine the weighted outputs.

Shape legend: S routed (sub-)tokens, d their width, E experts, K top-k, F expert hidden,
R = K·S routed rows. Rows are laid out choice-major (row r = k·S + s), so a stable sort by
expert puts all first choices before second choices within an expert: GShard's priority
when capacity drops the overflow.

Two implementations of one contract, `dispatch(x_Sd, experts, top_experts_SK, gates_SK)`:
- `dispatch_reference`: a loop over experts, obviously correct, used only as the test oracle;
- `dispatch_sorted`: sort rows by expert, run all experts with one grouped GEMM per projection
  (`torch.nn.functional.grouped_mm`) or, where that kernel is missing, a loop over contiguous
  slices; combine with gathers and a sum over K, so no atomics and a deterministic result.
  With backend "triton" the gather is fused into the first expert GEMM and the gating and the
  permutation back into the second (`mhmoe.kernels.triton_experts`).
The backend is chosen in one place, `resolve_backend`.

With all experts here, gather, expert GEMMs, gating and the sum over K form one autograd node
(`_SortedExpertFFN`; its Triton twin is `triton_experts._ExpertFFN`) that keeps the pre-activations,
activations and expert outputs for its backward (the Triton node not even those outputs), or nothing
with `recompute`. Expert parallelism (`mhmoe.parallel`) instead installs an
`ExpertRunner`: `dispatch_sorted` hands it the rows grouped by expert, and it sends them to the
ranks holding their experts and back, so the layers never see a process group.

Assignments the caller wants skipped (capacity overflow, padding) come with gate 0. The sorted
path still runs them through their expert (shapes stay static, no host sync) and multiplies the
result by 0; capacity therefore bounds what a token receives, not the work done.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mhmoe.kernels import triton_experts
from mhmoe.layers.experts import Experts, activate, activate_backward, ffn

Backend = Literal["grouped_mm", "slices", "triton"]
DispatchName = Literal["auto", "grouped_mm", "slices", "triton", "reference"]
DISPATCHES: tuple[str, ...] = ("auto", "grouped_mm", "slices", "triton", "reference")
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(requested: str, dtype: torch.dtype, device: torch.device, dims: tuple[int, ...] = ()) -> Backend:
    """The one place that picks the expert-GEMM backend.

    "auto": grouped_mm when torch has it and supports the case (CPU: fp32/bf16/fp16; CUDA: bf16/fp16
    on compute capability ≥ 8.0), else "slices". Asking for grouped_mm where it cannot run is an error.
    dims: the GEMM widths (d, F); grouped_mm needs every row stride to be a multiple of 16 bytes.
    "triton" (`mhmoe.kernels.triton_experts`: the gather and the scatter fused into the GEMMs) must be
    asked for: it needs Triton and CUDA, or the CPU under TRITON_INTERPRET=1 (tests). "auto" does not
    pick it until it has been measured against grouped_mm on a GPU (benchmarks/README.md).
    """
    if requested == "triton":
        if not triton_experts.supports(device, dtype):
            raise ValueError(
                f"the triton backend cannot run {dtype} on {device}: it needs triton installed "
                f"(pip install 'mhmoe[triton]') and a CUDA device, or TRITON_INTERPRET=1 on the CPU; use 'auto'"
            )
        return "triton"
    supported = _HAS_GROUPED_MM and dtype in _GROUPED_MM_DTYPES
    supported = supported and all(n * dtype.itemsize % 16 == 0 for n in dims)
    if device.type == "cuda":
        supported = supported and dtype != torch.float32 and torch.cuda.get_device_capability(device) >= (8, 0)
    elif device.type != "cpu":
        supported = False
    if requested == "auto":
        return "grouped_mm" if supported else "slices"
    if requested == "grouped_mm" and not supported:
        raise ValueError(
            f"grouped_mm cannot run {dtype} on {device} with widths {dims} (rows must be multiples of 16 bytes) "
            f"with torch {torch.__version__}; use 'slices'"
        )
    if requested not in ("grouped_mm", "slices"):
        raise ValueError(f"unknown dispatch backend {requested!r}; choose one of {DISPATCHES}")
    return requested  # type: ignore[return-value]


def expert_capacity(capacity_factor: float, num_items: int, top_k: int, num_experts: int) -> int:
    """Rows each expert may take: ceil(capacity_factor · K · S / E), at least 1."""
    return max(1, math.ceil(capacity_factor * top_k * num_items / num_experts))


def capacity_keep(top_experts_SK: Tensor, capacity: int, num_experts: int, valid_S: Tensor | None) -> Tensor:
    """(S, K) bool: assignments within their expert's capacity, first choices before second (GShard).

    Invalid (padding) items take no capacity and are not kept.
    """
    S, K = top_experts_SK.shape
    expert_R = top_experts_SK.t().reshape(-1)
    if valid_S is not None:
        expert_R = torch.where(valid_S.repeat(K), expert_R, num_experts)  # padding sorts last
    order_R = torch.argsort(expert_R, stable=True)
    sorted_expert_R = expert_R[order_R]
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_R.device)
    counts.scatter_add_(0, expert_R, torch.ones_like(expert_R))
    starts = counts.cumsum(0) - counts
    position_R = torch.arange(K * S, device=expert_R.device) - starts[sorted_expert_R]
    keep_sorted_R = (position_R < capacity) & (sorted_expert_R < num_experts)
    keep_R = torch.empty_like(keep_sorted_R).scatter_(0, order_R, keep_sorted_R)
    return keep_R.view(K, S).t()


def capacity_keep_reference(top_experts_SK: Tensor, capacity: int, num_experts: int, valid_S: Tensor | None) -> Tensor:
    """Loop form of `capacity_keep`, for tests."""
    S, K = top_experts_SK.shape
    keep = torch.zeros(S, K, dtype=torch.bool)
    used = [0] * num_experts
    for k in range(K):
        for s in range(S):
            if valid_S is not None and not valid_S[s]:
                continue
            e = int(top_experts_SK[s, k])
            if used[e] < capacity:
                keep[s, k] = True
                used[e] += 1
    return keep.to(top_experts_SK.device)


def dispatch_reference(x_Sd: Tensor, experts: Experts, top_experts_SK: Tensor, gates_SK: Tensor) -> Tensor:
    """y_s = Σ_k gates[s, k] · expert_{top[s, k]}(x_s), one expert at a time. (S, d) -> (S, d)."""
    y_Sd = torch.zeros(x_Sd.shape, dtype=gates_SK.dtype, device=x_Sd.device)
    # unbind once: indexing w[e] per expert would make backward add E full-size zero gradients
    for e, (w_in, w_out) in enumerate(zip(experts.w_in.unbind(0), experts.w_out.unbind(0))):
        s_N, k_N = torch.nonzero(top_experts_SK == e, as_tuple=True)
        out_Nd = ffn(x_Sd[s_N], w_in, w_out, experts.activation)
        y_Sd = y_Sd.index_add(0, s_N, gates_SK[s_N, k_N, None] * out_Nd)
    return y_Sd.to(x_Sd.dtype)


class _GatherRepeated(torch.autograd.Function):
    """rows_Rd = x_Sd[order_R % S]; backward sums the K copies of each row by gathers, no atomics."""

    @staticmethod
    def forward(ctx, x_Sd: Tensor, order_R: Tensor, inverse_R: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse_R)
        ctx.num_items = x_Sd.shape[0]
        return x_Sd.index_select(0, order_R % max(x_Sd.shape[0], 1))

    @staticmethod
    def backward(ctx, grad_Rd: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inverse_R,) = ctx.saved_tensors
        if ctx.num_items == 0:  # view(-1, 0, d) is ambiguous; an empty input has an empty gradient
            return grad_Rd.new_zeros(0, grad_Rd.shape[-1]), None, None
        grad_KSd = grad_Rd.index_select(0, inverse_R).view(-1, ctx.num_items, grad_Rd.shape[-1])
        return grad_KSd.sum(0), None, None


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation; backward is the gather by its inverse."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@torch.library.custom_op("mhmoe::grouped_mm", mutates_args=())
def grouped_mm(x_Rk: Tensor, w_Ekn: Tensor, offsets_E: Tensor) -> Tensor:
    """`F.grouped_mm` as an opaque op: (R, k) rows in expert groups ending at offsets_E, times (E, k, n).

    Wrapped so torch.compile sees our shape rule (the stock one accepts only bf16) and so backward
    always gets a contiguous gradient (the kernel rejects expanded ones).
    """
    return F.grouped_mm(x_Rk, w_Ekn, offs=offsets_E)


@grouped_mm.register_fake
def _(x_Rk: Tensor, w_Ekn: Tensor, offsets_E: Tensor) -> Tensor:
    return x_Rk.new_empty(x_Rk.shape[0], w_Ekn.shape[-1])


@torch.library.custom_op("mhmoe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x_Rk: Tensor, grad_Rn: Tensor, offsets_E: Tensor) -> Tensor:
    """Per group e: x_eᵀ @ grad_e -> (E, k, n); an expert with no rows gets zeros."""
    return F.grouped_mm(x_Rk.t(), grad_Rn, offs=offsets_E)


@grouped_mm_weight_grad.register_fake
def _(x_Rk: Tensor, grad_Rn: Tensor, offsets_E: Tensor) -> Tensor:
    return x_Rk.new_empty(offsets_E.shape[0], x_Rk.shape[1], grad_Rn.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x_Rk, w_Ekn, offsets_E = inputs
    ctx.save_for_backward(x_Rk, w_Ekn, offsets_E)


def _grouped_mm_backward(ctx, grad_Rn: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[no-untyped-def]
    x_Rk, w_Ekn, offsets_E = ctx.saved_tensors
    grad_Rn = grad_Rn.contiguous()
    grad_x = grouped_mm(grad_Rn, w_Ekn.transpose(-1, -2), offsets_E)
    return grad_x, grouped_mm_weight_grad(x_Rk, grad_Rn, offsets_E), None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def expert_matmul(x_Rk: Tensor, w_Ekn: Tensor, counts_E: Tensor, backend: Backend) -> Tensor:
    """Rows sorted by expert (counts_E rows each) times their expert's matrix: (R, k) -> (R, n)."""
    if backend == "grouped_mm":
        return grouped_mm(x_Rk.contiguous(), w_Ekn, counts_E.cumsum(0).to(torch.int32))
    sizes = counts_E.tolist()  # host sync: the price of the fallback
    return torch.cat([rows @ w for rows, w in zip(torch.split(x_Rk, sizes), w_Ekn.unbind(0))])


def expert_weight_grad(x_Rk: Tensor, grad_Rn: Tensor, counts_E: Tensor, backend: Backend) -> Tensor:
    """Per expert e, x_eᵀ @ grad_e over its rows: the (E, k, n) gradient of `expert_matmul`'s weights."""
    if backend == "grouped_mm":
        return grouped_mm_weight_grad(x_Rk, grad_Rn.contiguous(), counts_E.cumsum(0).to(torch.int32))
    sizes = counts_E.tolist()
    return torch.stack([x.t() @ g for x, g in zip(torch.split(x_Rk, sizes), torch.split(grad_Rn, sizes))])


class _SortedExpertFFN(torch.autograd.Function):
    """y_s = Σ_k gate_{k,s} · expert(x_s) for rows sorted by expert: gather, both GEMMs, gating and the
    sum over K in one autograd node, so that the backward keeps only what it needs. gates_R None: no
    gating (each row's output as is; the expert-parallel runner's local step, K = 1).

    Kept for the backward: the pre-activation h_RF, the activation a_RF and, with gates, the ungated
    expert outputs y_Rd (for the gates' gradient g_r · y_r, over d columns); not the gathered rows,
    which the backward gathers again (a d-wide copy). With `recompute` nothing is kept: the backward
    also recomputes h_RF (one more GEMM) and a_RF, and takes the gates' gradient as (g_r @ w_outᵀ) · a_r,
    whose first factor it computes anyway (SonicMoE's trick, Guo et al. 2025), so y_Rd needs no second
    GEMM. Taking the gates' gradient that way always would not keep y_Rd either, but costs two more
    F-wide passes: MH-MoE's layer at the `cpu` preset's shape (d = 32, F = 448) took 16% longer on 2
    CPU cores.
    """

    @staticmethod
    def forward(ctx, x_Sd, w_in, w_out, gates_R, source_R, inverse_R, counts_E, activation, backend, recompute):  # type: ignore[override]
        # source_R: the input row of each sorted row (order_R % S); inverse_R: where each copy r = k·S + s sits
        S, d = x_Sd.shape
        h_RF = expert_matmul(x_Sd.index_select(0, source_R), w_in, counts_E, backend)
        a_RF = activate(h_RF, activation)
        y_Rd = expert_matmul(a_RF, w_out, counts_E, backend)
        kept = () if recompute else (h_RF, a_RF, y_Rd) if gates_R is not None else (h_RF, a_RF)
        ctx.save_for_backward(x_Sd, w_in, w_out, gates_R, source_R, inverse_R, counts_E, *kept)
        ctx.activation, ctx.backend = activation, backend
        if gates_R is not None:
            y_Rd = y_Rd * gates_R.unsqueeze(-1)  # in the gates' dtype (≥ fp32), summed over K there
        y_KSd = y_Rd.index_select(0, inverse_R).view(-1, S, d)
        return y_KSd[0] if y_KSd.shape[0] == 1 else y_KSd.sum(0)

    @staticmethod
    def backward(ctx, grad_Sd):  # type: ignore[override]
        x_Sd, w_in, w_out, gates_R, source_R, inverse_R, counts_E, *kept = ctx.saved_tensors
        S, backend, dtype = x_Sd.shape[0], ctx.backend, x_Sd.dtype
        w_out_t = w_out.transpose(-1, -2)
        x_Rd = x_Sd.index_select(0, source_R)
        grad_Rd = grad_Sd.index_select(0, source_R)  # each row's token's gradient (gates' dtype)
        gated = gates_R is not None
        grad_y_Rd = (grad_Rd * gates_R.unsqueeze(-1) if gated else grad_Rd).to(dtype)  # of the ungated outputs
        grad_gates_R = None
        if kept:
            h_RF, a_RF, *y_Rd = kept  # the outputs only with gates
            if gated:
                grad_gates_R = (grad_Rd * y_Rd[0].to(gates_R.dtype)).sum(-1)
            grad_a_RF = expert_matmul(grad_y_Rd, w_out_t, counts_E, backend)
        else:
            h_RF = expert_matmul(x_Rd, w_in, counts_E, backend)
            a_RF = activate(h_RF, ctx.activation)
            grad_a_RF = expert_matmul(grad_Rd.to(dtype), w_out_t, counts_E, backend)  # ungated for now
            if gated:
                grad_gates_R = (grad_a_RF.to(gates_R.dtype) * a_RF.to(gates_R.dtype)).sum(-1)
                grad_a_RF = grad_a_RF.mul_(gates_R.unsqueeze(-1))
        grad_w_out = expert_weight_grad(a_RF, grad_y_Rd, counts_E, backend)
        grad_h_RF = activate_backward(grad_a_RF, h_RF, ctx.activation)
        grad_w_in = expert_weight_grad(x_Rd, grad_h_RF, counts_E, backend)
        grad_x_Sd = None
        if ctx.needs_input_grad[0]:
            grad_x_Rd = expert_matmul(grad_h_RF, w_in.transpose(-1, -2), counts_E, backend)
            grad_x_Sd = grad_x_Rd.index_select(0, inverse_R).view(-1, S, x_Sd.shape[1]).sum(0)
        return grad_x_Sd, grad_w_in, grad_w_out, grad_gates_R, None, None, None, None, None, None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's for float32 input under autocast, else x's."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertRunner(Protocol):
    """Runs experts on rows sorted by expert: (x_Rd, counts_E, experts, backend, recompute) -> y_Rd, row
    for row.

    counts_E (E,) int64 counts the rows of each of the layer's E experts, in order; `num_experts` is
    that E (under expert parallelism `experts` holds only this rank's share of them). recompute: the
    layer's setting (keep no expert activations for the backward); a runner that cannot must refuse it.
    """

    num_experts: int

    def __call__(
        self, x_Rd: Tensor, counts_E: Tensor, experts: Experts, backend: Backend, recompute: bool
    ) -> Tensor: ...


def permuted_expert_ffn(
    x_Nd: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    order_N: Tensor,
    inverse_N: Tensor,
    counts_E: Tensor,
    activation: str,
    backend: Backend,
    recompute: bool = False,
) -> Tensor:
    """act(x @ w_in[e]) @ w_out[e] for rows taken in `order_N` (then grouped by expert, counts_E rows
    each; inverse_N its inverse), each result written back at its own input row: (N, d) -> (N, d), in
    the weights' dtype. The expert-parallel runner's local step; one autograd node (`_SortedExpertFFN`).

    No rows at all: an empty result that still gives the weights (zero) gradients, since grouped_mm
    cannot differentiate empty inputs.
    """
    x_Nd = x_Nd.to(w_in.dtype)
    if x_Nd.shape[0] == 0:
        return x_Nd + 0 * (w_in.sum() + w_out.sum())
    if backend == "triton":  # the gather and the write-back fused into the GEMMs
        return triton_experts.expert_ffn(x_Nd, w_in, w_out, order_N, counts_E, activation, recompute=recompute)
    return _SortedExpertFFN.apply(x_Nd, w_in, w_out, None, order_N, inverse_N, counts_E, activation, backend, recompute)


def dispatch_sorted(
    x_Sd: Tensor,
    experts: Experts,
    top_experts_SK: Tensor,
    gates_SK: Tensor,
    backend: Backend,
    runner: ExpertRunner | None = None,
    recompute: bool = False,
) -> Tensor:
    """Same contract as `dispatch_reference`: sort by expert, run the experts, gather-and-sum combine.

    runner: who runs the experts on the sorted rows (default: all experts here, in one autograd node,
    `_SortedExpertFFN`). A runner is called even when S == 0: a distributed one must join its
    collectives on every rank.
    recompute: keep no expert activations for the backward, recompute them there (one more GEMM).
    Passed on to a runner.
    """
    S, K = top_experts_SK.shape
    dtype = compute_dtype(x_Sd)
    if S == 0 and runner is None:  # grouped_mm cannot differentiate empty inputs; give the experts zero gradients
        return x_Sd + 0 * (experts.w_in.sum() + experts.w_out.sum()).to(x_Sd.dtype)
    num_experts = experts.num_experts if runner is None else runner.num_experts
    expert_R = top_experts_SK.t().reshape(-1)  # choice-major: r = k·S + s
    order_R = torch.argsort(expert_R, stable=True)
    inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(K * S, device=order_R.device))
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=x_Sd.device)
    counts_E.scatter_add_(0, expert_R, torch.ones_like(expert_R))

    if runner is None:
        w_in, w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
        gates_R = gates_SK.t().reshape(-1).index_select(0, order_R)  # each sorted row's gate
        if backend == "triton":  # gather, gating and permute-back fused into the expert GEMMs
            args = (order_R, counts_E, experts.activation, gates_R, recompute)
            return triton_experts.expert_ffn(x_Sd.to(dtype), w_in, w_out, *args).to(x_Sd.dtype)
        args = (order_R % S, inverse_R, counts_E, experts.activation, backend, recompute)
        return _SortedExpertFFN.apply(x_Sd.to(dtype), w_in, w_out, gates_R, *args).to(x_Sd.dtype)
    x_Rd = _GatherRepeated.apply(x_Sd.to(dtype), order_R, inverse_R)  # rows sorted by expert
    y_Rd = runner(x_Rd, counts_E, experts, backend, recompute)
    y_KSd = _PermuteRows.apply(y_Rd, inverse_R, order_R).view(K, S, x_Sd.shape[-1])  # back to choice-major
    y_Sd = (y_KSd * gates_SK.t().unsqueeze(-1)).sum(0)  # in the gates' dtype (≥ fp32)
    return y_Sd.to(x_Sd.dtype)
