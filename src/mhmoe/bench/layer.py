"""Layer benchmark: every implementation is checked against the reference loop, then timed.

Implementations, all on the same weights and input:
    dense-eq   one DenseFFN doing the layer's FLOPs per token (the limit an MoE layer can reach)
    loop       the per-expert loop (dispatch="reference"), as in many model files
    slices     sort by expert + one matmul per contiguous slice (dispatch="slices")
    grouped_mm sort by expert + torch.nn.functional.grouped_mm (dispatch="grouped_mm"), gather-and-sum combine
    grouped_mm-recompute  the same with recompute=True: no expert activations kept, one more GEMM
    plain-grouped  the common plain version: the same GEMMs, copies gathered token-major, index_add_ back
    floor      not an implementation: the same matmuls and activation with no routing, sort or gather
    triton     the Triton kernels with gather, gates and scatter fused into the GEMMs (dispatch="triton"),
               on CUDA (on the CPU only under TRITON_INTERPRET=1: a check, slow); triton-recompute the same
               with recompute=True
Timings are forward + backward (routing and losses included), the median of `repeats` runs after
warm-up, all implementations timed round-robin so that a noisy machine slows each alike; TFLOP/s
counts useful FLOPs only (3 × forward matmul FLOPs per token × tokens). Memory: the bytes autograd
saves for the backward (activation memory, any device) and, on CUDA, the peak allocated by one call.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mhmoe.bench.timing import failure, max_rel_difference, peak_mib, saved_activation_bytes, time_interleaved
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.experts import DenseFFN
from mhmoe.layers.moe import MoELayer, MoEOutput, SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.models.cost import cost_of
from mhmoe.ops import triton_experts
from mhmoe.ops.activations import Activation, activate, glu_factor
from mhmoe.ops.backend import DispatchName, resolve_backend
from mhmoe.ops.grouped import expert_matmul


@dataclass(frozen=True)
class Shape:
    d_model: int
    num_experts: int
    top_k: int
    expert_hidden: int
    num_heads: int  # 1 = SparseMoE
    tokens: int
    activation: Activation = "gelu"

    def build(self, dispatch: DispatchName, recompute: bool = False) -> MoELayer:
        config = MoEConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_hidden=self.expert_hidden,
            activation=self.activation,
            dispatch=dispatch,
            recompute=recompute,
            num_heads=self.num_heads,
        )
        layer = SparseMoE if self.num_heads == 1 else MHMoE
        return layer(config, d_model=self.d_model)


SHAPES: dict[str, Shape] = {
    # CPU-sized (fp32); "tiny" is for tests
    "tiny": Shape(64, 8, 2, 64, 4, 256),
    "cpu-mhmoe-16e": Shape(512, 16, 2, 512, 4, 2048),
    "cpu-mhmoe-64e": Shape(512, 64, 2, 256, 4, 2048),
    "cpu-smoe-64e": Shape(512, 64, 2, 512, 1, 2048),
    # GPU anchors of the performance issue (bf16)
    "gpu-smoe-2048-16": Shape(2048, 16, 2, 4096, 1, 16384),
    "gpu-mhmoe-2048-16": Shape(2048, 16, 2, 4096, 4, 16384),
    "gpu-smoe-2048-64": Shape(2048, 64, 2, 1024, 1, 16384),
    "gpu-mhmoe-2048-64": Shape(2048, 64, 2, 1024, 4, 16384),
    "gpu-smoe-768-8": Shape(768, 8, 2, 3072, 1, 8192),
    "gpu-mhmoe-768-8": Shape(768, 8, 2, 768, 4, 8192),
}
DEFAULT_SHAPES = {
    "cpu": ["cpu-mhmoe-16e", "cpu-mhmoe-64e", "cpu-smoe-64e"],
    "cuda": [n for n in SHAPES if n[:3] == "gpu"],
}


class _AroundExperts(nn.Module):
    """A baseline wrapped around a SparseMoE or an MHMoE: its multi-head and merge layers (identity for a
    SparseMoE) and its weights, with the experts' part replaced by the subclass's."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer
        self.moe: SparseMoE = layer.routed

    def split(self, x: Tensor) -> Tensor:
        """(..., D) -> (S, d): the multi-head layer, then the sub-tokens as rows."""
        h = x.reshape(-1, x.shape[-1])
        if isinstance(self.layer, MHMoE):
            h = self.layer.multi_head_layer(h)
        return h.reshape(-1, self.moe.d_model)

    def merge(self, y_Sd: Tensor, x: Tensor) -> Tensor:
        """(S, d) -> x's shape: the sub-tokens merged, then the merge layer."""
        y = y_Sd.reshape(-1, x.shape[-1])
        if isinstance(self.layer, MHMoE):
            y = self.layer.merge_layer(y)
        return y.view(x.shape)


