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

import dataclasses
import functools
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mhmoe import allocator
from mhmoe.accounting import cost_of
from mhmoe.kernels import triton_experts
from mhmoe.layers.dispatch import resolve_backend
from mhmoe.layers.experts import DenseFFN, glu_factor
from mhmoe.layers.moe import MoEOutput, SparseMoE
from mhmoe.layers.multihead import MHMoE


@dataclass(frozen=True)
class Shape:
    d_model: int
    num_experts: int
    top_k: int
    expert_hidden: int
    num_heads: int  # 1 = SparseMoE
    tokens: int
    activation: str = "gelu"

    def build(self, dispatch: str, recompute: bool = False) -> nn.Module:
        common = dict(
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_hidden=self.expert_hidden,
            activation=self.activation,
            dispatch=dispatch,
            recompute=recompute,
        )
        if self.num_heads == 1:
            return SparseMoE(d_model=self.d_model, **common)
        return MHMoE(d_model=self.d_model, num_heads=self.num_heads, **common)


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

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.moe: SparseMoE = layer.moe if isinstance(layer, MHMoE) else layer

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

        from mhmoe.layers.experts import activate
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
        aux = moe.balance_loss_coef * balance_loss(r.balance_probs, r.top_experts[:, 0])
        return self.merge(y_Sd, x), aux


class GemmFloor(_AroundExperts):
    """Not an implementation: the layer's matmuls and activation alone, as a lower bound.

    The same multi-head and merge layers and grouped expert GEMMs (on the layer's weights, with the
    per-expert row counts of the layer's own routing of `x`), but no router, no sort and no gather:
    the rows stay where they are. What any implementation built on these GEMM kernels
    must spend; fast minus floor is the cost of routing and moving rows. Returns (y, None).
    """

    def __init__(self, layer: nn.Module, x: Tensor):
        super().__init__(layer)
        with torch.no_grad():
            self.counts_E = layer(x).stats.tokens_per_expert

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        from mhmoe.layers.dispatch import expert_matmul, resolve_backend
        from mhmoe.layers.experts import activate

        moe = self.moe
        x_Rd = self.split(x).repeat(moe.top_k, 1)  # K copies, in place of a gather
        backend = resolve_backend("auto", x.dtype, x.device, (moe.d_model, moe.expert_hidden))
        experts, counts_E = moe.experts, self.counts_E
        h_RF = activate(expert_matmul(x_Rd, experts.w_in, counts_E, backend), experts.activation)
        y_Rd = expert_matmul(h_RF, experts.w_out, counts_E, backend)
        return self.merge(y_Rd.view(moe.top_k, -1, moe.d_model).sum(0), x), None


def dense_equivalent(layer: nn.Module, d_model: int, activation: str) -> DenseFFN:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 3):
    """Seconds per call of each function, timed round-robin so that a noisy machine slows all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def saved_activation_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes autograd keeps from one forward of `layer` for its backward: the activation memory.

    Counts each storage once (views share one), and neither the layer's parameters nor the input `x`
    (the caller holds those anyway). Device-independent, so it is measured on the CPU too.
    """
    held = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    xi = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(xi)
    del out
    return sum(seen.values())


