"""Invariants of the layers: reductions to simpler models, analytic loss values, state, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ACTIVATIONS, ROUTER_CASES, clone_layer, forward_backward, layer_kwargs, make_pair, set_identity_
from torch import nn

from mhmoe import DenseFFN, MHMoE, SigmoidRouter, SoftmaxRouter, SparseMoE, SwitchRouter, XMoERouter
from mhmoe.layers.losses import balance_loss, z_loss
from mhmoe.ops.backend import resolve_backend

F64 = dict(rtol=1e-12, atol=1e-12)
LAYERS = [pytest.param(SparseMoE, id="SparseMoE"), pytest.param(MHMoE, id="MHMoE")]
DISPATCHES = ["auto", "reference"]


# ---------------------------------------------------------------- MH-MoE reduces to the plain MoE


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("identity", ["no-layers", "identity-weights"])
def test_one_head_with_identity_projections_equals_plain_moe(identity, dispatch):
    if identity == "no-layers":
        layer = MHMoE(
            d_model=8,
            num_heads=1,
            num_experts=4,
            top_k=2,
            expert_hidden=8,
            multi_head_layers=0,
            merge_layers=0,
            dispatch=dispatch,
        ).double()
        assert isinstance(layer.multi_head_layer, nn.Identity) and isinstance(layer.merge_layer, nn.Identity)
    else:
        layer = MHMoE(d_model=8, num_heads=1, num_experts=4, top_k=2, expert_hidden=8, dispatch=dispatch).double()
        set_identity_(layer.multi_head_layer)
        set_identity_(layer.merge_layer)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out, plain = layer(x), layer.moe(x)
    torch.testing.assert_close(out.y, plain.y, **F64)
    torch.testing.assert_close(out.aux_loss, plain.aux_loss, **F64)
    assert torch.equal(out.stats.top_experts, plain.stats.top_experts)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("num_heads", [2, 4])
def test_identity_projections_equal_moe_on_token_major_sub_tokens(num_heads, dispatch):
    B, L, D, K = 2, 3, 8, 2
    layer = MHMoE(
        d_model=D,
        num_heads=num_heads,
        num_experts=4,
        top_k=K,
        expert_hidden=8,
        multi_head_layers=0,
        merge_layers=0,
        dispatch=dispatch,
    ).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    out = layer(x)
    sub_tokens = x.reshape(B * L * num_heads, D // num_heads)  # sub-token j of token i is row i·H + j
    plain = layer.moe(sub_tokens)
    torch.testing.assert_close(out.y, plain.y.reshape(B, L, D), **F64)
    torch.testing.assert_close(out.aux_loss, plain.aux_loss, **F64)
    assert out.stats.top_experts.shape == (B * L * num_heads, K)
    assert torch.equal(out.stats.top_experts, plain.stats.top_experts)
    # The layout is token-major: routing sub-token j of token (b, t) alone gives row (b·L + t)·H + j.
    d = D // num_heads
    b, t, j = 1, 2, num_heads - 1
    alone = layer.moe.router(x[b, t, j * d : (j + 1) * d].reshape(1, d))
    assert torch.equal(out.stats.top_experts[(b * L + t) * num_heads + j], alone.top_experts[0])


# ---------------------------------------------------------------- one expert == dense FFN; uniform router == mean


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("router", ["softmax", "switch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_expert_top1_equals_dense_ffn(activation, router, dispatch):
    layer = SparseMoE(
        d_model=8, num_experts=1, top_k=1, expert_hidden=8, activation=activation, router=router, dispatch=dispatch
    ).double()
    dense = DenseFFN(d_model=8, hidden=8, activation=activation).double()
    layer.experts.load_dense(0, dense)
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out.y, dense(x), **F64)
    assert torch.all(out.stats.top_experts == 0)
    assert out.stats.balance_loss.item() == pytest.approx(1.0, abs=1e-15)  # E · p · frac = 1 · 1 · 1


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_uniform_router_with_all_experts_equals_mean_of_experts(activation, dispatch):
    E = 4
    layer = SparseMoE(
        d_model=8, num_experts=E, top_k=E, expert_hidden=8, activation=activation, dispatch=dispatch
    ).double()
    with torch.no_grad():
        layer.router.weight.zero_()  # logits 0 -> probabilities 1/E
    x = torch.randn(6, 8, dtype=torch.float64)
    out = layer(x)
    mean = torch.stack([layer.experts.expert(e, x) for e in range(E)]).mean(0)
    torch.testing.assert_close(out.y, mean, **F64)
    assert out.stats.balance_loss.item() == pytest.approx(1.0, abs=1e-14)


# ---------------------------------------------------------------- dropless: tokens are independent


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float64, id="f64-slices"), pytest.param(torch.float32, id="f32-grouped_mm")]
)
@pytest.mark.parametrize("cls", LAYERS)
def test_dropless_token_output_does_not_depend_on_other_tokens(cls, dtype):
    torch.manual_seed(1)
    layer = cls(**layer_kwargs(cls, num_shared_experts=1)).to(dtype)
    x = torch.randn(9, 8, dtype=dtype)
    batched = layer(x).y
    tolerance = F64 if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for i in range(len(x)):
        torch.testing.assert_close(layer(x[i : i + 1]).y[0], batched[i], **tolerance)
    # And with a different set of neighbours.
    torch.testing.assert_close(
        layer(torch.cat([x[3:5], torch.randn(5, 8, dtype=dtype)])).y[:2], batched[3:5], **tolerance
    )


# ---------------------------------------------------------------- state: eval changes nothing; training updates


@pytest.mark.parametrize(("router", "top_k", "router_kwargs"), ROUTER_CASES)
@pytest.mark.parametrize("cls", LAYERS)
def test_eval_mode_changes_no_state(cls, router, top_k, router_kwargs):
    layer = cls(**layer_kwargs(cls, top_k=top_k, router=router, router_kwargs=router_kwargs, capacity_factor=1.0))
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(3):
        forward_backward(layer, torch.randn(4, 5, 8))  # with autograd and a backward, not only no_grad
        with torch.no_grad():
            layer(torch.randn(2, 8))
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_training_mode_counts_sigmoid_router_load():
    layer = MHMoE(d_model=8, num_heads=2, num_experts=4, top_k=2, expert_hidden=8, router="sigmoid")
    router = layer.moe.router
    assert isinstance(router, SigmoidRouter)
    x = torch.randn(3, 5, 8)
    token_mask = torch.ones(3, 5, dtype=torch.bool)
    token_mask[0, 3:] = False  # 2 padding tokens
    out = layer.train()(x, token_mask)
    assert torch.equal(router.load, out.stats.tokens_per_expert.float())
    assert router.load.sum().item() == (15 - 2) * 2 * 2  # valid tokens · heads · top_k
    layer(x)  # accumulates until update_bias
    assert router.load.sum().item() == (13 + 15) * 2 * 2


def test_update_bias_moves_toward_balance_and_resets_load():
    router = SigmoidRouter(4, num_experts=4, top_k=1, bias_update_rate=0.1)
    router.load.copy_(torch.tensor([10.0, 0.0, 2.0, 4.0]))  # mean 4
    router.update_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.0]))
    assert torch.all(router.load == 0)

    # End to end: every token prefers expert 0; its bias goes down, the others' up, until routing spreads.
    router = SigmoidRouter(4, num_experts=4, top_k=1, bias_update_rate=0.05)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0.9, 0, 0], [0, 0, 0.8, 0], [0, 0, 0, 0.7]]))
    x = torch.ones(16, 4)
    first = router(x).top_experts
    assert torch.all(first == 0)
    router.update_bias()
    assert router.expert_bias[0] < 0 and torch.all(router.expert_bias[1:] > 0)
    for _ in range(10):
        router(x)
        router.update_bias()
    assert torch.all(router.load == 0)
    assert not torch.all(router(x).top_experts == 0)  # the bias moved tokens off the overloaded expert


def test_training_mode_rescales_xmoe_code_embeddings():
    router = XMoERouter(8, num_experts=4, top_k=1, form="code")
    before = router.expert_embeddings.detach().clone()
    router.eval()(torch.randn(5, 8))
    assert torch.equal(router.expert_embeddings, before)
    router.train()(torch.randn(5, 8))
    torch.testing.assert_close(router.expert_embeddings.norm(dim=1), torch.full((4,), 1.5))


@pytest.mark.parametrize(("router", "top_k", "router_kwargs"), ROUTER_CASES)
def test_two_training_forwards_then_one_backward(router, top_k, router_kwargs):
    """One graph holding two forwards (shared layer, siamese inputs, summed micro-batches) must backward,
    although X-MoE's code form rescales its embeddings in place at every training forward."""
    layer = MHMoE(**layer_kwargs(MHMoE, top_k=top_k, router=router, router_kwargs=router_kwargs)).train()
    first, second = layer(torch.randn(3, 8)), layer(torch.randn(4, 8))
    (first.y.sum() + second.y.sum() + first.aux_loss + second.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_sigmoid_router_state_stays_float32_when_the_layer_is_cast_to_bf16():
    layer = SparseMoE(d_model=8, num_experts=2, top_k=1, expert_hidden=8, router="sigmoid")
    layer.router.expert_bias.fill_(0.5)
    layer.to(torch.bfloat16)
    router = layer.router
    assert router.weight.dtype == torch.bfloat16  # the parameters do follow the cast
    assert router.load.dtype == router.expert_bias.dtype == torch.float32
    for _ in range(6):
        layer(torch.randn(100, 8, dtype=torch.bfloat16))
    assert router.load.sum().item() == 600  # a bf16 counter would lose counts past 256
    router.bias_update_rate = 1e-3
    router.update_bias(torch.tensor([3.0, 1.0]))
    assert router.expert_bias.tolist() == [pytest.approx(0.499, abs=1e-7), pytest.approx(0.501, abs=1e-7)]
    layer.double()  # float64 is at least float32: it is kept
    assert router.load.dtype == router.expert_bias.dtype == torch.float64


# ---------------------------------------------------------------- losses: analytic values


def test_balance_loss_is_one_under_uniform_probabilities():
    for num_experts in (1, 3, 8):
        probs = torch.full((7, num_experts), 1 / num_experts, dtype=torch.float64)
        first = torch.randint(num_experts, (7,))  # any first choices
        assert balance_loss(probs, first).item() == pytest.approx(1.0, abs=1e-14)
        valid = torch.tensor([True, False, True, True, False, False, True])
        assert balance_loss(probs, first, valid).item() == pytest.approx(1.0, abs=1e-14)


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]], dtype=torch.float64)
    first = torch.tensor([0, 0, 1])
    # mean p = (0.4, 0.6), frac = (2/3, 1/3): 2 · (0.4·2/3 + 0.6·1/3) = 2 · 7/15
    assert balance_loss(probs, first).item() == pytest.approx(14 / 15, abs=1e-15)
    valid = torch.tensor([True, True, False])
    # mean p = (0.55, 0.45), frac = (1, 0): 2 · 0.55
    assert balance_loss(probs, first, valid).item() == pytest.approx(1.1, abs=1e-15)
    # The gradient flows through p only: d/dp_se = E · frac_e / S.
    p = probs.clone().requires_grad_(True)
    balance_loss(p, first).backward()
    torch.testing.assert_close(p.grad, torch.tensor([[2 / 3 * 2 / 3, 1 / 3 * 2 / 3]] * 3, dtype=torch.float64))


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    # logsumexp = ln 2 and ln 4 = 2 ln 2: mean of squares = (1 + 4) / 2 · (ln 2)²
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-14)
    assert z_loss(logits, torch.tensor([False, True])).item() == pytest.approx(4 * math.log(2) ** 2, rel=1e-14)


