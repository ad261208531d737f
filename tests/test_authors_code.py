"""`MoEConfig.authors_code()` reproduces the MH-MoE authors' layer exactly.

`authors_forward` below is a small transcription of their forward (torchscale `MOELayer.forward` with
`mhmoe_heads_number > 1`, `TopkGate.forward` with `use_xmoe`, `topkgating`, `gshard_loss`, the Tutel dispatch
and their GLU `FeedForwardNetwork`), keeping their steps and their order: one-hot masks, cumsum locations,
capacity K·ceil(S/E) in training and ceil(0.25·S) in evaluation, padding routed, no renormalisation of the
gates. It runs in float64 throughout (their `_cosine` casts to float32; a precision choice, not a semantic one).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

from mhmoe import MHMoE, MoEConfig

F64 = TOLERANCES[torch.float64]


def their_expert(x, fc1_w, fc1_b, fc3_w, fc3_b, fc2_w, fc2_b, activation_fn):
    """FeedForwardNetwork.forward with fc3 (silu / relu build one): fc2(fc1(x) * act(fc3(x)))."""
    gate = activation_fn(F.linear(x, fc3_w, fc3_b))
    return F.linear(F.linear(x, fc1_w, fc1_b) * gate, fc2_w, fc2_b)


def authors_forward(layer: MHMoE, x_BLD, padding_mask, activation_fn, eval_fraction=0.25):
    """Their MOELayer.forward (Tutel path) on our layer's parameters; returns (output, l_aux)."""
    H, moe = layer.num_heads, layer.moe
    top_k, experts = moe.top_k, moe.experts
    d_model = x_BLD.shape[2]
    reshaped_input = x_BLD.reshape(-1, d_model)
    _ = padding_mask.reshape(-1, 1).repeat(1, H).reshape(-1)  # built, then never used by the gate
    reshaped_input = layer.multi_head_layer(reshaped_input)  # self.multi_heads
    N, dim = reshaped_input.shape
    reshaped_input = reshaped_input.reshape(N, H, dim // H).reshape(N * H, dim // H)

    # TopkGate.forward, use_xmoe: project to 16, rescale wg to norm 1.5 (every call), cosine with wg only
    inp = reshaped_input @ moe.router.projection.weight.t()
    wg = moe.router.expert_embeddings
    with torch.no_grad():
        wg.mul_(1.5 / wg.norm(p=2.0, dim=1, keepdim=True))
    logits = inp.matmul(F.normalize(wg, p=2.0, dim=1, eps=1e-4).transpose(0, 1))

    # topkgating
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    topk_indices = torch.topk(gates, top_k, dim=1).indices
    indices_s = [x.view(-1) for x in topk_indices.chunk(top_k, dim=1)]
    masks_se = [F.one_hot(x, num_experts).to(x.dtype) for x in indices_s]
    gates_s = [(gates * m).sum(dim=1) for m in masks_se]
    me = gates.sum(dim=0)  # gshard_loss
    ce = (F.one_hot(topk_indices[:, 0], num_experts).to(gates.dtype) * num_experts / num_tokens).sum(dim=0)
    l_aux = (me * ce).sum() / num_tokens
    locations1 = torch.cumsum(masks_se[0], dim=0) - 1
    locations_s = [(locations1 * masks_se[0]).sum(dim=1)]
    acc_base = None
    for k in range(1, top_k):
        step = masks_se[k - 1].sum(dim=0, keepdim=True)
        acc_base = step if acc_base is None else acc_base + step
        locations2 = torch.cumsum(masks_se[k], dim=0) - 1 + acc_base
        locations_s.append((locations2 * masks_se[k]).sum(dim=1))
    if eval_fraction > 0.0 and not layer.training:
        capacity = math.ceil(eval_fraction * num_tokens)
    else:
        capacity = top_k * math.ceil(num_tokens / num_experts)

    # Tutel fast_dispatcher: encode into (E, C) slots, experts, decode with the gates; slots past C dropped
    F_ = experts.hidden
    combined = torch.zeros_like(reshaped_input)
    for k in range(top_k):
        for s in range(num_tokens):
            if locations_s[k][s] >= capacity:
                continue
            e = int(indices_s[k][s])
            w_in, w_out = experts.w_in[e], experts.w_out[e]  # ours: w_in = [fc3 (gate) | fc1 (up)]
            b_in = experts.b_in[e] if experts.b_in is not None else torch.zeros(2 * F_, dtype=x_BLD.dtype)
            b_out = experts.b_out[e] if experts.b_out is not None else None
            out = their_expert(
                reshaped_input[s], w_in[:, F_:].t(), b_in[F_:], w_in[:, :F_].t(), b_in[:F_], w_out.t(), b_out,
                activation_fn,
            )  # fmt: skip
            combined = combined.index_add(0, torch.tensor([s]), (gates_s[k][s] * out).unsqueeze(0))
    combined = combined.reshape(N, H, dim // H).reshape(N, dim)
    combined = layer.merge_layer(combined)  # self.out_proj
    return combined.reshape(x_BLD.shape), l_aux


def gradients(layer, loss, x):
    params = [x, *layer.parameters()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize(("activation_fn", "bias"), [("silu", False), ("relu", True)])
def test_authors_code_preset_equals_a_transcription_of_their_forward(activation_fn, bias):
    torch.manual_seed(0)
    config = MoEConfig.authors_code(num_experts=8, top_k=2, expert_hidden=6, num_heads=4,
                                    activation_fn=activation_fn, bias=bias)  # fmt: skip
    assert config.activation == {"silu": "swiglu", "relu": "reglu"}[activation_fn]
    layer = MHMoE(config, d_model=16).double()
    act = {"silu": F.silu, "relu": F.relu}[activation_fn]
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[2, 4:] = True  # their mask: True = padding; ours: True = a real token
    g = torch.randn(3, 7, 16, dtype=torch.float64)
    for training in (True, False):
        layer.train(training)
        ours = layer(x, token_mask=~padding)
        theirs, l_aux = authors_forward(layer, x, padding, act)
        torch.testing.assert_close(ours.y, theirs, **F64)
        torch.testing.assert_close(ours.stats.balance_loss, l_aux, **F64)
        torch.testing.assert_close(ours.aux_loss, 0.01 * l_aux, **F64)
        if training:  # K·ceil(S/E) = 2·ceil(84/8) = 22 per expert (ceil(K·S/E) would be 21)
            grads = gradients(layer, (ours.y * g).sum() + ours.aux_loss, x)
            grads_ref = gradients(layer, (theirs * g).sum() + 0.01 * l_aux, x)
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, **F64)
        else:  # ceil(0.25·84) = 21 per expert in evaluation: more overflow
            assert ours.stats.dropped_fraction > 0


def test_authors_code_preset_options():
    one_head = MoEConfig.authors_code(num_experts=8, top_k=2, expert_hidden=64, num_heads=1, use_xmoe=False)
    assert (one_head.multi_head_layers, one_head.merge_layers, one_head.router.kind) == (0, 0, "softmax")
    assert one_head.router.renormalize is False
    gelu = MoEConfig.authors_code(num_experts=8, top_k=2, expert_hidden=64, num_heads=4, activation_fn="gelu")
    assert gelu.activation == "gelu" and gelu.router.dim == 16 and gelu.subtoken().router.dim == 16
    with pytest.raises(ValueError, match="unknown activation_fn 'tanh'"):
        MoEConfig.authors_code(num_experts=8, top_k=2, expert_hidden=64, num_heads=4, activation_fn="tanh")
