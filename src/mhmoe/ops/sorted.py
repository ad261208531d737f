"""The sorted path: send routed (sub-)tokens to their experts with grouped GEMMs and combine the weighted outputs.

Shape legend: S routed (sub-)tokens, d their width, E experts, K top-k, F expert hidden,
R = K·S routed rows. Rows are laid out choice-major (row r = k·S + s), so a stable sort by
expert puts all first choices before second choices within an expert: GShard's priority
when capacity drops the overflow.

Two implementations of one contract, `dispatch(x_Sd, experts, top_experts_SK, gates_SK)`:
- `dispatch_reference` (`mhmoe.ops.reference`): a loop over experts, obviously correct, the test oracle;
- `dispatch_sorted`: sort rows by expert, run all experts with one grouped GEMM per projection
  (`torch.nn.functional.grouped_mm`) or, where that kernel is missing, a loop over contiguous
  slices; combine with gathers and a sum over K, so no atomics and a deterministic result.
  With backend "triton" the gather is fused into the first expert GEMM and the gating and the
  permutation back into the second (`mhmoe.ops.triton_experts`).
The backend is chosen in one place, `mhmoe.ops.backend.resolve_backend`.

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

from typing import Protocol

import torch
from torch import Tensor

from mhmoe.ops import triton_experts
from mhmoe.ops.activations import activate, activate_backward
from mhmoe.ops.backend import Backend, compute_dtype
from mhmoe.ops.grouped import expert_bias_grad, expert_matmul, expert_weight_grad
from mhmoe.ops.reference import ExpertWeights, expert_biases


class _GatherRepeated(torch.autograd.Function):
    """rows_Rd = x_Sd[order_R % S]; backward sums the K copies of each row by gathers, no atomics."""

    @staticmethod
    def forward(ctx, x_Sd: Tensor, order_R: Tensor, inverse_R: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_R)
        ctx.num_items = x_Sd.shape[0]
        return x_Sd.index_select(0, order_R % max(x_Sd.shape[0], 1))

    @staticmethod
    def backward(ctx, grad_Rd: Tensor) -> tuple[Tensor, None, None]:
        (inverse_R,) = ctx.saved_tensors
        if ctx.num_items == 0:  # view(-1, 0, d) is ambiguous; an empty input has an empty gradient
            return grad_Rd.new_zeros(0, grad_Rd.shape[-1]), None, None
        grad_KSd = grad_Rd.index_select(0, inverse_R).view(-1, ctx.num_items, grad_Rd.shape[-1])
        return grad_KSd.sum(0), None, None


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation; backward is the gather by its inverse."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _biased(rows: Tensor | None, biases: tuple[Tensor, Tensor, Tensor] | None, which: int) -> Tensor:
    """rows + the bias `which` (0: b_in, 1: b_out) of each sorted row's expert; with rows None, those biases alone.
    biases: None (rows unchanged) or (b_in (E, n_in), b_out (E, n_out), expert_R (R,))."""
    if biases is None:
        assert rows is not None
        return rows
    per_row = biases[which].index_select(0, biases[2])
    return per_row if rows is None else rows + per_row


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
    F-wide passes, which measured slower (benchmarks/README.md, "Design measurements").
    Expert biases (optional) are added after each GEMM (b_in to h_RF, b_out to y_Rd, gathered per row); their
    gradients are segmented sums over each expert's rows (`expert_bias_grad`), and with `recompute` the gates'
    gradient gains the term g_r · b_out[e].
    """

    @staticmethod
    def forward(ctx, x_Sd, w_in, w_out, gates_R, b_in, b_out, expert_R, source_R, inverse_R, counts_E, *options):
        # source_R: the input row of each sorted row (order_R % S); inverse_R: where each copy r = k·S + s sits;
        # b_in, b_out: the experts' biases or None; expert_R: each sorted row's expert (with biases only)
        activation, backend, recompute = options
        S, d = x_Sd.shape
        biases = None if b_in is None or b_out is None else (b_in, b_out, expert_R)
        h_RF = _biased(expert_matmul(x_Sd.index_select(0, source_R), w_in, counts_E, backend), biases, 0)
        a_RF = activate(h_RF, activation)
        y_Rd = _biased(expert_matmul(a_RF, w_out, counts_E, backend), biases, 1)
        kept = () if recompute else (h_RF, a_RF, y_Rd) if gates_R is not None else (h_RF, a_RF)
        bias_tensors = () if biases is None else biases
        ctx.save_for_backward(x_Sd, w_in, w_out, gates_R, source_R, inverse_R, counts_E, *bias_tensors, *kept)
        ctx.activation, ctx.backend, ctx.biased = activation, backend, biases is not None
        if gates_R is not None:
            y_Rd = y_Rd * gates_R.unsqueeze(-1)  # in the gates' dtype (≥ fp32), summed over K there
        y_KSd = y_Rd.index_select(0, inverse_R).view(-1, S, d)
        return y_KSd[0] if y_KSd.shape[0] == 1 else y_KSd.sum(0)

    @staticmethod
    def backward(ctx, grad_Sd):
        x_Sd, w_in, w_out, gates_R, source_R, inverse_R, counts_E, *kept = ctx.saved_tensors
        biases = tuple(kept[:3]) if ctx.biased else None
        kept = kept[3:] if ctx.biased else kept
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
            h_RF = _biased(expert_matmul(x_Rd, w_in, counts_E, backend), biases, 0)
            a_RF = activate(h_RF, ctx.activation)
            grad_a_RF = expert_matmul(grad_Rd.to(dtype), w_out_t, counts_E, backend)  # ungated for now
            if gated:
                grad_gates_R = (grad_a_RF.to(gates_R.dtype) * a_RF.to(gates_R.dtype)).sum(-1)
                if biases is not None:  # y_r = a_r @ w_out + b_out: the bias's share of g_r's gradient
                    grad_gates_R = grad_gates_R + (grad_Rd * _biased(None, biases, 1).to(gates_R.dtype)).sum(-1)
                grad_a_RF = grad_a_RF.mul_(gates_R.unsqueeze(-1))
        grad_w_out = expert_weight_grad(a_RF, grad_y_Rd, counts_E, backend, like=w_out)
        grad_h_RF = activate_backward(grad_a_RF, h_RF, ctx.activation)
        grad_w_in = expert_weight_grad(x_Rd, grad_h_RF, counts_E, backend, like=w_in)
        grad_x_Sd = None
        if ctx.needs_input_grad[0]:
            grad_x_Rd = expert_matmul(grad_h_RF, w_in.transpose(-1, -2), counts_E, backend)
            grad_x_Sd = grad_x_Rd.index_select(0, inverse_R).view(-1, S, x_Sd.shape[1]).sum(0)
        grad_biases = None
        if biases is not None:
            grad_biases = (expert_bias_grad(grad_h_RF, counts_E), expert_bias_grad(grad_y_Rd, counts_E))
        grad_b_in, grad_b_out = grad_biases or (None, None)
        return grad_x_Sd, grad_w_in, grad_w_out, grad_gates_R, grad_b_in, grad_b_out, *(None,) * 7