def test_losses_are_zero_not_nan_without_valid_tokens():
    probs, logits = torch.rand(3, 4).softmax(-1), torch.randn(3, 4)
    none_valid = torch.zeros(3, dtype=torch.bool)
    assert balance_loss(probs, probs.argmax(-1), none_valid).item() == 0
    assert z_loss(logits, none_valid).item() == 0
    assert balance_loss(probs[:0], probs[:0].argmax(-1)).item() == 0
    assert z_loss(logits[:0]).item() == 0
    # Through the layer: an all-padding batch.
    layer = MHMoE(**layer_kwargs(MHMoE, z_loss_coef=0.1, capacity_factor=1.0))
    out = layer(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))
    assert out.aux_loss.item() == 0 and out.stats.balance_loss.item() == 0 and out.stats.z_loss.item() == 0
    assert out.stats.dropped_fraction.item() == 0
    assert torch.all(out.stats.tokens_per_expert == 0)


def test_layer_aux_loss_combines_weighted_losses():
    layer = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8, balance_loss_coef=0.3, z_loss_coef=0.2)
    out = layer(torch.randn(5, 8))
    torch.testing.assert_close(out.aux_loss, 0.3 * out.stats.balance_loss + 0.2 * out.stats.z_loss)


# ---------------------------------------------------------------- router numerics


