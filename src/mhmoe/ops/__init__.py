"""Tensor operations under the layers: activations, the reference loop, capacity, the sorted grouped-GEMM
path, the Triton kernels and the one place that picks a backend (`resolve_backend`).

Nothing here is an `nn.Module` or knows about routers, losses or models; the layers call these functions.
Optional kernels (Triton) are import-guarded: importing this package never needs them.
"""
