"""Triton kernels for the experts: grouped GEMMs that gather their input rows and scatter their output rows.

Shape legend: S routed items, K top-k, R = K·S routed rows, E experts, d item width, F expert hidden,
k / n the two sides of one projection. Rows "sorted" are ordered by expert (`order_R[r]` is the
choice-major row, k·S + s, that sorted row r came from); "choice-major" rows are in k·S + s order.

Plain sort + grouped_mm (the torch path in `mhmoe.ops.sorted`) materialises permuted copies:
x gathered into sorted order, the outputs taken back to token order, and the same in backward. When
rows are narrow (MH-MoE's sub-tokens are D/H wide) these copies cost as much as the GEMMs. The two
kernels here fold the permutations (and the gates) into the GEMMs, as ScatterMoE does:

    rows_mm    : out[out_index[r]] = scale[r] · a[a_index[r]] @ w[e(r)]   (index vectors and scale optional)
    weight_grad: dw[e] = Σ_{r of e} (row_scale[r] · a[a_index[r]])ᵀ ⊗ g[g_index[r]]

The first expert projection is rows_mm with a_index (gather x), the second rows_mm with out_index and
scale (gate and write choice-major rows); `_ExpertFFN` is the autograd node around them. Work is split
into tiles of BLOCK_M rows that never straddle two experts; the tile schedule is computed on the
device from the expert counts (`Schedule`), with a static upper bound on the number of tiles,
so there is no host synchronisation and the launch is CUDA-graph capturable. Experts with no rows
get no tiles and a zero weight gradient. On a GPU the other tile sizes and launch settings are
autotuned on first use for each set of widths, flags and dtypes (`_ROWS_CONFIGS`, `_GRAD_CONFIGS`:
run a step before capturing a graph); the interpreter uses one small tile.

These kernels run on CUDA and, for tests, on the CPU under TRITON_INTERPRET=1. The reference for
every output and gradient is `dispatch_reference` (tests/test_triton.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mhmoe.ops.activations import activate, activate_backward

BLOCK_M = 64  # rows per tile of the row kernel; also the tile granularity of the schedule
_recording: list[tuple[Any, tuple, dict]] | None = None  # see recorded_launches


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run here: Triton installed, and CUDA (fp32/bf16/fp16) or the CPU interpreter."""
    if not triton_available() or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    """(triton, rows_mm, weight_grad): the two kernels, autotuned, built on first use (importing this module must
    not need Triton).

    The kernels use only Triton builtins (tl.full, not tl.zeros): helpers of triton.language that are
    themselves @triton.jit functions are fixed as compiled or interpreted when triton is imported, so
    they would break TRITON_INTERPRET=1 set after that import (e.g. once torch.compile loaded triton).
    """
    import triton

    rows_configs, grad_configs = _configs(triton)
    rows_key = ["N", "K", "HAS_A_INDEX", "HAS_OUT_INDEX", "HAS_SCALE"]  # the autotuner adds the dtypes
    grad_key = ["K", "N", "HAS_A_INDEX", "HAS_G_INDEX", "HAS_ROW_SCALE"]
    rows_mm = triton.autotune(configs=rows_configs, key=rows_key)(_rows_mm_kernel())
    weight_grad = triton.autotune(configs=grad_configs, key=grad_key)(_weight_grad_kernel())
    return triton, rows_mm, weight_grad


def _configs(triton: Any) -> tuple[list, list]:
    """The autotuner's candidate launch settings of the two kernels."""
    if interpreting():  # one small config, nothing timed: the interpreter only checks the arithmetic
        return [triton.Config(dict(BLOCK_N=32, BLOCK_K=32))], [triton.Config(dict(BLOCK_K=32, BLOCK_N=32, BLOCK_R=32))]
    # timed once per widths, flags and dtypes on the GPU at hand (configs that do not fit are skipped)
    rows = [
        triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=warps, num_stages=stages)
        for n, k, warps, stages in _ROWS_CONFIGS
    ]
    grad = [
        triton.Config(dict(BLOCK_K=k, BLOCK_N=n, BLOCK_R=r), num_warps=warps, num_stages=stages)
        for k, n, r, warps, stages in _GRAD_CONFIGS
    ]
    return rows, grad