ROUTER_OBJECTS = [
    pytest.param(lambda: SoftmaxRouter(8, 4, 2), id="softmax"),
    pytest.param(lambda: SwitchRouter(8, 4), id="switch"),
    pytest.param(lambda: XMoERouter(8, 4, 2, form="paper"), id="xmoe-paper"),
    pytest.param(lambda: XMoERouter(8, 4, 2, form="code"), id="xmoe-code"),
    pytest.param(lambda: SigmoidRouter(8, 4, 2), id="sigmoid"),
]


@pytest.mark.parametrize("make", ROUTER_OBJECTS)
def test_router_computes_in_at_least_float32(make):
    router = make().eval()
    x = torch.randn(6, 8)
    for in_dtype, router_dtype in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        r = router.to(in_dtype)(x.to(in_dtype))
        assert r.gates.dtype == r.balance_probs.dtype == r.logits.dtype == router_dtype, in_dtype
        assert r.top_experts.dtype == torch.int64
    # A bf16 layer routes in float32 too.
    layer = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8).to(torch.bfloat16)
    assert layer.router(x.to(torch.bfloat16)).gates.dtype == torch.float32


@pytest.mark.parametrize("make", ROUTER_OBJECTS)
def test_router_gates(make):
    router = make().double()
    r = router(torch.randn(20, 8, dtype=torch.float64))
    K = router.top_k
    assert r.top_experts.shape == r.gates.shape == (20, K)
    assert torch.all(r.gates >= 0)
    assert torch.all((r.top_experts[:, :, None] != r.top_experts[:, None, :]) | torch.eye(K, dtype=torch.bool))
    torch.testing.assert_close(r.balance_probs.sum(-1), torch.ones(20, dtype=torch.float64))
    if K > 1:  # top-k gates renormalised
        torch.testing.assert_close(r.gates.sum(-1), torch.ones(20, dtype=torch.float64))
    if isinstance(router, SwitchRouter):  # the gate is the chosen expert's probability, the largest one
        torch.testing.assert_close(r.gates[:, 0], r.balance_probs.max(-1).values, rtol=0, atol=0)
        assert torch.equal(r.top_experts[:, 0], r.balance_probs.argmax(-1))
    if isinstance(router, SoftmaxRouter):
        torch.testing.assert_close(r.balance_probs, r.logits.softmax(-1))


