"""The fast dispatch (sorted rows, grouped GEMMs or slices) equals the per-expert reference loop.

Both layers of a pair share weights and buffers, and routing is computed by the same router code on
the same input, so they route identically; only the dispatch differs. Layers stay in training mode
(no router here has jitter by default, and stateful routers update identically in both copies).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ACTIVATIONS,
    ROUTER_CASES,
    TOLERANCES,
    assert_bitwise_equal,
    assert_fast_matches_reference,
    assert_results_close,
    clone_layer,
    forward_backward,
    layer_kwargs,
    make_pair,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from mhmoe import MHMoE, SparseMoE
from mhmoe.ops.backend import resolve_backend
from mhmoe.ops.capacity import capacity_keep, expert_capacity
from mhmoe.ops.reference import capacity_keep_reference

LAYERS = [pytest.param(SparseMoE, id="SparseMoE"), pytest.param(MHMoE, id="MHMoE")]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def test_auto_backend_choices():
    """What "auto" resolves to on CPU, so the tests below know which kernel they exercise."""
    cpu = torch.device("cpu")
    assert resolve_backend("auto", torch.float64, cpu, (4, 8)) == "slices"  # grouped_mm has no float64
    assert resolve_backend("auto", torch.float32, cpu, (4, 8)) == "grouped_mm"
    assert resolve_backend("auto", torch.bfloat16, cpu, (8, 8)) == "grouped_mm"
    assert resolve_backend("auto", torch.float32, cpu, (4, 6)) == "slices"  # 24-byte rows: grouped_mm can't
    assert resolve_backend("auto", torch.bfloat16, cpu, (4, 8)) == "slices"  # 8-byte rows
    assert resolve_backend("slices", torch.float32, cpu, (4, 8)) == "slices"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("router", "top_k", "router_kwargs"), ROUTER_CASES)
@pytest.mark.parametrize("cls", LAYERS)
def test_auto_matches_reference(cls, router, top_k, router_kwargs, activation, capacity_factor, dtype):
    kwargs = layer_kwargs(
        cls,
        top_k=top_k,
        router=router,
        router_kwargs=router_kwargs,
        activation=activation,
        capacity_factor=capacity_factor,
        z_loss_coef=1e-3,
    )
    reference, fast = make_pair(cls, dtype=dtype, **kwargs)
    x = torch.randn(3, 5, 8, dtype=dtype)
    actual, _ = assert_fast_matches_reference(reference, fast, x, **TOLERANCES[dtype])
    if capacity_factor == 0.5:  # capacity for half of the assignments: some must be dropped
        assert actual.out.stats.dropped_fraction > 0
    if capacity_factor is None:
        assert actual.out.stats.dropped_fraction == 0


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("grouped_mm", torch.float32, id="grouped_mm-f32"),
        pytest.param("slices", torch.float32, id="slices-f32"),
        pytest.param("slices", torch.float64, id="slices-f64"),
    ],
)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize(("router", "top_k", "router_kwargs"), ROUTER_CASES)
@pytest.mark.parametrize("cls", LAYERS)
def test_explicit_backend_matches_reference(cls, router, top_k, router_kwargs, capacity_factor, backend, dtype):
    kwargs = layer_kwargs(cls, top_k=top_k, router=router, router_kwargs=router_kwargs, capacity_factor=capacity_factor)
    reference, fast = make_pair(cls, fast=backend, dtype=dtype, activation="swiglu", **kwargs)
    assert_fast_matches_reference(reference, fast, torch.randn(2, 7, 8, dtype=dtype), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", LAYERS)
def test_shared_experts_match_reference(cls, dtype):
    kwargs = layer_kwargs(cls, num_shared_experts=2, shared_expert_hidden=4, activation="swiglu")
    reference, fast = make_pair(cls, dtype=dtype, **kwargs)
    assert (reference.moe if cls is MHMoE else reference).shared_experts is not None
    actual, _ = assert_fast_matches_reference(reference, fast, torch.randn(4, 3, 8, dtype=dtype), **TOLERANCES[dtype])
    assert any(name.endswith("shared_experts.fc_in.weight") for name in actual.param_grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize(("router", "top_k", "router_kwargs"), ROUTER_CASES)
@pytest.mark.parametrize("cls", LAYERS)
def test_token_mask_matches_reference(cls, router, top_k, router_kwargs, capacity_factor, dtype):
    kwargs = layer_kwargs(cls, top_k=top_k, router=router, router_kwargs=router_kwargs, capacity_factor=capacity_factor)
    reference, fast = make_pair(cls, dtype=dtype, **kwargs)
    x = torch.randn(3, 6, 8, dtype=dtype)
    lengths = torch.tensor([6, 4, 1])
    token_mask = torch.arange(6) < lengths[:, None]  # right padding
    actual, _ = assert_fast_matches_reference(reference, fast, x, token_mask, **TOLERANCES[dtype])
    # Padding is routed nowhere: no output from the experts, no count in any statistic.
    tokens_routed = int(token_mask.sum()) * (2 if cls is MHMoE else 1)
    assert int(actual.out.stats.tokens_per_expert.sum()) == tokens_routed * top_k
    if cls is SparseMoE:
        assert torch.all(actual.out.y[~token_mask] == 0)
        assert torch.all(actual.x_grad[~token_mask] == 0)


@pytest.mark.parametrize("cls", LAYERS)
def test_router_jitter_matches_reference_with_same_noise(cls):
    """Jitter draws noise in training mode: with the same RNG state both paths route alike."""
    kwargs = layer_kwargs(cls, router_kwargs={"jitter": 0.1})
    reference, fast = make_pair(cls, dtype=torch.float64, **kwargs)
    x = torch.randn(4, 4, 8, dtype=torch.float64)
    torch.manual_seed(7)
    expected = forward_backward(reference, x)
    torch.manual_seed(7)
    actual = forward_backward(fast, x)
    torch.testing.assert_close(actual.out.y, expected.out.y, **TOLERANCES[torch.float64])
    for name in expected.param_grads:
        torch.testing.assert_close(actual.param_grads[name], expected.param_grads[name], **TOLERANCES[torch.float64])


def test_misaligned_widths_fall_back_to_slices_in_float32():
    """Widths whose rows are not 16-byte multiples (d=4, F=6 fp32) must not reach grouped_mm under "auto"."""
    reference, fast = make_pair(MHMoE, dtype=torch.float32, **layer_kwargs(MHMoE, expert_hidden=6))
    assert_fast_matches_reference(reference, fast, torch.randn(5, 8), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------- property-based: random shapes, float64

batch_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def layer_configs(draw):
    cls = draw(st.sampled_from([SparseMoE, MHMoE]))
    num_heads = draw(st.integers(1, 4)) if cls is MHMoE else 1
    head_dim = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, 6))
    router = draw(st.sampled_from(["softmax", "switch", "xmoe", "sigmoid"]))
    top_k = 1 if router == "switch" else draw(st.integers(1, num_experts))
    kwargs = dict(
        d_model=num_heads * head_dim,
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=draw(st.integers(1, 5)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        router=router,
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.25])),
        num_shared_experts=draw(st.sampled_from([0, 0, 1])),
        z_loss_coef=1e-3,
    )
    if router == "xmoe":
        kwargs["router_kwargs"] = {"form": draw(st.sampled_from(["paper", "code"]))}
    if cls is MHMoE:
        kwargs["num_heads"] = num_heads
    return cls, kwargs


@settings(max_examples=40, deadline=None, derandomize=True)
@given(config=layer_configs(), batch_shape=batch_shapes, seed=st.integers(0, 2**16))
def test_property_fast_matches_reference_float64(config, batch_shape, seed):
    cls, kwargs = config
    reference, fast = make_pair(cls, dtype=torch.float64, seed=seed, **kwargs)
    x = torch.randn(*batch_shape, kwargs["d_model"], dtype=torch.float64)
    actual, _ = assert_fast_matches_reference(reference, fast, x, **TOLERANCES[torch.float64])
    assert actual.out.y.shape == x.shape
    heads = kwargs.get("num_heads", 1)
    assert actual.out.stats.top_experts.shape == (x[..., 0].numel() * heads, kwargs["top_k"])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(config=layer_configs(), batch_shape=batch_shapes, seed=st.integers(0, 2**16))
def test_property_fast_matches_reference_float32(config, batch_shape, seed):
    """float32 "auto": grouped_mm where the widths allow it, slices otherwise."""
    cls, kwargs = config
    reference, fast = make_pair(cls, dtype=torch.float32, seed=seed, **kwargs)
    x = torch.randn(*batch_shape, kwargs["d_model"])
    assert_fast_matches_reference(reference, fast, x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- capacity: vectorised == loop, GShard priority


def random_assignments(generator: torch.Generator, num_items: int, num_experts: int, top_k: int) -> torch.Tensor:
    """(S, K) distinct experts per row, like a top-k."""
    rows = [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_items)]
    return torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.long)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    num_items=st.integers(0, 12),
    num_experts=st.integers(1, 5),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_capacity_keep_matches_reference_and_gshard_priority(num_items, num_experts, data, seed):
    top_k = data.draw(st.integers(1, num_experts))
    capacity = data.draw(st.integers(1, max(1, num_items)))
    with_mask = data.draw(st.booleans())
    generator = torch.Generator().manual_seed(seed)
    top_SK = random_assignments(generator, num_items, num_experts, top_k)
    valid_S = torch.rand(num_items, generator=generator) < 0.7 if with_mask else None

    keep = capacity_keep(top_SK, capacity, num_experts, valid_S)
    assert keep.dtype == torch.bool and keep.shape == (num_items, top_k)
    assert torch.equal(keep, capacity_keep_reference(top_SK, capacity, num_experts, valid_S))

    valid = torch.ones(num_items, dtype=torch.bool) if valid_S is None else valid_S
    assert not keep[~valid].any()  # padding takes no capacity
    for e in range(num_experts):
        routed = (top_SK == e) & valid[:, None]
        kept = keep & (top_SK == e)
        # No expert over capacity, and nothing dropped while there is room.
        assert int(kept.sum()) == min(capacity, int(routed.sum()))
        # GShard priority: a choice-k assignment is kept only if every earlier choice to e is kept,
        # and within one choice rank, earlier items come first.
        for k in range(top_k):
            if kept[:, k].any():
                assert torch.equal(kept[:, :k], routed[:, :k])
            s_kept = kept[:, k].nonzero().flatten()
            if len(s_kept):
                last = int(s_kept.max())
                assert torch.equal(kept[:last, k], routed[:last, k])


def test_capacity_first_choice_never_dropped_for_second_choice():
    """Hand example: 3 items all pick expert 0 second and expert 0 first for item 2; capacity 1."""
    top_SK = torch.tensor([[1, 0], [2, 0], [0, 1]])
    keep = capacity_keep(top_SK, capacity=1, num_experts=3, valid_S=None)
    # Expert 0: item 2's first choice wins over items 0 and 1's second choices.
    # Expert 1: item 0's first choice wins over item 2's second choice. Expert 2: item 1.
    assert keep.tolist() == [[True, False], [True, False], [True, False]]
    assert expert_capacity(1.0, num_items=3, top_k=2, num_experts=3) == 2
    assert expert_capacity(0.01, num_items=3, top_k=2, num_experts=3) == 1  # at least 1


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    ("dtype", "backend"),
    [
        pytest.param(torch.float32, "grouped_mm", id="grouped_mm-f32"),
        pytest.param(torch.float32, "slices", id="slices-f32"),
        pytest.param(torch.float64, "auto", id="auto-f64"),
    ],
)
@pytest.mark.parametrize("cls", LAYERS)
def test_fast_path_is_bitwise_deterministic(cls, dtype, backend):
    _, fast = make_pair(cls, fast=backend, dtype=dtype, **layer_kwargs(cls, capacity_factor=1.0))
    x = torch.randn(4, 8, 8, dtype=dtype)
    assert_bitwise_equal(forward_backward(fast, x), forward_backward(fast, x))


# ---------------------------------------------------------------- gradcheck

# Routing (top-k, capacity) is piecewise constant in the input: the layer is differentiable only
# away from the surfaces where two experts' scores tie. gradcheck perturbs every input entry by
# ±1e-6, so inside the check we assert that every evaluation routes exactly as the unperturbed
# input does (`expected_routing`). If a perturbation flipped a choice, the assertion fails loudly
# instead of gradcheck silently comparing a jump; when it holds, all finite differences are taken
# on one smooth branch and comparing them with the analytic gradient is sound. The seeds below give
# margins far larger than the perturbation. Parameters are gradchecked too, as explicit inputs
# (torch.func.functional_call), so the expert, router and head/merge gradients are all covered.
# ReLU is avoided (a kink at 0 is a second non-smooth surface); capacity is included because
# drops are a function of routing only.


def gradcheck_layer(layer, x: torch.Tensor) -> None:
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    with torch.no_grad():
        expected_routing = layer(x).stats.top_experts.clone()

    def f(x, *params):
        out = functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        assert torch.equal(out.stats.top_experts, expected_routing), "a perturbation changed the routing"
        return out.y, out.aux_loss

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["auto", "reference"])
@pytest.mark.parametrize(
    ("router", "top_k", "router_kwargs", "capacity_factor"),
    [
        pytest.param("softmax", 2, {}, None, id="softmax-top2"),
        pytest.param("softmax", 3, {}, None, id="softmax-topE"),
        pytest.param("xmoe", 2, {"form": "paper", "dim": 3}, 1.0, id="xmoe-capacity"),
        pytest.param("sigmoid", 2, {}, None, id="sigmoid"),
    ],
)
@pytest.mark.parametrize("cls", LAYERS)
def test_gradcheck(cls, router, top_k, router_kwargs, capacity_factor, dispatch):
    kwargs = dict(
        d_model=4,
        num_experts=3,
        top_k=top_k,
        expert_hidden=3,
        activation="swiglu" if cls is MHMoE else "gelu",
        router=router,
        router_kwargs=router_kwargs,
        capacity_factor=capacity_factor,
        balance_loss_coef=0.1,
        z_loss_coef=0.01,
        num_shared_experts=1 if cls is SparseMoE else 0,
        dispatch=dispatch,
    )
    if cls is MHMoE:
        kwargs["num_heads"] = 2
    torch.manual_seed(3)
    layer = cls(**kwargs).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    gradcheck_layer(layer, x)


# ---------------------------------------------------------------- recomputation


def _moe(layer):
    return layer.moe if isinstance(layer, MHMoE) else layer


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("grouped_mm", torch.float32, id="grouped_mm-f32"),
        pytest.param("slices", torch.float64, id="slices-f64"),
    ],
)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cls", LAYERS)
def test_recompute_matches_reference_and_keeping(cls, activation, capacity_factor, backend, dtype):
    """recompute=True: the reference's outputs and gradients; the same forward, bit for bit, as keeping."""
    kwargs = layer_kwargs(cls, activation=activation, capacity_factor=capacity_factor, z_loss_coef=1e-3)
    reference, kept = make_pair(cls, fast=backend, dtype=dtype, **kwargs)
    recomputed = clone_layer(kept)
    _moe(recomputed).recompute = True
    x = torch.randn(3, 6, 8, dtype=dtype)
    token_mask = torch.arange(6) < torch.tensor([6, 3, 1])[:, None]
    actual, _ = assert_fast_matches_reference(reference, recomputed, x, token_mask, **TOLERANCES[dtype])
    kept_result = forward_backward(kept, x, token_mask)
    assert torch.equal(actual.out.y, kept_result.out.y) and torch.equal(actual.out.aux_loss, kept_result.out.aux_loss)
    assert_results_close(actual, kept_result, **TOLERANCES[dtype])


