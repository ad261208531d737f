"""Activation memory of every expert execution, the Triton kernels included, measured on the CPU.

    python benchmarks/activation_memory.py --out benchmarks/results/NAME.json [--shapes cpu-mhmoe-64e,...]

What autograd keeps for the backward does not depend on the device (`mhmoe.bench.timing.saved_activation_bytes`),
so the Triton kernels' memory can be measured here, by one forward under TRITON_INTERPRET=1 (about a
minute per shape), while their speed needs a GPU. Writes MiB and the ratio to dense-eq for each shape.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import per_shape  # noqa: E402
import torch  # noqa: E402

from mhmoe.bench.layer import SHAPES, dense_equivalent
from mhmoe.bench.timing import saved_activation_bytes  # noqa: E402

IMPLS = {  # name -> (dispatch, recompute)
    "grouped_mm": ("grouped_mm", False),
    "grouped_mm-recompute": ("grouped_mm", True),
    "triton": ("triton", False),
    "triton-recompute": ("triton", True),
}


def measure(name: str) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(shape.tokens, shape.d_model)
    reference = shape.build("reference")
    dense = saved_activation_bytes(dense_equivalent(reference, shape.d_model, shape.activation), x) / 2**20
    rows = [dict(impl="dense-eq", activation_mib=dense, activation_vs_dense=1.0)]
    for impl, (dispatch, recompute) in IMPLS.items():
        layer = shape.build(dispatch, recompute)
        layer.load_state_dict(reference.state_dict())
        mib = saved_activation_bytes(layer, x) / 2**20
        rows.append(dict(impl=impl, activation_mib=mib, activation_vs_dense=mib / dense))
    return dict(name=name, results=rows)


if __name__ == "__main__":
    per_shape.main(
        __doc__,
        "| shape | impl | activations MiB | × dense-eq |\n|---|---|---:|---:|",
        measure,
        lambda r: f"{r['impl']} | {r['activation_mib']:.1f} | {r['activation_vs_dense']:.2f}",
    )