class PlainGrouped(_AroundExperts):
    """The plain implementation found in many codebases, as a baseline: sort the (sub-)token copies by expert,
    gather them, `torch.nn.functional.grouped_mm` twice, scale by the gates and `index_add_` them back.

    Wraps a SparseMoE or an MHMoE (residual "outer", no capacity, no shared experts: the benchmark shapes) and
    uses its router and weights, so it routes exactly like the layer; returns (y, aux_loss) like `_step` needs.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        import torch.nn.functional as F

        from mhmoe.layers.losses import balance_loss

        moe = self.moe
        h_Sd = self.split(x)
        r = moe.router(h_Sd, None)
        K = r.top_experts.shape[1]
        order = torch.argsort(r.top_experts.reshape(-1), stable=True)  # token-major copies s·K + k, by expert
        counts = torch.bincount(r.top_experts.reshape(-1), minlength=moe.num_experts)
        offsets = counts.cumsum(0).to(torch.int32)
        token = order // K
        w_in, w_out = moe.experts.w_in.to(x.dtype), moe.experts.w_out.to(x.dtype)
        hidden = activate(F.grouped_mm(h_Sd[token], w_in, offs=offsets), moe.experts.activation)
        out = F.grouped_mm(hidden, w_out, offs=offsets) * r.gates.reshape(-1)[order, None].to(x.dtype)
        y_Sd = torch.zeros_like(h_Sd).index_add_(0, token, out)
        aux = moe.config.balance_loss_coef * balance_loss(r.balance_probs, r.top_experts[:, 0])
        return self.merge(y_Sd, x), aux


class GemmFloor(_AroundExperts):
    """Not an implementation: the layer's matmuls and activation alone, as a lower bound.

    The same multi-head and merge layers and grouped expert GEMMs (on the layer's weights, with the
    per-expert row counts of the layer's own routing of `x`), but no router, no sort and no gather:
    the rows stay where they are. What any implementation built on these GEMM kernels
    must spend; fast minus floor is the cost of routing and moving rows. Returns (y, None).
    """

    def __init__(self, layer: MoELayer, x: Tensor):
        super().__init__(layer)
        with torch.no_grad():
            self.counts_E = layer(x).stats.tokens_per_expert

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        moe = self.moe
        x_Rd = self.split(x).repeat(moe.top_k, 1)  # K copies, in place of a gather
        backend = resolve_backend("auto", x.dtype, x.device, (moe.d_model, moe.expert_hidden))
        experts, counts_E = moe.experts, self.counts_E
        h_RF = activate(expert_matmul(x_Rd, experts.w_in, counts_E, backend), experts.activation)
        y_Rd = expert_matmul(h_RF, experts.w_out, counts_E, backend)
        return self.merge(y_Rd.view(moe.top_k, -1, moe.d_model).sum(0), x), None


def dense_equivalent(layer: nn.Module, d_model: int, activation: Activation) -> DenseFFN:
    """A DenseFFN of width d_model whose hidden size gives the layer's forward FLOPs per token."""
    flops = cost_of(layer).flops_per_token
    hidden = max(1, round(flops / (2 * d_model * (glu_factor(activation) + 1))))
    return DenseFFN(d_model=d_model, hidden=hidden, activation=activation)


def _step(layer: nn.Module, x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    out = layer(x)
    if isinstance(out, Tensor):  # dense-eq
        y, aux = out, None
    elif isinstance(out, MoEOutput):
        y, aux = out.y, out.aux_loss
    else:  # PlainGrouped, GemmFloor
        y, aux = out
    loss = (y * grad).sum() if aux is None else (y * grad).sum() + aux
    loss.backward()
    return y, loss


def _max_error(a: nn.Module, b: nn.Module, x: Tensor, grad: Tensor) -> float:
    """Largest relative difference between two layers' outputs, input grads and parameter grads."""
    results: list[list[Tensor]] = []
    for layer in (a, b):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        y, _ = _step(layer, xi, grad)
        grads = [xi.grad, *(p.grad for p in layer.parameters())]
        results.append([y.detach(), *(g if g is not None else torch.zeros(()) for g in grads)])
    return max_rel_difference(*results)


def bench_shape(name: str, device: torch.device, dtype: torch.dtype, repeats: int, seed: int = 0) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(seed)
    reference = shape.build("reference").to(device=device, dtype=dtype)
    x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    cost = cost_of(reference)
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4

    def twin(dispatch: DispatchName, recompute: bool = False) -> MoELayer:  # the reference's weights, another dispatch
        layer = shape.build(dispatch, recompute).to(device=device, dtype=dtype)
        layer.load_state_dict(reference.state_dict())
        return layer

    backends: list[DispatchName] = ["slices"]
    if resolve_backend("auto", dtype, device, (shape.d_model // shape.num_heads, shape.expert_hidden)) == "grouped_mm":
        backends.append("grouped_mm")
    if triton_experts.supports(device, dtype):  # CUDA, or the CPU under TRITON_INTERPRET=1 (a slow check)
        backends.append("triton")
    impls: dict[str, nn.Module] = {"loop": reference, **{backend: twin(backend) for backend in backends}}
    if "grouped_mm" in backends:
        impls["grouped_mm-recompute"] = twin("grouped_mm", recompute=True)
        impls["plain-grouped"] = PlainGrouped(twin("reference"))
    if "triton" in backends:
        impls["triton-recompute"] = twin("triton", recompute=True)
    impls["floor"] = GemmFloor(reference, x)
    impls["dense-eq"] = dense_equivalent(reference, shape.d_model, shape.activation).to(device=device, dtype=dtype)

    rows: list[dict[str, Any]] = []
    failed: list[dict] = []
    for impl, layer in list(impls.items()):  # check everything before timing anything
        try:
            error = None if impl in ("loop", "floor", "dense-eq") else _max_error(layer, reference, x, grad)
            if error is not None and error > tolerance:
                raise RuntimeError(f"{name}/{impl}: differs from the reference by {error:.2e} (> {tolerance:.0e})")
            rows.append(dict(impl=impl, max_rel_error=error, activation_mib=saved_activation_bytes(layer, x) / 2**20))
        except Exception as e:
            failed.append(failure(impl, e))
            del impls[impl]
    steps = {
        impl: functools.partial(_step, layer, x.detach().clone().requires_grad_(), grad)
        for impl, layer in impls.items()
    }
    for row, step in zip(rows, steps.values()):
        row["peak_mib"] = peak_mib(step, device)
    for row, times in zip(rows, time_interleaved(steps, device, repeats).values()):
        seconds = statistics.median(times)
        row.update(ms=1e3 * seconds, tflops=3 * cost.flops_per_token * shape.tokens / seconds / 1e12)
    dense = next(r for r in rows if r["impl"] == "dense-eq")
    for r in rows:
        r["vs_dense"] = r["ms"] / dense["ms"]
        r["activation_vs_dense"] = r["activation_mib"] / dense["activation_mib"]
    return dict(name=name, shape=asdict(shape), flops_per_token=cost.flops_per_token, results=rows, failed=failed)


def cuda_graph_check(name: str, device: torch.device, dtype: torch.dtype, dispatch: DispatchName = "auto") -> dict:
    """Can the layer's forward + backward be captured in one CUDA graph, and does a replay match eager?

    The performance issue asks for a layer with no host synchronisation, capturable in a CUDA graph; this
    tries it (warm-up on a side stream, capture of forward + `torch.autograd.grad`, one replay) and reports
    the error instead of raising. Run it after everything else on a device: a failed capture can leave the
    CUDA context unusable.
    """
    shape = SHAPES[name]
    torch.manual_seed(0)
    layer = shape.build(dispatch).to(device=device, dtype=dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> tuple[Tensor, ...]:
        out = layer(x)
        return (out.y, *torch.autograd.grad((out.y * grad).sum() + out.aux_loss, [x, *params]))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception as e:  # the answer is the error, not a crash of the benchmark
        return dict(shape=name, dispatch=dispatch, capturable=False, error=f"{type(e).__name__}: {e}"[:1000])
    error = max_rel_difference(captured, step())  # the replay against eager
    return dict(shape=name, dispatch=dispatch, capturable=True, replay_max_rel_error=error)


def format_table(report: dict) -> str:
    lines = [
        "| shape | impl | ms (fwd+bwd) | TFLOP/s | × dense-eq | activations MiB | × dense-eq | peak MiB | max rel. error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bench in report["benchmarks"]:
        for r in bench["results"]:
            error = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(
                f"| {bench['name']} | {r['impl']} | {r['ms']:.1f} | {r['tflops']:.3f} | {r['vs_dense']:.2f} | "
                f"{r['activation_mib']:.1f} | {r['activation_vs_dense']:.2f} | {peak} | {error} |"
            )
    return "\n".join(lines)