@pytest.mark.parametrize("cls", LAYERS)
def test_recompute_keeps_no_expert_activations(cls):
    """Keeping costs exactly the pre-activations, activations and expert outputs (R·(2F + d) values), not the
    gathered rows."""
    from mhmoe.bench.timing import saved_activation_bytes

    kwargs = layer_kwargs(cls, expert_hidden=16)
    kept = cls(**kwargs)
    recomputed = clone_layer(kept)
    _moe(recomputed).recompute = True
    x = torch.randn(5, 8)
    moe = _moe(kept)
    rows = x.shape[0] * (x.shape[1] // moe.d_model) * moe.top_k  # R = K·S
    difference = saved_activation_bytes(kept, x) - saved_activation_bytes(recomputed, x)
    assert difference == rows * (2 * moe.expert_hidden + moe.d_model) * x.element_size()


def test_ungated_expert_step_keeps_no_outputs():
    """The expert-parallel runner's local step (no gates) keeps pre-activations and activations only."""
    from mhmoe.bench.timing import saved_activation_bytes
    from mhmoe.ops.sorted import permuted_expert_ffn

    N, E, d, F = 30, 3, 8, 16
    order = torch.randperm(N)
    counts = torch.tensor([10, 0, 20])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N))

    class Step(torch.nn.Module):
        def __init__(self, recompute):
            super().__init__()
            self.w_in, self.w_out = torch.nn.Parameter(torch.randn(E, d, F)), torch.nn.Parameter(torch.randn(E, F, d))
            self.recompute = recompute

        def forward(self, x):
            args = (order, inverse, counts, "gelu", "grouped_mm", self.recompute)
            return permuted_expert_ffn(x, self.w_in, self.w_out, *args)

    x = torch.randn(N, d)
    assert saved_activation_bytes(Step(False), x) - saved_activation_bytes(Step(True), x) == 2 * N * F * 4


def test_gradcheck_with_recompute():
    layer = MHMoE(**layer_kwargs(MHMoE, d_model=4, num_experts=3, expert_hidden=3, activation="swiglu", recompute=True))
    gradcheck_layer(layer.double(), torch.randn(3, 4, dtype=torch.float64))


def test_recompute_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="recompute is not supported with dispatch='reference'"):
        SparseMoE(**layer_kwargs(SparseMoE, dispatch="reference", recompute=True))
    with pytest.raises(TypeError, match="recompute must be True or False"):
        SparseMoE(**layer_kwargs(SparseMoE, recompute="yes"))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activate_backward_is_the_gradient_of_activate(activation):
    from mhmoe.ops.activations import activate, activate_backward

    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 5 if activation == "swiglu" else 10, dtype=torch.float64)
    (expected,) = torch.autograd.grad(activate(h, activation), h, grad)
    torch.testing.assert_close(activate_backward(grad, h.detach(), activation), expected, rtol=1e-12, atol=1e-12)