def _peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak device memory of one call (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    fn()  # warm: later calls reuse the caching allocator's blocks
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _max_rel_difference(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """Largest difference between paired tensors, each relative to the largest magnitude of its `want`."""
    err = 0.0
    for u, v in zip(got, want, strict=True):
        u, v = u.detach().float(), v.detach().float()
        err = max(err, float((u - v).abs().max() / v.abs().max().clamp_min(1e-6)))
    return err


def _max_error(a: nn.Module, b: nn.Module, x: Tensor, grad: Tensor) -> float:
    """Largest relative difference between two layers' outputs, input grads and parameter grads."""
    results = []
    for layer in (a, b):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        y, _ = _step(layer, xi, grad)
        grads = [xi.grad] + [p.grad for p in layer.parameters()]
        results.append([y.detach()] + grads)
    return _max_rel_difference(*results)


def bench_shape(name: str, device: torch.device, dtype: torch.dtype, repeats: int, seed: int = 0) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(seed)
    reference = shape.build("reference").to(device=device, dtype=dtype)
    x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    cost = cost_of(reference)
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4

    def twin(dispatch: str, recompute: bool = False) -> nn.Module:  # the reference's weights, another dispatch
        layer = shape.build(dispatch, recompute).to(device=device, dtype=dtype)
        layer.load_state_dict(reference.state_dict())
        return layer

    backends = ["slices"]
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

    rows, failed = [], []
    for impl, layer in list(impls.items()):  # check everything before timing anything
        try:
            error = None if impl in ("loop", "floor", "dense-eq") else _max_error(layer, reference, x, grad)
            if error is not None and error > tolerance:
                raise RuntimeError(f"{name}/{impl}: differs from the reference by {error:.2e} (> {tolerance:.0e})")
            rows.append(dict(impl=impl, max_rel_error=error, activation_mib=saved_activation_bytes(layer, x) / 2**20))
        except Exception as e:
            failed.append(_failure(impl, e))
            del impls[impl]
    steps = {
        impl: functools.partial(_step, layer, x.detach().clone().requires_grad_(), grad)
        for impl, layer in impls.items()
    }
    for row, step in zip(rows, steps.values()):
        row["peak_mib"] = _peak_mib(step, device)
    for row, times in zip(rows, _time_interleaved(steps, device, repeats).values()):
        seconds = statistics.median(times)
        row.update(ms=1e3 * seconds, tflops=3 * cost.flops_per_token * shape.tokens / seconds / 1e12)
    dense = next(r for r in rows if r["impl"] == "dense-eq")
    for r in rows:
        r["vs_dense"] = r["ms"] / dense["ms"]
        r["activation_vs_dense"] = r["activation_mib"] / dense["activation_mib"]
    return dict(name=name, shape=asdict(shape), flops_per_token=cost.flops_per_token, results=rows, failed=failed)


def _failure(impl: str, error: Exception, where: str | None = None) -> dict:
    """The record of an implementation that could not be checked (it raised, or differs from the reference),
    which is then not timed. Only the Triton kernels, still to be proven on a GPU, may fail so: for any other
    implementation the error is raised again."""
    if not impl.startswith("triton"):
        raise error
    return dict(impl=impl if where is None else f"{where}/{impl}", error=f"{type(error).__name__}: {error}"[:2000])


def failures(report: dict) -> list[str]:
    """'where/impl: error' for every implementation a benchmark report could not check."""
    groups = report.get("benchmarks", [report])
    return [f"{g.get('name', 'train')}/{f['impl']}: {f['error']}" for g in groups for f in g.get("failed", [])]


def cuda_graph_check(name: str, device: torch.device, dtype: torch.dtype, dispatch: str = "auto") -> dict:
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
    error = _max_rel_difference(captured, step())  # the replay against eager
    return dict(shape=name, dispatch=dispatch, capturable=True, replay_max_rel_error=error)


def environment(device: torch.device) -> dict:
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d"),
        allocator=allocator.state or dict(tuned=False, reason="not tuned by this process"),
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


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


# ------------------------------------------------------------------------------------------ training step

TRAIN_VARIANTS = ("smoe", "mhmoe_flops")  # names from mhmoe.reproduce.english_variants


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured throughput of one large square matmul here: the denominator of the model FLOP utilisation."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(_time(lambda: a @ b, device, repeats))
    return 2 * n**3 / seconds / 1e12


# More ways to run the fast path's MoE layers in `bench_train`: name -> (dispatch, recompute)
TRAIN_EXTRAS = {"recompute": ("auto", True), "triton": ("triton", False), "triton-recompute": ("triton", True)}


def _with_dispatch(model: nn.Module, dispatch: str, recompute: bool = False) -> nn.Module:
    """A copy of the model whose MoE layers use another dispatch (same weights, same routing)."""
    import copy

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, SparseMoE):
            module.dispatch, module.recompute = dispatch, recompute
    return twin


def _dense_twin(model: nn.Module) -> nn.Module:
    """The model with each MoE layer replaced by the DenseFFN of equal forward FLOPs per token (dense-eq)."""
    import copy

    twin = copy.deepcopy(model)
    for block in twin.blocks:
        if isinstance(block.ffn, (SparseMoE, MHMoE)):
            d_model = block.ffn.d_model
            activation = block.ffn.moe.experts.activation if isinstance(block.ffn, MHMoE) else block.ffn.activation
            block.ffn = dense_equivalent(block.ffn, d_model, activation).to(next(model.parameters()).device)
    return twin


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, idx: Tensor, autocast: Any) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = model(idx[:, :-1], idx[:, 1:])
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    return out.loss


def _grads_error(a: nn.Module, b: nn.Module, idx: Tensor, autocast: Any) -> float:
    """Largest relative difference of loss and every parameter gradient between two models on one batch."""
    results = []
    for model in (a, b):
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        results.append([out.loss.detach()] + [p.grad for p in model.parameters()])
    err = _max_rel_difference(*results)
    a.zero_grad(set_to_none=True)
    b.zero_grad(set_to_none=True)
    return err