class ExpertRunner(Protocol):
    """Runs experts on rows sorted by expert: (x_Rd, counts_E, experts, backend, recompute) -> y_Rd, row
    for row.

    counts_E (E,) int64 counts the rows of each of the layer's E experts, in order; `num_experts` is
    that E (under expert parallelism `experts` holds only this rank's share of them). recompute: the
    layer's setting (keep no expert activations for the backward); a runner that cannot must refuse it.
    """

    num_experts: int

    def __call__(
        self, x_Rd: Tensor, counts_E: Tensor, experts: ExpertWeights, backend: Backend, recompute: bool
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
    no_bias = (None, None, None)
    args = (order_N, inverse_N, counts_E, activation, backend, recompute)
    return _SortedExpertFFN.apply(x_Nd, w_in, w_out, None, *no_bias, *args)


def dispatch_sorted(
    x_Sd: Tensor,
    experts: ExpertWeights,
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
    b_in, b_out = expert_biases(experts)
    if S == 0 and runner is None:  # grouped_mm cannot differentiate empty inputs; give the experts zero gradients
        total = experts.w_in.sum() + experts.w_out.sum()
        for b in (b for b in (b_in, b_out) if b is not None):
            total = total + b.sum()
        return x_Sd + 0 * total.to(x_Sd.dtype)
    num_experts = experts.w_in.shape[0] if runner is None else runner.num_experts
    expert_R = top_experts_SK.t().reshape(-1)  # choice-major: r = k·S + s
    order_R = torch.argsort(expert_R, stable=True)
    inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(K * S, device=order_R.device))
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=x_Sd.device)
    counts_E.scatter_add_(0, expert_R, torch.ones_like(expert_R))

    if runner is None:
        w_in, w_out = experts.w_in.to(dtype), experts.w_out.to(dtype)
        gates_R = gates_SK.t().reshape(-1).index_select(0, order_R)  # each sorted row's gate
        if backend == "triton":  # gather, gating and permute-back fused into the expert GEMMs
            if b_in is not None or b_out is not None:
                raise ValueError("the triton backend has no expert biases; use dispatch='auto' with expert_bias")
            fused = (order_R, counts_E, experts.activation, gates_R, recompute)
            return triton_experts.expert_ffn(x_Sd.to(dtype), w_in, w_out, *fused).to(x_Sd.dtype)
        biases: tuple = (None, None, None)
        if b_in is not None and b_out is not None:
            biases = (b_in.to(dtype), b_out.to(dtype), expert_R.index_select(0, order_R))
        args = (order_R % S, inverse_R, counts_E, experts.activation, backend, recompute)
        return _SortedExpertFFN.apply(x_Sd.to(dtype), w_in, w_out, gates_R, *biases, *args).to(x_Sd.dtype)
    if b_in is not None or b_out is not None:
        raise ValueError(
            f"{type(runner).__name__} runs the experts without their biases; expert_bias needs runner None"
        )
    x_Rd = _GatherRepeated.apply(x_Sd.to(dtype), order_R, inverse_R)  # rows sorted by expert
    y_Rd = runner(x_Rd, counts_E, experts, backend, recompute)
    y_KSd = _PermuteRows.apply(y_Rd, inverse_R, order_R).view(K, S, x_Sd.shape[-1])  # back to choice-major
    y_Sd = (y_KSd * gates_SK.t().unsqueeze(-1)).sum(0)  # in the gates' dtype (≥ fp32)
    return y_Sd.to(x_Sd.dtype)
