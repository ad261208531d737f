"""Where the CPU layer's gap to dense-eq comes from: the experts' GEMMs, per expert against one GEMM.

    python benchmarks/expert_gemms_cpu.py --out benchmarks/results/NAME.json [--shapes cpu-mhmoe-64e,...] [--repeats 15]

For each benchmark shape, the six matmuls of the experts' forward + backward (x @ w_in, a @ w_out, the two
input gradients and the two weight gradients) on the layer's own per-expert row counts (its routing of
the benchmark input), timed round-robin three ways, after checking that they agree:

- grouped_mm: `torch.nn.functional.grouped_mm` (one MKL call per expert; what the fast path runs);
- padded bmm: every expert's rows padded to the largest count, one `torch.bmm` (padding rows cost FLOPs);
- one GEMM: the same rows through one expert's weights in a single matmul: the same FLOPs in one call,
  what any grouping of these rows would cost at best with these kernels.

"grouped / one" is the price of running the experts as separate small GEMMs.
"""

from __future__ import annotations

import statistics

import per_shape
import torch
import torch.nn.functional as F

from mhmoe.bench.layer import SHAPES
from mhmoe.bench.timing import time_interleaved


def gemms(name: str, repeats: int) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(0)
    layer = shape.build("auto")
    x = torch.randn(shape.tokens, shape.d_model)
    with torch.no_grad():
        counts = layer(x).stats.tokens_per_expert
    E, d, hidden = shape.num_experts, shape.d_model // shape.num_heads, shape.expert_hidden
    R = int(counts.sum())
    offsets = counts.cumsum(0).to(torch.int32)
    cap = int(counts.max())
    x_R, h_R, g_R = torch.randn(R, d), torch.randn(R, hidden), torch.randn(R, d)  # rows; hidden; output grads
    w_in, w_out = torch.randn(E, d, hidden) / d**0.5, torch.randn(E, hidden, d) / hidden**0.5

    def grouped() -> list[torch.Tensor]:
        return [
            F.grouped_mm(x_R, w_in, offs=offsets),
            F.grouped_mm(h_R, w_out, offs=offsets),
            F.grouped_mm(g_R, w_out.transpose(1, 2), offs=offsets),
            F.grouped_mm(h_R, w_in.transpose(1, 2), offs=offsets),
            F.grouped_mm(h_R.t(), g_R, offs=offsets),
            F.grouped_mm(x_R.t(), h_R, offs=offsets),
        ]

    def pad(rows: torch.Tensor) -> torch.Tensor:  # (R, n) -> (E, cap, n), zeros past each expert's rows
        out = rows.new_zeros(E, cap, rows.shape[1])
        slot = torch.arange(R) - torch.repeat_interleave(offsets - counts, counts)
        out[torch.repeat_interleave(torch.arange(E), counts), slot] = rows
        return out

    x_P, h_P, g_P = pad(x_R), pad(h_R), pad(g_R)

    def padded() -> list[torch.Tensor]:
        return [
            torch.bmm(x_P, w_in),
            torch.bmm(h_P, w_out),
            torch.bmm(g_P, w_out.transpose(1, 2)),
            torch.bmm(h_P, w_in.transpose(1, 2)),
            torch.bmm(h_P.transpose(1, 2), g_P),
            torch.bmm(x_P.transpose(1, 2), h_P),
        ]

    def one() -> list[torch.Tensor]:
        return [x_R @ w_in[0], h_R @ w_out[0], g_R @ w_out[0].t(), h_R @ w_in[0].t(), h_R.t() @ g_R, x_R.t() @ h_R]

    for a, b in zip(grouped(), padded()):  # the same products (padding rows give zeros), weight gradients too
        torch.testing.assert_close(pad(a) if a.dim() == 2 else a, b, rtol=1e-4, atol=1e-3)
    times = time_interleaved(dict(grouped_mm=grouped, padded_bmm=padded, one_gemm=one), torch.device("cpu"), repeats)
    ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
    flops = 6 * 2 * R * d * hidden
    return dict(
        name=name, experts=E, rows=R, d=d, hidden=hidden, max_rows=cap, mean_rows=R / E,
        results=[
            dict(impl=impl, ms=t, gflops=flops / t / 1e6, vs_one_gemm=t / ms["one_gemm"]) for impl, t in ms.items()
        ],
    )  # fmt: skip


if __name__ == "__main__":
    per_shape.main(
        __doc__,
        "| shape | impl | ms (6 GEMMs) | GFLOP/s | × one GEMM |\n|---|---|---:|---:|---:|",
        gemms,
        lambda r: f"{r['impl']} | {r['ms']:.1f} | {r['gflops']:.0f} | {r['vs_one_gemm']:.2f}",
        repeats=15,
    )