def _rows_mm_kernel() -> Any:
    """out[out_index[r]] = scale[r] · a[a_index[r]] @ w[e(r)] over the schedule's tiles (module doc)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_mm(
        a_ptr, w_ptr, out_ptr, a_index_ptr, out_index_ptr, scale_ptr,
        tile_expert_ptr, tile_start_ptr, tile_end_ptr,
        N, K,
        stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on,
        HAS_A_INDEX: tl.constexpr, HAS_OUT_INDEX: tl.constexpr, HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        expert = tl.load(tile_expert_ptr + tile)
        if expert < 0:  # past the last real tile
            return
        rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(tile_end_ptr + tile)
        src = tl.load(a_index_ptr + rows, mask=row_ok, other=0) if HAS_A_INDEX else rows
        dst = tl.load(out_index_ptr + rows, mask=row_ok, other=0) if HAS_OUT_INDEX else rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: a jit function (see below)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                a_ptr + src.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(a, w, input_precision=PRECISION)
        if HAS_SCALE:  # each row times its gate, in fp32 before the one rounding to the output dtype
            acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(
            out_ptr + dst.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )

    return rows_mm


def _weight_grad_kernel() -> Any:
    """dw[e] = Σ_{r of e} (row_scale[r] · a[a_index[r]])ᵀ ⊗ g[g_index[r]], one program per (expert, tile)."""
    import triton
    import triton.language as tl

    @triton.jit
    def weight_grad(
        a_ptr, g_ptr, dw_ptr, a_index_ptr, g_index_ptr, row_scale_ptr, row_start_ptr, row_end_ptr,
        K, N,
        stride_am, stride_ak, stride_gm, stride_gn, stride_de, stride_dk, stride_dn,
        HAS_A_INDEX: tl.constexpr, HAS_G_INDEX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        expert = tl.program_id(0)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok, col_ok = ks < K, cols < N
        end = tl.load(row_end_ptr + expert)
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for r0 in range(tl.load(row_start_ptr + expert), end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < end
            a_rows = tl.load(a_index_ptr + rows, mask=row_ok, other=0) if HAS_A_INDEX else rows
            g_rows = tl.load(g_index_ptr + rows, mask=row_ok, other=0) if HAS_G_INDEX else rows
            a_t = tl.load(  # (BLOCK_K, BLOCK_R): rows of a, transposed
                a_ptr + a_rows.to(tl.int64)[None, :] * stride_am + ks[:, None] * stride_ak,
                mask=row_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            g = tl.load(
                g_ptr + g_rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if HAS_ROW_SCALE:  # on a's side: scaling g made fp32 (FMA) tiles spill (`mhmoe.ops.triton_ahead`)
                row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
                a_t = (a_t.to(tl.float32) * row_scale[None, :]).to(g.dtype)
            acc += tl.dot(a_t, g, input_precision=PRECISION)
        tl.store(
            dw_ptr + expert.to(tl.int64) * stride_de + ks[:, None] * stride_dk + cols[None, :] * stride_dn,
            acc.to(dw_ptr.dtype.element_ty),
            mask=k_ok[:, None] & col_ok[None, :],
        )

    return weight_grad


# Candidate tiles for the GPU: (BLOCK_N, BLOCK_K, warps, stages) of rows_mm (BLOCK_M is the schedule's)
# and (BLOCK_K, BLOCK_N, BLOCK_R, warps, stages) of weight_grad; the usual bf16 GEMM tiles of
# Ampere/Hopper Triton matmuls, from 64-wide to 256-wide.
_ROWS_CONFIGS = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 3), (128, 32, 4, 4), (128, 128, 8, 3)]
_GRAD_CONFIGS = [
    (64, 64, 32, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
]


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The tile the GPU autotuner chose for each key it has timed so far, per kernel: {"rows_mm": {key:
    config}, "weight_grad": {...}}; empty when the kernels were never built (the interpreter times nothing)."""
    if _kernels.cache_info().currsize == 0:
        return {}
    _, rows, grad = _kernels()
    tiles = {
        name: {str(k): str(c) for k, c in kernel.cache.items()}
        for name, kernel in (("rows_mm", rows), ("weight_grad", grad))
    }
    return {name: chosen for name, chosen in tiles.items() if chosen}


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 on TF32 tensor cores only where torch's own CUDA matmuls may use them
    (`torch.backends.cuda.matmul.allow_tf32`, e.g. after `torch.set_float32_matmul_precision("high")`), else
    exact (FMA); bf16 and fp16 ignore it."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


