"""Grouped GEMMs over rows sorted by expert: `torch.nn.functional.grouped_mm` as an opaque custom op (with its
backward), and a loop over contiguous slices where that kernel cannot run.

Shape legend: R rows sorted by expert (counts_E rows each), k / n the two sides of one projection, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mhmoe.ops.backend import Backend


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


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x_Rk, w_Ekn, offsets_E = inputs
    ctx.save_for_backward(x_Rk, w_Ekn, offsets_E)


def _grouped_mm_backward(ctx, grad_Rn: Tensor) -> tuple[Tensor, Tensor, None]:
    x_Rk, w_Ekn, offsets_E = ctx.saved_tensors
    grad_Rn = grad_Rn.contiguous()
    grad_x = grouped_mm(grad_Rn, w_Ekn.transpose(-1, -2), offsets_E)
    return grad_x, grouped_mm_weight_grad(x_Rk, grad_Rn, offsets_E), None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _expert_rows(counts_E: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert that has rows, for the slices loops: only those experts run
    (decoding routes fewer rows than there are experts). A host sync: the price of the fallback."""
    sizes, ends = counts_E.tolist(), counts_E.cumsum(0).tolist()
    return [(e, end - n, end) for e, (n, end) in enumerate(zip(sizes, ends)) if n]


def expert_matmul(x_Rk: Tensor, w_Ekn: Tensor, counts_E: Tensor, backend: Backend) -> Tensor:
    """Rows sorted by expert (counts_E rows each) times their expert's matrix: (R, k) -> (R, n)."""
    if backend == "grouped_mm":
        return grouped_mm(x_Rk.contiguous(), w_Ekn, counts_E.cumsum(0).to(torch.int32))
    parts = [x_Rk[start:end] @ w_Ekn[e] for e, start, end in _expert_rows(counts_E)]
    return torch.cat(parts) if parts else x_Rk.new_zeros(0, w_Ekn.shape[-1])


def expert_weight_grad(
    x_Rk: Tensor, grad_Rn: Tensor, counts_E: Tensor, backend: Backend, like: Tensor | None = None
) -> Tensor:
    """Per expert e, x_eᵀ @ grad_e over its rows: the (E, k, n) gradient of `expert_matmul`'s weights.

    like: those weights. When they are a transposed view (stored (E, n, k), as transformers stores its experts),
    the gradient is computed as (grad_eᵀ @ x_e)ᵀ, in their own memory layout, as torch's mm backward does: the
    parameter's gradient then accumulates without a strided copy, and the GEMM writes rows of k."""
    if like is not None and like.dim() == 3 and like.stride(-2) == 1 and like.stride(-1) != 1:
        return expert_weight_grad(grad_Rn, x_Rk, counts_E, backend).transpose(-1, -2)
    if backend == "grouped_mm":
        return grouped_mm_weight_grad(x_Rk, grad_Rn.contiguous(), counts_E.cumsum(0).to(torch.int32))
    grad_Ekn = x_Rk.new_zeros(counts_E.shape[0], x_Rk.shape[1], grad_Rn.shape[1])
    for e, start, end in _expert_rows(counts_E):
        torch.mm(x_Rk[start:end].t(), grad_Rn[start:end], out=grad_Ekn[e])
    return grad_Ekn


def expert_bias_grad(grad_Rn: Tensor, counts_E: Tensor) -> Tensor:
    """Per expert e, the sum of its rows of grad_Rn: the (E, n) gradient of a per-expert bias added to rows sorted
    by expert. A segmented reduction (no atomics, deterministic); an expert with no rows gets zeros."""
    return torch.segment_reduce(grad_Rn, "sum", lengths=counts_E, axis=0, unsafe=True)