# ---------------------------------------------------------------- residual="subtoken" (v1 Eq. 6)


@pytest.mark.parametrize("merge_layers", [0, 1])
def test_subtoken_residual_adds_merged_sub_tokens(merge_layers):
    # outer:    y = M(o)          with o = MoE(h), h = head(x)
    # subtoken: y = M(o + h)
    # M(z) = z Wᵀ + b is affine, so y_sub − y_outer = h Wᵀ = M(h) − M(0); with no merge layer it is h.
    outer = MHMoE(**layer_kwargs(MHMoE, merge_layers=merge_layers, residual="outer")).double()
    subtoken = MHMoE(**layer_kwargs(MHMoE, merge_layers=merge_layers, residual="subtoken")).double()
    subtoken.load_state_dict(outer.state_dict())
    with torch.no_grad():
        for p in outer.merge_layer.parameters():  # a non-zero bias, so that it must cancel
            p.uniform_(-1, 1)
    subtoken.load_state_dict(outer.state_dict())
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    h = outer.multi_head_layer(x)
    merge = outer.merge_layer
    expected = merge(h) - merge(torch.zeros_like(h))
    torch.testing.assert_close(subtoken(x).y - outer(x).y, expected, **F64)
    if merge_layers == 0:
        torch.testing.assert_close(subtoken(x).y - outer(x).y, h, **F64)


# ---------------------------------------------------------------- edge cases: no tokens, empty experts, NaN


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("dispatch", ["auto", "slices", "reference"])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
@pytest.mark.parametrize("cls", LAYERS)
def test_zero_tokens(cls, shape, dispatch, capacity_factor):
    layer = cls(**layer_kwargs(cls, dispatch=dispatch, capacity_factor=capacity_factor, z_loss_coef=0.1))
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    assert out.y.shape == shape
    assert torch.isfinite(out.aux_loss) and out.aux_loss.item() == 0
    assert out.stats.top_experts.shape == (0, 2)
    assert out.stats.dropped_fraction.item() == 0
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad.shape == shape
    for name, p in layer.named_parameters():
        assert p.grad is not None, name  # every parameter takes part, so DDP sees no unused ones
        assert torch.all(p.grad == 0), name


