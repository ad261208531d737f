"""The peers' variants as layer options, each against an independent reference written here from its published
formula (float64, forward and backward), and every fast path against the reference loop.

GLU forms of every activation (Shazeer 2020); expert biases; Qwen2-MoE's sigmoid-gated shared expert;
DeepSeek-V3's group-limited routing, routed scaling factor and sequence-wise balance loss (arXiv 2412.19437,
Eqs. 12–20); transformers' Mixtral / Qwen / OLMoE balance loss over all k choices; Switch Transformers'
capacity and loss per sequence; fairseq's capacity rules. The same variants against the transformers classes
themselves are in tests/test_peers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_fast_matches_reference, forward_backward, make_pair

from mhmoe import MHMoE, MoEConfig, RouterConfig, SparseMoE
from mhmoe.layers.losses import balance_loss
from mhmoe.ops.capacity import capacity_keep
from mhmoe.ops.reference import capacity_keep_reference

F64 = TOLERANCES[torch.float64]
PLAIN = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def expert_by_formula(moe: SparseMoE, e: int, x_Nd: torch.Tensor) -> torch.Tensor:
    """Expert e written out: act(x W_in + b_in) W_out + b_out, a GLU as act(x W_gate) ⊙ (x W_up)."""
    experts = moe.experts
    h = x_Nd @ experts.w_in[e] + (0 if experts.b_in is None else experts.b_in[e])
    if moe.activation in ("swiglu", "geglu", "reglu"):
        gate, up = h.chunk(2, dim=-1)
        a = PLAIN[{"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}[moe.activation]](gate) * up
    else:
        a = PLAIN[moe.activation](h)
    return a @ experts.w_out[e] + (0 if experts.b_out is None else experts.b_out[e])


def moe_by_formula(moe: SparseMoE, x_Sd: torch.Tensor, top_SK: torch.Tensor, gates_SK: torch.Tensor) -> torch.Tensor:
    rows = [
        sum(
            gates_SK[s, k] * expert_by_formula(moe, int(top_SK[s, k]), x_Sd[s : s + 1])[0]
            for k in range(top_SK.shape[1])
        )
        for s in range(x_Sd.shape[0])
    ]
    return torch.stack(rows)


# ------------------------------------------------------------------------ experts: GLU forms and biases


@pytest.mark.parametrize("activation", ["silu", "geglu", "reglu", "swiglu"])
@pytest.mark.parametrize("expert_bias", [False, True])
def test_experts_equal_their_formula(activation, expert_bias):
    torch.manual_seed(0)
    moe = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=6, activation=activation,
                    expert_bias=expert_bias).double()  # fmt: skip
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    r = moe.router(x_ref.reshape(-1, 8))
    expected = moe_by_formula(moe, x_ref.reshape(-1, 8), r.top_experts, r.gates).view(2, 5, 8)
    torch.testing.assert_close(out.y, expected, **F64)
    params = list(moe.parameters())
    grads = torch.autograd.grad(out.y.sin().sum(), [x, *params])
    grads_ref = torch.autograd.grad(expected.sin().sum(), [x_ref, *params])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **F64)
    assert (moe.experts.b_in is not None) == expert_bias


@pytest.mark.parametrize("cls", [SparseMoE, MHMoE])
@pytest.mark.parametrize("activation", ["silu", "geglu", "reglu"])
@pytest.mark.parametrize(
    ("dtype", "fast"), [(torch.float64, "auto"), (torch.float32, "grouped_mm"), (torch.float32, "slices")]
)
@pytest.mark.parametrize("recompute", [False, True])
def test_fast_paths_with_biases_and_glu_forms_match_the_reference(cls, activation, dtype, fast, recompute):
    kwargs = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=8, activation=activation, expert_bias=True,
                  capacity_factor=0.75)  # fmt: skip
    if cls is MHMoE:
        kwargs.update(num_heads=2, d_model=16)
    reference, other = make_pair(cls, fast=fast, dtype=dtype, **kwargs)
    other.routed.recompute = recompute
    x = torch.randn(3, 5, kwargs["d_model"], dtype=dtype)
    assert_fast_matches_reference(reference, other, x, **TOLERANCES[dtype])


def test_expert_biases_get_gradients_with_no_rows_and_refuse_runners_and_triton():
    moe = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8, expert_bias=True)
    moe(torch.randn(0, 8)).y.sum().backward()
    assert torch.equal(moe.experts.b_in.grad, torch.zeros_like(moe.experts.b_in))

    def runner(*args):
        raise AssertionError("not reached")

    runner.num_experts = 4  # type: ignore[attr-defined]
    moe.expert_runner = runner
    with pytest.raises(ValueError, match="runs the experts without their biases"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match="the triton backend has no expert biases"):
        MoEConfig(num_experts=4, top_k=2, expert_hidden=8, expert_bias=True, dispatch="triton")


def test_bias_free_experts_keep_their_parameters_and_numbers():
    """expert_bias=False adds no parameter and draws the same initial weights as before the option existed."""
    torch.manual_seed(3)
    plain = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
    assert sorted(n for n, _ in plain.named_parameters()) == ["experts.w_in", "experts.w_out", "router.weight"]
    torch.manual_seed(3)
    biased = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8, expert_bias=True)
    assert torch.equal(plain.experts.w_in, biased.experts.w_in) and torch.equal(
        plain.router.weight, biased.router.weight
    )


# ------------------------------------------------------------------------ Qwen2-MoE's gated shared expert


def test_sigmoid_gated_shared_expert_equals_its_formula():
    """Qwen2-MoE: y = Σ_k g_k E_k(x) + sigmoid(x · w_gate) · shared(x)."""
    torch.manual_seed(0)
    kwargs = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=6, activation="swiglu", num_shared_experts=1)
    gated = SparseMoE(**kwargs, shared_expert_gate=True, shared_expert_hidden=10).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    r = gated.router(x)
    shared = gated.shared_experts
    gate_up = shared.fc_in(x)
    shared_y = shared.fc_out(F.silu(gate_up[:, :10]) * gate_up[:, 10:])
    expected = (
        moe_by_formula(gated, x, r.top_experts, r.gates)
        + torch.sigmoid(x @ gated.shared_expert_gate.weight.t()) * shared_y
    )
    torch.testing.assert_close(gated(x).y, expected, **F64)
    with pytest.raises(ValueError, match="shared_expert_gate=True given but num_shared_experts is 0"):
        MoEConfig(num_experts=4, top_k=2, expert_hidden=8, shared_expert_gate=True)


# ------------------------------------------------------------------------ DeepSeek-V3 routing


def deepseek_v3_routing(x_Sd, weight_Ed, bias_E, top_k, n_group, topk_group, scale, normalize):
    """DeepSeek-V3 Eqs. 12–16 with group-limited routing, one token at a time."""
    tops, gates = [], []
    E = weight_Ed.shape[0]
    size = E // n_group
    for x_d in x_Sd:
        s = torch.sigmoid(weight_Ed @ x_d)
        biased = (s + bias_E).detach()
        group_scores = [
            float(biased[g * size : (g + 1) * size].sort(descending=True).values[:2].sum()) for g in range(n_group)
        ]
        kept = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group]
        allowed = [e for e in range(E) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: -float(biased[e]))[:top_k]
        g = s[chosen]
        g = g / g.sum() if normalize else g
        tops.append(chosen)
        gates.append(g * scale)
    return torch.tensor(tops), torch.stack(gates)


@pytest.mark.parametrize(("n_group", "topk_group"), [(1, 1), (4, 2), (4, 1), (8, 3)])
def test_group_limited_sigmoid_routing_equals_deepseek_v3(n_group, topk_group):
    torch.manual_seed(0)
    router = RouterConfig(kind="sigmoid", num_groups=n_group, top_groups=topk_group, scale=2.5)
    moe = SparseMoE(d_model=8, num_experts=16, top_k=2, expert_hidden=4, router=router).double()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(20, 8, dtype=torch.float64)
    r = moe.router(x)
    top, gates = deepseek_v3_routing(
        x, moe.router.weight, moe.router.expert_bias.double(), 2, n_group, topk_group, 2.5, True
    )
    assert torch.equal(r.top_experts.sort(-1).values, top.sort(-1).values)
    torch.testing.assert_close(r.gates.gather(-1, r.top_experts.argsort(-1)), gates.gather(-1, top.argsort(-1)), **F64)
    if topk_group < n_group:  # every token stays inside topk_group groups
        groups = r.top_experts // (16 // n_group)
        assert all(len(set(row.tolist())) <= topk_group for row in groups)


def test_group_options_are_checked():
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible by num_groups \(4\)"):
        MoEConfig.from_kwargs(
            num_experts=6, top_k=2, expert_hidden=4, router="sigmoid", router_kwargs={"num_groups": 4}
        )
    with pytest.raises(ValueError, match="top_groups=1 groups of 2 experts hold fewer than top_k=3"):
        MoEConfig.from_kwargs(num_experts=8, top_k=3, expert_hidden=4, router="sigmoid",
                              router_kwargs={"num_groups": 4, "top_groups": 1})  # fmt: skip
    with pytest.raises(ValueError, match="router option num_groups=2 does not apply to the softmax router"):
        MoEConfig.from_kwargs(num_experts=8, top_k=2, expert_hidden=4, router_kwargs={"num_groups": 2})
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=4, router_kwargs={"scale": 0.0})


# ------------------------------------------------------------------------ balance losses


def test_all_choices_balance_loss_equals_the_mixtral_formula():
    """transformers' load_balancing_loss_func: E · Σ_e (1/T Σ_t Σ_k 1[e_tk = e]) · (1/T Σ_t p_te) — 2.03 where
    the first-choice loss gives 1.03 on the same routing (the issue's example shape: E = 8, top-2)."""
    torch.manual_seed(0)
    logits = torch.randn(64, 8, dtype=torch.float64) * 0.3
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices
    counts = torch.zeros(8, dtype=torch.float64).index_add_(0, top.reshape(-1), torch.ones(128, dtype=torch.float64))
    expected = 8 * ((counts / 64) * probs.mean(0)).sum()
    torch.testing.assert_close(balance_loss(probs, top), expected, **F64)
    first = balance_loss(probs, top[:, 0])
    assert 1.0 < first < 1.2 and 2.0 < balance_loss(probs, top) < 2.2  # ≈ K times the first-choice loss


def test_sequence_balance_loss_equals_deepseek_v3_and_switch_formulas():
    """DeepSeek-V3 Eqs. 17–20 per sequence (f_i = E/(K·T) Σ_t 1[i ∈ topk_t], P_i = mean_t s'_{i,t}), averaged
    over sequences, equals all_choices per sequence divided by K; Switch's per-sequence loss (first choice)."""
    torch.manual_seed(0)
    B, T, E, K = 3, 10, 8, 2
    probs = torch.rand(B, T, E, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    top = probs.topk(K, dim=-1).indices
    per_sequence = []
    for b in range(B):
        f = torch.zeros(E, dtype=torch.float64)
        for t in range(T):
            for e in top[b, t].tolist():
                f[e] += E / (K * T)
        per_sequence.append((f * probs[b].mean(0)).sum())
    deepseek = torch.stack(per_sequence).mean()
    ours = balance_loss(probs.view(-1, E), top.view(-1, K), group_size=T)
    torch.testing.assert_close(ours / K, deepseek, **F64)
    switch = torch.stack(
        [E * (torch.bincount(top[b, :, 0], minlength=E).double() / T * probs[b].mean(0)).sum() for b in range(B)]
    ).mean()
    torch.testing.assert_close(balance_loss(probs.view(-1, E), top[..., 0].reshape(-1), group_size=T), switch, **F64)
    # padding: a sequence with no valid item counts in no mean; valid items of the others as in their own call
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1] = False
    valid[2, 7:] = False
    masked = balance_loss(probs.view(-1, E), top.view(-1, K), valid.view(-1), group_size=T)
    alone = [balance_loss(probs[b][valid[b]], top[b][valid[b]]) for b in (0, 2)]
    torch.testing.assert_close(masked, torch.stack(alone).mean(), **F64)


def test_sequence_scope_in_the_layers():
    """SparseMoE and MHMoE with token_group="sequence": one sequence at a time gives the same loss as the batch."""
    torch.manual_seed(0)
    for cls, extra in ((SparseMoE, {}), (MHMoE, {"num_heads": 2})):
        layer = cls(d_model=8, num_experts=4, top_k=2, expert_hidden=8, token_group="sequence",
                    balance_loss="all_choices", capacity_factor=0.5, **extra).double()  # fmt: skip
        x = torch.randn(3, 6, 8, dtype=torch.float64)
        whole = layer(x)
        parts = [layer(x[b : b + 1]) for b in range(3)]
        torch.testing.assert_close(whole.y, torch.cat([p.y for p in parts]), **F64)
        torch.testing.assert_close(whole.aux_loss, torch.stack([p.aux_loss for p in parts]).mean(), **F64)
        assert whole.stats.dropped_fraction > 0


# ------------------------------------------------------------------------ capacity rules


@pytest.mark.parametrize("group_size", [None, 1, 4, 5])
def test_grouped_capacity_matches_the_loop(group_size):
    torch.manual_seed(0)
    top = torch.randint(0, 3, (20, 2))
    valid = torch.rand(20) > 0.2
    for capacity in (1, 2, 5):
        expected = capacity_keep_reference(top, capacity, 3, valid, group_size)
        assert torch.equal(capacity_keep(top, capacity, 3, valid, group_size), expected)


def test_capacity_rules():
    """fairseq's K·ceil(c·S/E) and eval fraction ceil(f·S); Switch's fixed capacity."""
    base = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
    total = SparseMoE(**base, capacity_factor=1.0)
    per_choice = SparseMoE(**base, capacity_factor=1.0, capacity_rounding="per_choice", eval_capacity_fraction=0.25)
    fixed = SparseMoE(**base, expert_capacity=3)
    S = 10  # ceil(2·10/4) = 5, 2·ceil(10/4) = 6
    assert (total.capacity(S), per_choice.capacity(S), fixed.capacity(S)) == (5, 6, 3)
    per_choice.eval()
    assert per_choice.capacity(S) == math.ceil(0.25 * S) == 3
    total.eval()
    assert total.capacity(S) == 5  # no eval fraction: the training capacity
    with pytest.raises(ValueError, match="expert_capacity=3 and capacity_factor=1.0 both given"):
        MoEConfig(num_experts=4, top_k=2, expert_hidden=8, expert_capacity=3, capacity_factor=1.0)
    with pytest.raises(ValueError, match="eval_capacity_fraction=0.25 replaces a capacity in eval mode"):
        MoEConfig(num_experts=4, top_k=2, expert_hidden=8, eval_capacity_fraction=0.25)
    with pytest.raises(ValueError, match="capacity_rounding='per_choice' rounds a capacity_factor; none is given"):
        MoEConfig(num_experts=4, top_k=2, expert_hidden=8, capacity_rounding="per_choice")
    with pytest.raises(ValueError, match="unknown token_group 'batch'"):
        MoEConfig(num_experts=4, top_k=2, expert_hidden=8, token_group="batch")


def test_route_padding_routes_masked_items_like_the_authors_code():
    torch.manual_seed(0)
    layer = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8, route_padding=True, capacity_factor=1.0)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    masked, unmasked = forward_backward(layer, x, mask), forward_backward(layer, x)
    assert torch.equal(masked.out.y, unmasked.out.y) and torch.equal(masked.out.aux_loss, unmasked.out.aux_loss)
    assert masked.out.stats.tokens_per_expert.sum() == 2 * 10


def test_expert_parallelism_refuses_expert_biases_before_touching_the_mesh():
    from mhmoe.parallel.expert import shard_experts

    model = torch.nn.Sequential(SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8, expert_bias=True))
    with pytest.raises(ValueError, match=r"expert parallelism does not support expert biases yet"):
        shard_experts(model, None)  # type: ignore[arg-type]