def bench_train(
    preset_name: str,
    device: torch.device,
    repeats: int,
    seed: int = 0,
    loop: bool = True,
    compile: bool = False,
    extras: Sequence[str] = (),
) -> dict:
    """Time full training steps (forward, backward, AdamW) of the preset's LM with each MoE variant.

    For each variant: this library's fast path, the per-expert loop (if `loop`) and dense-eq (every MoE
    layer replaced by a DenseFFN of equal FLOPs per token). The fast path is checked against the loop
    (loss and all gradients) before anything is timed. Inputs are random token ids: timing does not
    depend on the text, and routing of an untrained router is what a run starts with.
    compile: time `torch.compile`d fast and dense-eq models instead (the loop, with its data-dependent
    shapes, stays eager); the compiled fast path is checked against the eager loop as well.
    extras: names from `TRAIN_EXTRAS`, more fast-path rows (recompute, the Triton kernels), each checked
    like the fast path (against the loop, or against the fast path with `loop=False`).
    """
    unknown = [name for name in extras if name not in TRAIN_EXTRAS]
    if unknown:
        raise ValueError(f"unknown extra implementations {unknown}; choose from {sorted(TRAIN_EXTRAS)}")
    from contextlib import nullcontext

    from mhmoe.models.gpt import GPT, gpt_cost
    from mhmoe.reproduce import english_variants
    from mhmoe.train.config import preset

    base = preset(preset_name)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    peak = matmul_peak_tflops(device, torch.bfloat16 if cuda else torch.float32)
    B, L = base.train.batch_size, base.model.seq_len
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, base.model.vocab_size, (B, L + 1), generator=generator).to(device)
    tolerance = 3e-2 if cuda else 1e-4
    rows, failed = [], []
    for variant in (v for v in english_variants(base) if v.name in TRAIN_VARIANTS):
        cfg = dataclasses.replace(base.model, ffn=variant.ffn)
        torch.manual_seed(seed)
        fast = GPT(cfg).to(device)
        reference = _with_dispatch(fast, "reference") if loop else fast
        eager = {"fast": fast, **{name: _with_dispatch(fast, *TRAIN_EXTRAS[name]) for name in extras}}
        impls = {**eager, "dense-eq": _dense_twin(fast), **({"loop": reference} if loop else {})}
        if compile:
            impls = {impl: model if impl == "loop" else torch.compile(model) for impl, model in impls.items()}
        errors: dict[str, float] = {}
        for impl, model in eager.items():  # the eager model, then the compiled one, against the reference
            try:
                for candidate in (model, impls[impl]) if compile else (model,):
                    if candidate is reference:
                        continue
                    errors[impl] = max(errors.get(impl, 0.0), _grads_error(candidate, reference, idx, autocast))
                    if errors[impl] > tolerance:
                        raise RuntimeError(
                            f"{variant.name}: {impl} differs from the {'loop' if loop else 'fast path'} by "
                            f"{errors[impl]:.2e} (> {tolerance:.0e})"
                        )
            except Exception as e:
                failed.append(_failure(impl, e, where=variant.name))
                del impls[impl]
        steps = {
            impl: functools.partial(_train_step, model, torch.optim.AdamW(model.parameters(), lr=1e-4), idx, autocast)
            for impl, model in impls.items()
        }
        flops = 3 * gpt_cost(cfg).flops_per_token * B * L  # dense-eq has the same FLOPs by construction
        for impl, times in _time_interleaved(steps, device, repeats).items():
            seconds = statistics.median(times)
            rows.append(
                dict(
                    variant=variant.name,
                    impl=impl,
                    ms=1e3 * seconds,
                    tokens_per_s=B * L / seconds,
                    tflops=flops / seconds / 1e12,
                    mfu=flops / seconds / 1e12 / peak,
                    max_rel_error=errors.get(impl),
                )
            )
        dense_ms = next(r["ms"] for r in rows if r["variant"] == variant.name and r["impl"] == "dense-eq")
        for r in rows:
            if r["variant"] == variant.name:
                r["vs_dense"] = r["ms"] / dense_ms
    precision = "bf16" if cuda else "fp32"
    return dict(
        preset=preset_name,
        batch=[B, L],
        matmul_peak_tflops=peak,
        precision=precision,
        compiled=compile,
        results=rows,
        failed=failed,
    )


def format_train_table(report: dict) -> str:
    lines = [
        "| variant | impl | ms/step | tokens/s | TFLOP/s | MFU | × dense-eq | max rel. error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        error = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        lines.append(
            f"| {r['variant']} | {r['impl']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | "
            f"{100 * r['mfu']:.1f}% | {r['vs_dense']:.2f} | {error} |"
        )
    return "\n".join(lines)