@pytest.mark.parametrize(
    ("fast", "dtype"),
    [pytest.param("auto", torch.float64, id="slices-f64"), pytest.param("grouped_mm", torch.float32, id="gmm-f32")],
)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_empty_experts(fast, dtype, capacity_factor):
    reference, layer = make_pair(
        SparseMoE,
        fast=fast,
        dtype=dtype,
        d_model=8,
        num_experts=8,
        top_k=2,
        expert_hidden=8,
        capacity_factor=capacity_factor,
    )
    x = torch.randn(2, 8, dtype=dtype)
    expected, actual = forward_backward(reference, x), forward_backward(layer, x)
    assert (actual.out.stats.tokens_per_expert == 0).sum() >= 4  # at most 2·2 experts used
    tolerance = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.out.y, expected.out.y, **tolerance)
    torch.testing.assert_close(actual.x_grad, expected.x_grad, **tolerance)
    for name in expected.param_grads:
        torch.testing.assert_close(actual.param_grads[name], expected.param_grads[name], **tolerance)
    unused = actual.out.stats.tokens_per_expert == 0
    assert torch.all(actual.param_grads["experts.w_in"][unused] == 0)


@pytest.mark.parametrize("dispatch", ["auto", "reference"])
@pytest.mark.parametrize("cls", LAYERS)
def test_nan_token_poisons_only_itself_and_the_aux_loss(cls, dispatch):
    """Documents moe.py's module docstring: a non-finite token gets a non-finite output and makes
    aux_loss non-finite; in dropless mode the other tokens are unaffected."""
    layer = cls(**layer_kwargs(cls, dispatch=dispatch)).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    x[2, 3] = float("nan")
    out = layer(x)
    assert torch.isnan(out.y[2]).all()
    others = torch.arange(6) != 2
    assert torch.isfinite(out.y[others]).all()
    torch.testing.assert_close(out.y[others], layer(x[others]).y, **F64)
    assert not torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("router,top_k,router_kwargs", ROUTER_CASES)
@pytest.mark.parametrize("cls", LAYERS)
def test_non_finite_padding_reaches_no_loss_and_no_gradient(
    cls, router, top_k, router_kwargs, dispatch, capacity_factor
):
    """A NaN or inf in a token masked out by token_mask changes nothing: outputs, aux_loss and every parameter
    gradient are bit for bit those with zeros in its place (0 · NaN would have made aux_loss and the router and
    expert gradients NaN); that token's input gradient is 0, the others' are unchanged."""
    kwargs = layer_kwargs(cls, router=router, top_k=top_k, router_kwargs=router_kwargs, dispatch=dispatch,
                          capacity_factor=capacity_factor, num_shared_experts=1, z_loss_coef=0.1)  # fmt: skip
    layer = cls(**kwargs).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3] = mask[1, 1] = False
    clean = x.clone()
    clean[0, 3] = clean[1, 1] = 0.0
    x[0, 3, 2], x[1, 1] = float("nan"), float("inf")
    bad, good = forward_backward(clone_layer(layer), x, mask), forward_backward(clone_layer(layer), clean, mask)
    assert torch.isfinite(bad.out.aux_loss) and torch.isfinite(bad.x_grad).all()
    assert torch.equal(bad.out.y, good.out.y) and torch.equal(bad.out.aux_loss, good.out.aux_loss)
    assert torch.equal(bad.x_grad[mask], good.x_grad[mask]) and torch.equal(bad.x_grad[~mask], torch.zeros(2, 8))
    for name, grad in bad.param_grads.items():
        assert torch.equal(grad, good.param_grads[name]), name


# ---------------------------------------------------------------- ablation knobs and initialisation


