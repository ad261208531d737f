"""The one place that picks the expert-GEMM backend, and the dtype the expert GEMMs run in."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from mhmoe.ops import triton_experts

Backend = Literal["grouped_mm", "slices", "triton"]
DispatchName = Literal["auto", "grouped_mm", "slices", "triton", "reference"]
DISPATCHES: tuple[str, ...] = get_args(DispatchName)
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(
    requested: str,
    dtype: torch.dtype,
    device: torch.device,
    dims: tuple[int, ...] = (),
    rows_per_expert: float | None = None,
) -> Backend:
    """The one place that picks the expert-GEMM backend.

    "auto": grouped_mm when torch has it and supports the case (CPU: fp32/bf16/fp16; CUDA: bf16/fp16
    on compute capability ≥ 8.0), else "slices". Asking for grouped_mm where it cannot run is an error.
    dims: the GEMM widths (d, F); grouped_mm needs every row stride to be a multiple of 16 bytes.
    rows_per_expert: routed rows / experts of the call, if the caller knows it. On the CPU, "auto" picks "slices"
    below 1: torch's CPU grouped_mm runs one GEMM per expert, rows or not, while "slices" runs only the experts
    that have rows, so at fewer rows than experts (decoding a few tokens) it does less (benchmarks/README.md,
    "transformers' experts implementations").
    "triton" (`mhmoe.ops.triton_experts`: the gather and the scatter fused into the GEMMs) must be
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
        sparse = device.type == "cpu" and rows_per_expert is not None and rows_per_expert < 1
        return "grouped_mm" if supported and not sparse else "slices"
    if requested == "grouped_mm" and not supported:
        raise ValueError(
            f"grouped_mm cannot run {dtype} on {device} with widths {dims} (rows must be multiples of 16 bytes) "
            f"with torch {torch.__version__}; use 'slices'"
        )
    if requested == "grouped_mm":
        return "grouped_mm"
    if requested == "slices":
        return "slices"
    raise ValueError(f"unknown dispatch backend {requested!r}; choose one of {DISPATCHES}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's for float32 input under autocast, else x's."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
