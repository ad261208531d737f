"""The Triton expert kernels equal the reference, run on the CPU under TRITON_INTERPRET=1 (small shapes).

On a machine with CUDA the same tests also run the compiled kernels in bf16.
"""

from __future__ import annotations

import pytest
import torch

from mhmoe.ops import triton_experts as tk
from mhmoe.ops.activations import ffn, glu_factor

pytest.importorskip("triton")


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest: the CPU interpreter, kernels rebuilt


def routed_problem(S, K, E, d, F, activation, dtype=torch.float32, device="cpu", experts=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, d, generator=g).to(device, dtype).requires_grad_()
    w_in = (torch.randn(E, d, glu_factor(activation) * F, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    w_out = (torch.randn(E, F, d, generator=g) / F**0.5).to(device, dtype).requires_grad_()
    pool = torch.tensor(experts if experts is not None else range(E))
    top = pool[torch.randint(0, len(pool), (S, K), generator=g)].to(device)
    return x, w_in, w_out, top


def reference_combine(x, w_in, w_out, top, gates, activation):
    """(S, d): Σ_k gates[s, k] · expert_{top[s, k]}(x_s), one row at a time."""
    S, K = top.shape
    rows = [
        sum(gates[s, k] * ffn(x[s : s + 1], w_in[top[s, k]], w_out[top[s, k]], activation) for k in range(K))
        for s in range(S)
    ]
    return torch.cat(rows)


def sort_rows(top, E):
    expert_R = top.t().reshape(-1)
    return torch.argsort(expert_R, stable=True), torch.bincount(expert_R, minlength=E)


@pytest.mark.parametrize("counts", [[0, 0, 0], [5, 0, 70], [64, 64, 1], [0, 129, 0], [1, 1, 1]])
@pytest.mark.parametrize("block_m", [16, 64])
def test_schedule_tiles_cover_each_expert_exactly_once(counts, block_m):
    counts_E = torch.tensor(counts)
    R = sum(counts)
    sched = tk.Schedule.build(counts_E, R, block_m)
    assert sched.tile_expert_T.shape[0] == -(-R // block_m) + len(counts)  # the static bound
    covered = []
    for e, start, end in zip(sched.tile_expert_T.tolist(), sched.tile_start_T.tolist(), sched.tile_end_T.tolist()):
        if e < 0:
            continue
        lo, hi = sum(counts[:e]), sum(counts[: e + 1])
        assert lo <= start < hi and end == hi  # inside its expert, never straddling the next
        covered += [(r, e) for r in range(start, min(start + block_m, end))]
    expected = [(r, e) for e, n in enumerate(counts) for r in range(sum(counts[:e]), sum(counts[:e]) + n)]
    assert sorted(covered) == expected
    assert sched.row_start_E.tolist() == [sum(counts[:e]) for e in range(len(counts))]


CASES = [
    # S, K, E, d, F, activation, experts used (None = all)
    (37, 2, 5, 16, 32, "gelu", None),
    (50, 2, 4, 32, 16, "swiglu", [0, 2]),  # experts 1 and 3 get no rows
    (20, 1, 3, 16, 48, "relu", [1]),  # every row to one expert
    (90, 3, 6, 24, 40, "gelu", None),  # widths not multiples of the blocks, R > BLOCK_M
    (30, 2, 4, 16, 16, "reglu", None),  # the other GLU forms run the same kernels
    (30, 2, 4, 16, 16, "geglu", [1, 3]),
]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize(("S", "K", "E", "d", "F", "activation", "experts"), CASES)
def test_expert_ffn_matches_reference_outputs_and_gradients(S, K, E, d, F, activation, experts, recompute):
    x, w_in, w_out, top = routed_problem(S, K, E, d, F, activation, experts=experts)
    gates = torch.rand(S, K, generator=torch.Generator().manual_seed(2))
    gates[0] = 0  # a dropped assignment: gate 0, still computed
    gates.requires_grad_()
    order_R, counts_E = sort_rows(top, E)
    gates_R = gates.t().reshape(-1)[order_R]
    y = tk.expert_ffn(x, w_in, w_out, order_R, counts_E, activation, gates_R, recompute)
    ref = reference_combine(x, w_in, w_out, top, gates, activation)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w_in, w_out, gates), grad)
    want = torch.autograd.grad(ref, (x, w_in, w_out, gates), grad)
    for name, a, b in zip(("x", "w_in", "w_out", "gates"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
    if experts is not None:  # experts without rows get exactly zero gradient
        unused = [e for e in range(E) if e not in experts]
        assert got[1][unused].abs().max() == 0 and got[2][unused].abs().max() == 0


def test_expert_ffn_keeps_no_expert_outputs_and_nothing_with_recompute():
    from mhmoe.bench.timing import saved_activation_bytes

    S, K, E, d, F = 40, 2, 4, 16, 32
    x, w_in, w_out, top = routed_problem(S, K, E, d, F, "gelu")
    order_R, counts_E = sort_rows(top, E)
    gates_R = torch.rand(K * S, requires_grad=True)

    class Experts(torch.nn.Module):
        def __init__(self, recompute):
            super().__init__()
            self.w_in, self.w_out, self.recompute = torch.nn.Parameter(w_in), torch.nn.Parameter(w_out), recompute

        def forward(self, x):
            return tk.expert_ffn(x, self.w_in, self.w_out, order_R, counts_E, "gelu", gates_R, self.recompute)

    kept, recomputed = (saved_activation_bytes(Experts(r), x) for r in (False, True))
    assert kept - recomputed == 2 * K * S * F * 4  # h and GELU(h), (R, F) each; no (R, d) expert outputs
    T = -(-K * S // tk.BLOCK_M) + E  # the schedule's tiles
    assert recomputed == K * S * (4 + 8 + 8) + (2 * E + 3 * T) * 8  # the (R,) gates, order, source; the schedule


@pytest.mark.parametrize("i", range(max(len(tk._ROWS_CONFIGS), len(tk._GRAD_CONFIGS))))
def test_every_gpu_tile_config_computes_the_same(monkeypatch, i):
    """The GPU autotuner picks among these tiles; each must be right (masks, partial tiles), whichever wins.

    Run in the interpreter one config at a time (a single config is used without timing).
    """
    monkeypatch.setattr(tk, "interpreting", lambda: False)  # the GPU's config lists ...
    monkeypatch.setattr(tk, "_ROWS_CONFIGS", [tk._ROWS_CONFIGS[i % len(tk._ROWS_CONFIGS)]])
    monkeypatch.setattr(tk, "_GRAD_CONFIGS", [tk._GRAD_CONFIGS[i % len(tk._GRAD_CONFIGS)]])
    tk._kernels.cache_clear()  # ... run by the interpreter (TRITON_INTERPRET=1)
    _, rows, grad = tk._kernels()
    assert rows.configs[0].num_warps == tk._ROWS_CONFIGS[i % len(tk._ROWS_CONFIGS)][2]
    assert grad.configs[0].kwargs["BLOCK_R"] == tk._GRAD_CONFIGS[i % len(tk._GRAD_CONFIGS)][2]
    S, K, E, d, F, activation, experts = CASES[3]  # widths that fill no block exactly, R > BLOCK_M
    x, w_in, w_out, top = routed_problem(S, K, E, d, F, activation, experts=experts)
    gates = torch.rand(S, K, generator=torch.Generator().manual_seed(2)).requires_grad_()
    order_R, counts_E = sort_rows(top, E)
    y = tk.expert_ffn(x, w_in, w_out, order_R, counts_E, activation, gates.t().reshape(-1)[order_R])
    ref = reference_combine(x, w_in, w_out, top, gates, activation)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, (x, w_in, w_out, gates), grad), torch.autograd.grad(ref, (x, w_in, w_out, gates), grad)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_weight_grad_with_gathered_operands():
    g = torch.Generator().manual_seed(1)
    R, K, N = 45, 24, 20
    counts_E = torch.tensor([20, 0, 25])
    sched = tk.Schedule.build(counts_E, R, 16)
    a, grad = torch.randn(30, K, generator=g), torch.randn(R, N, generator=g)
    a_index, g_index = torch.randint(0, 30, (R,), generator=g), torch.randperm(R, generator=g)
    row_scale = torch.rand(R, generator=g)
    dw = tk.weight_grad(a, grad, sched, a_index=a_index, g_index=g_index)
    dw_scaled = tk.weight_grad(a, grad, sched, a_index=a_index, g_index=g_index, row_scale=row_scale)
    a_rows, g_rows = a[a_index], grad[g_index]
    blocks = ((0, 20), (20, 20), (20, 45))
    torch.testing.assert_close(dw, torch.stack([a_rows[s:e].t() @ g_rows[s:e] for s, e in blocks]))
    want = torch.stack([(row_scale[s:e, None] * a_rows[s:e]).t() @ g_rows[s:e] for s, e in blocks])
    torch.testing.assert_close(dw_scaled, want)


def test_fp32_uses_tf32_only_where_torch_matmuls_may():
    assert tk._precision(torch.float32) == "ieee"  # torch's default: exact fp32
    torch.backends.cuda.matmul.allow_tf32 = True  # a property: monkeypatch cannot restore it
    try:
        assert tk._precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert tk._precision(torch.bfloat16) == tk._precision(torch.float16) == "tf32"  # ignored for half types


def test_tuned_tiles_reports_the_autotuners_choices():
    assert tk.tuned_tiles() == {}  # nothing built
    _, rows, _ = tk._kernels()
    assert tk.tuned_tiles() == {}  # built, nothing timed (the interpreter never times)
    key = (256, 128, True, False, False, "torch.bfloat16")
    rows.cache[key] = rows.configs[0]  # what the GPU autotuner records after timing a key
    assert tk.tuned_tiles() == {"rows_mm": {str(key): str(rows.configs[0])}}


def test_supports():
    assert tk.supports(torch.device("cpu"), torch.float32)  # under the interpreter
    assert not tk.supports(torch.device("cpu"), torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernels_bf16_on_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tk._kernels.cache_clear()
    x, w_in, w_out, top = routed_problem(512, 2, 16, 256, 512, "swiglu", torch.bfloat16, "cuda")
    gates = torch.rand(512, 2, device="cuda")
    order_R, counts_E = sort_rows(top, 16)
    y = tk.expert_ffn(x, w_in, w_out, order_R, counts_E, "swiglu", gates.t().reshape(-1)[order_R])
    ref = reference_combine(x.float(), w_in.float(), w_out.float(), top, gates, "swiglu")
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layer", ["smoe", "mhmoe"])
@pytest.mark.parametrize(("activation", "capacity_factor", "recompute"), [("gelu", None, False), ("swiglu", 1.0, True)])
def test_layers_with_the_triton_backend_match_the_reference(layer, activation, capacity_factor, recompute):
    from mhmoe import MHMoE, SparseMoE

    kwargs = dict(num_experts=6, top_k=2, expert_hidden=32, activation=activation, capacity_factor=capacity_factor)
    build = (
        (lambda dispatch, **kw: SparseMoE(d_model=32, dispatch=dispatch, **kwargs, **kw))
        if layer == "smoe"
        else (lambda dispatch, **kw: MHMoE(d_model=64, num_heads=4, dispatch=dispatch, **kwargs, **kw))
    )
    torch.manual_seed(0)
    reference = build("reference")
    fast = build("triton", recompute=recompute)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, 11, 32 if layer == "smoe" else 64)
    mask = torch.rand(3, 11) > 0.2
    outs = []
    for module in (reference, fast):
        xi = x.clone().requires_grad_()
        out = module(xi, token_mask=mask)
        (out.y.square().sum() + out.aux_loss).backward()
        outs.append([out.y, xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_triton_layer_under_half_precision_autocast_matches_grouped_mm(recompute):
    """Mixed precision as on a GPU (fp32 gates and master weights, half-precision expert GEMMs). fp16: the
    interpreter cannot multiply bf16 (tl.dot on bf16 is unsupported there, triton issue #11584)."""
    from mhmoe import MHMoE

    torch.manual_seed(0)
    build = lambda dispatch, **kw: MHMoE(  # noqa: E731
        d_model=64, num_heads=4, num_experts=6, top_k=2, expert_hidden=32, dispatch=dispatch, **kw
    )
    grouped, fast = build("grouped_mm"), build("triton", recompute=recompute)
    fast.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 9, 64)
    outs = []
    for module in (grouped, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            out = module(xi)
        assert out.y.dtype == torch.float16
        (out.y.float().square().sum() + out.aux_loss).backward()
        outs.append([out.y.detach().float(), xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=0, atol=3e-3 * float(a.abs().max()))


def test_permuted_expert_ffn_triton_equals_grouped_rows():
    """The expert-parallel runner's local step: rows taken in an order, results written back in place."""
    from mhmoe.ops.sorted import permuted_expert_ffn

    x, w_in, w_out, top = routed_problem(40, 1, 4, 16, 32, "gelu")
    order_R, counts_E = sort_rows(top, 4)  # K = 1: sorted row r is item order_R[r]
    inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(len(order_R)))
    args = (order_R, inverse_R, counts_E, "gelu")
    ref = permuted_expert_ffn(x, w_in, w_out, *args, "slices")
    want = torch.autograd.grad(ref.square().sum(), (x, w_in, w_out))
    for recompute in (False, True):
        y = permuted_expert_ffn(x, w_in, w_out, *args, "triton", recompute=recompute)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(y.square().sum(), (x, w_in, w_out))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    from mhmoe.ops.backend import resolve_backend

    assert resolve_backend("triton", torch.float32, torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton backend cannot run"):
        resolve_backend("triton", torch.float32, torch.device("cpu"))
    assert resolve_backend("auto", torch.float32, torch.device("cpu"), (8, 8)) == "grouped_mm"