@pytest.mark.parametrize("merge_layers", [0, 1, 2])
@pytest.mark.parametrize("multi_head_layers", [0, 1, 2, 3])
def test_head_and_merge_depth(multi_head_layers, merge_layers):
    layer = MHMoE(**layer_kwargs(MHMoE, multi_head_layers=multi_head_layers, merge_layers=merge_layers))

    def check(module, n, zero_bias):
        if n == 0:
            assert isinstance(module, nn.Identity)
            return
        if n == 1:
            assert isinstance(module, nn.Linear)
            linears = [module]
        else:
            assert isinstance(module, nn.Sequential) and len(module) == 2 * n - 1
            linears = list(module[0::2])
            assert all(isinstance(m, nn.ReLU) for m in module[1::2])
        for linear in linears:
            assert isinstance(linear, nn.Linear) and linear.weight.shape == (8, 8) and linear.bias is not None
            assert torch.all(linear.bias == 0) == zero_bias

    check(layer.multi_head_layer, multi_head_layers, zero_bias=False)
    check(layer.merge_layer, merge_layers, zero_bias=True)
    out = layer(torch.randn(2, 3, 8))
    assert out.y.shape == (2, 3, 8) and torch.isfinite(out.y).all()


def test_default_projections_use_the_paper_init():
    D = 256
    layer = MHMoE(d_model=D, num_heads=4, num_experts=2, top_k=1, expert_hidden=4)
    head, merge = layer.multi_head_layer, layer.merge_layer
    assert isinstance(head, nn.Linear) and isinstance(merge, nn.Linear)
    assert head.weight.shape == merge.weight.shape == (D, D)
    xavier_bound = math.sqrt(6 / (2 * D))
    for linear, gain in ((head, 1 / math.sqrt(2)), (merge, 1.0)):
        w = linear.weight.detach()
        bound = gain * xavier_bound
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.99 * bound  # uniform on ±bound, not a narrower distribution
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.all(merge.bias == 0)  # v1: merge bias 0
    assert head.bias.abs().max() > 0 and head.bias.abs().max() <= 1 / math.sqrt(D)  # PyTorch's default bias


# ---------------------------------------------------------------- bf16


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("cls", LAYERS)
def test_bf16_fast_path_close_to_float32(cls):
    # d = 8 and F = 8: 16-byte bf16 rows, so "auto" takes grouped_mm.
    kwargs = layer_kwargs(cls, d_model=16, expert_hidden=8, activation="swiglu")
    layer = cls(**kwargs)
    layer_bf16 = clone_layer(layer).to(torch.bfloat16)
    assert resolve_backend("auto", torch.bfloat16, torch.device("cpu"), (8, 8)) == "grouped_mm"
    x = torch.randn(4, 6, 16)
    expected = layer(x).y
    xb = x.to(torch.bfloat16).requires_grad_(True)
    out = layer_bf16(xb)
    assert out.y.dtype == torch.bfloat16 and torch.isfinite(out.y).all()
    assert _relative_error(out.y, expected) < 0.05
    (out.y.float().square().sum() + out.aux_loss).backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer_bf16.parameters())


@pytest.mark.parametrize("cls", LAYERS)
def test_autocast_bf16_close_to_float32(cls):
    layer = cls(**layer_kwargs(cls, d_model=16, expert_hidden=8))
    x = torch.randn(4, 6, 16, requires_grad=True)
    expected = layer(x).y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.y.shape == x.shape and torch.isfinite(out.y).all()
    assert _relative_error(out.y, expected) < 0.05
    (out.y.float().square().sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_autocast_with_narrow_widths_falls_back_to_slices():
    """Under autocast the experts run in bf16: 4-wide fp32 rows fit grouped_mm, 4-wide bf16 rows don't."""
    layer = MHMoE(**layer_kwargs(MHMoE, expert_hidden=4))  # d = 4, F = 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, 8))
    assert torch.isfinite(out.y).all()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_largest_k_is_topk(k):
    """The CPU two-pass top-2 equals torch.topk: values, indices (best first) and gradients."""
    from mhmoe.layers.routers import largest_k

    scores = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    values, indices = largest_k(scores, k)
    expected_values, expected_indices = scores.topk(k, dim=-1)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)
    g = torch.randn_like(values)
    (grad,) = torch.autograd.grad(values, scores, g)
    (expected_grad,) = torch.autograd.grad(expected_values, scores, g)
    assert torch.equal(grad, expected_grad)
    tied = torch.tensor([[1.0, 3.0, 3.0, 3.0]])
    assert largest_k(tied, 2)[1].tolist() == [[1, 2]]  # ties: lower index first