class Schedule(NamedTuple):
    """Where the rows of each expert lie once sorted, and the row tiles of `rows_mm`, all on the device.

    row_start_E / row_end_E bound expert e's sorted rows. tile_expert_T: expert of each tile, -1 past the
    last one; tile_start_T / tile_end_T: its rows. `Schedule.build` makes one from the expert counts.
    """

    row_start_E: Tensor
    row_end_E: Tensor
    tile_expert_T: Tensor
    tile_start_T: Tensor
    tile_end_T: Tensor
    block_m: int = BLOCK_M

    @classmethod
    def build(cls, counts_E: Tensor, num_rows: int, block_m: int = BLOCK_M) -> Schedule:
        """counts_E: (E,) rows per expert, num_rows their sum. The number of tiles T = ceil(R / block_m) + E
        bounds the real count for any routing, so no shape depends on the routing."""
        E = counts_E.shape[0]
        row_end_E = counts_E.cumsum(0)
        row_start_E = row_end_E - counts_E
        tiles_E = (counts_E + block_m - 1) // block_m
        tile_end_E = tiles_E.cumsum(0)
        tile = torch.arange(-(-num_rows // block_m) + E, device=counts_E.device)
        expert_T = torch.searchsorted(tile_end_E, tile, right=True)  # E for tiles past the last
        e_T = expert_T.clamp(max=E - 1)
        tile_start_T = row_start_E[e_T] + (tile - (tile_end_E - tiles_E)[e_T]) * block_m
        tile_expert_T = torch.where(expert_T < E, expert_T, -1)
        return cls(row_start_E, row_end_E, tile_expert_T, tile_start_T, row_end_E[e_T], block_m)


def _launch(kernel: Any, grid: Any, *args: Any, **meta: Any) -> None:
    if _recording is not None:
        _recording.append((kernel, args, meta))
    else:
        kernel[grid](*args, **meta)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Inside, the kernels are not run: each launch is recorded as (autotuned kernel, arguments, keyword
    arguments) and its output is left unwritten. How `mhmoe.ops.triton_ahead` learns what a layer step
    launches, to build it for a GPU the machine does not have. Not thread-safe; does not nest."""
    global _recording
    if _recording is not None:
        raise RuntimeError("recorded_launches() does not nest")
    _recording = []
    try:
        yield _recording
    finally:
        _recording = None


def rows_mm(
    a: Tensor,
    w_Ekn: Tensor,
    schedule: Schedule,
    num_out_rows: int,
    a_index: Tensor | None = None,
    out_index: Tensor | None = None,
    scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """out[out_index[r]] = scale[r] · (a[a_index[r]] @ w[e(r)]) for every sorted row r (indices default to r,
    scale to 1); out in out_dtype (default a's), accumulated in fp32."""
    tiles = schedule.tile_expert_T, schedule.tile_start_T, schedule.tile_end_T
    return _rows_mm_op(a, w_Ekn, *tiles, schedule.block_m, num_out_rows, a_index, out_index, scale, out_dtype)


def weight_grad(
    a: Tensor,
    g: Tensor,
    schedule: Schedule,
    a_index: Tensor | None = None,
    g_index: Tensor | None = None,
    row_scale: Tensor | None = None,
) -> Tensor:
    """dw[e] = Σ over expert e's sorted rows r of (row_scale[r] · a[a_index[r]])ᵀ ⊗ g[g_index[r]]: (E, k, n),
    fp32 accumulation (row_scale · a rounded to the operands' dtype first)."""
    return _weight_grad_op(a, g, schedule.row_start_E, schedule.row_end_E, a_index, g_index, row_scale)


# Each launch is an opaque custom op with a shape rule, so that torch.compile(fullgraph=True) puts it in its
# graph as one call instead of tracing into Triton's launcher (which it cannot).


@torch.library.custom_op("mhmoe::triton_rows_mm", mutates_args=())
def _rows_mm_op(
    a: Tensor,
    w_Ekn: Tensor,
    tile_expert_T: Tensor,
    tile_start_T: Tensor,
    tile_end_T: Tensor,
    block_m: int,
    num_out_rows: int,
    a_index: Tensor | None,
    out_index: Tensor | None,
    scale: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    triton, kernel, _ = _kernels()
    K, N = w_Ekn.shape[1], w_Ekn.shape[2]
    out = a.new_empty(num_out_rows, N, dtype=out_dtype or a.dtype)
    if num_out_rows == 0:
        return out
    num_tiles = tile_expert_T.shape[0]
    _launch(
        kernel, lambda meta: (num_tiles, triton.cdiv(N, meta["BLOCK_N"])),
        a, w_Ekn, out, _or(a_index, tile_expert_T), _or(out_index, tile_expert_T), _or(scale, tile_expert_T),
        tile_expert_T, tile_start_T, tile_end_T,
        N, K,
        a.stride(0), a.stride(1), w_Ekn.stride(0), w_Ekn.stride(1), w_Ekn.stride(2), out.stride(0), out.stride(1),
        HAS_A_INDEX=a_index is not None, HAS_OUT_INDEX=out_index is not None, HAS_SCALE=scale is not None,
        PRECISION=_precision(a.dtype), BLOCK_M=block_m,
    )  # fmt: skip
    return out


@_rows_mm_op.register_fake
def _(a, w_Ekn, tile_expert_T, tile_start_T, tile_end_T, block_m, num_out_rows, a_index, out_index, scale, out_dtype):
    return a.new_empty(num_out_rows, w_Ekn.shape[2], dtype=out_dtype or a.dtype)


@torch.library.custom_op("mhmoe::triton_weight_grad", mutates_args=())
def _weight_grad_op(
    a: Tensor,
    g: Tensor,
    row_start_E: Tensor,
    row_end_E: Tensor,
    a_index: Tensor | None,
    g_index: Tensor | None,
    row_scale: Tensor | None,
) -> Tensor:
    triton, _, kernel = _kernels()
    E, K, N = row_end_E.shape[0], a.shape[1], g.shape[1]
    dw = a.new_empty(E, K, N)
    _launch(
        kernel, lambda meta: (E, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"])),
        a, g, dw, _or(a_index, row_end_E), _or(g_index, row_end_E), _or(row_scale, row_end_E),
        row_start_E, row_end_E,
        K, N,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        HAS_A_INDEX=a_index is not None, HAS_G_INDEX=g_index is not None, HAS_ROW_SCALE=row_scale is not None,
        PRECISION=_precision(a.dtype),
    )  # fmt: skip
    return dw


@_weight_grad_op.register_fake
def _(a, g, row_start_E, row_end_E, a_index, g_index, row_scale):
    return a.new_empty(row_end_E.shape[0], a.shape[1], g.shape[1])


def _or(tensor: Tensor | None, dummy: Tensor) -> Tensor:
    """An optional pointer argument: a kernel flag says whether it is read; when absent, any tensor fills it."""
    return dummy if tensor is None else tensor


class _ExpertFFN(torch.autograd.Function):
    """y_s = Σ_k gate_{k,s} · expert(x_s): the Triton twin of `mhmoe.ops.sorted._SortedExpertFFN`.

    Forward: h_sorted = x[source] @ w_in[e] (the gather fused into the first GEMM), a = act(h), and
    gate_r · (a_r @ w_out[e]) written straight into choice-major row order_R[r] (gating and the
    permutation back fused into the second GEMM, in the gates' dtype); the sum over K is one reduction
    of those rows (deterministic, no atomics). gates_R None: no gating, output in x's dtype.

    Kept for the backward: h and a (the expert outputs are not: the gates' gradient is
    (g_s @ w_outᵀ) · a_r, whose first factor the backward computes anyway, as in SonicMoE), or with
    `recompute` nothing but indices (h again by the first GEMM, then a). The backward gathers each
    row's gradient inside its GEMMs too, and applies the gates inside the w_out gradient's kernel.
    """

    @staticmethod
    def forward(ctx, x_Sd, w_in, w_out, gates_R, order_R, counts_E, activation, recompute):
        S, d = x_Sd.shape
        R = order_R.shape[0]
        schedule = Schedule.build(counts_E, R)
        source_R = order_R % S  # the input row of each sorted row
        h_RF = rows_mm(x_Sd, w_in, schedule, R, a_index=source_R)
        a_RF = activate(h_RF, activation)
        out_dtype = None if gates_R is None else gates_R.dtype
        y_KSd = rows_mm(a_RF, w_out, schedule, R, out_index=order_R, scale=gates_R, out_dtype=out_dtype)
        kept = () if recompute else (h_RF, a_RF)
        ctx.save_for_backward(x_Sd, w_in, w_out, gates_R, order_R, source_R, *schedule[:5], *kept)
        ctx.block_m, ctx.activation = schedule.block_m, activation
        y_KSd = y_KSd.view(-1, S, d)
        return y_KSd[0] if y_KSd.shape[0] == 1 else y_KSd.sum(0)

    @staticmethod
    def backward(ctx, grad_Sd):
        x_Sd, w_in, w_out, gates_R, order_R, source_R, *rest = ctx.saved_tensors
        schedule, kept = Schedule._make([*rest[:5], ctx.block_m]), rest[5:]
        R, S = order_R.shape[0], x_Sd.shape[0]
        grad_Sd = grad_Sd.to(x_Sd.dtype).contiguous()
        if kept:
            h_RF, a_RF = kept
        else:
            h_RF = rows_mm(x_Sd, w_in, schedule, R, a_index=source_R)
            a_RF = activate(h_RF, ctx.activation)
        grad_a_RF = rows_mm(grad_Sd, w_out.transpose(1, 2), schedule, R, a_index=source_R)  # ungated
        grad_gates_R = None
        if gates_R is not None:
            if ctx.needs_input_grad[3]:
                grad_gates_R = (grad_a_RF.to(gates_R.dtype) * a_RF.to(gates_R.dtype)).sum(-1)
            grad_a_RF = (grad_a_RF * gates_R.unsqueeze(-1)).to(x_Sd.dtype)
        grad_w_out = weight_grad(a_RF, grad_Sd, schedule, g_index=source_R, row_scale=gates_R)
        grad_h_RF = activate_backward(grad_a_RF, h_RF, ctx.activation).contiguous()
        grad_w_in = weight_grad(x_Sd, grad_h_RF, schedule, a_index=source_R)
        grad_x_Sd = None
        if ctx.needs_input_grad[0]:
            grad_x_Rd = rows_mm(grad_h_RF, w_in.transpose(1, 2), schedule, R, out_index=order_R)  # choice-major
            grad_x_Sd = grad_x_Rd.view(-1, S, x_Sd.shape[1]).sum(0)
        return grad_x_Sd, grad_w_in, grad_w_out, grad_gates_R, None, None, None, None


def expert_ffn(
    x_Sd: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    order_R: Tensor,
    counts_E: Tensor,
    activation: str,
    gates_R: Tensor | None = None,
    recompute: bool = False,
) -> Tensor:
    """Σ_k gate · expert(x_s) for every item: (S, d), in the gates' dtype (x's without gates).

    order_R: sorted row -> choice-major row (k·S + s), a stable sort of the experts by row; counts_E:
    rows per expert; gates_R: each sorted row's gate, or None (no gating; with K = 1 each item's own
    expert output). x, w_in, w_out in the compute dtype. recompute: keep no activations for the backward.
    """
    if x_Sd.shape[0] == 0:
        raise ValueError("expert_ffn needs at least one row; the callers handle empty inputs")
    return _ExpertFFN.apply(x_Sd.contiguous(), w_in, w_out, gates_R, order_R, counts_E, activation, recompute)
