"""The multi-head family: LatentMoE (arXiv 2601.18089) and Multi-Head LatentMoE (arXiv 2602.04870) as options of the
one `MoEConfig` (`latent_dim`, `per_head_experts`), in float64, forward and all gradients:

- each equals a slow per-token loop written from the papers' equations;
- Multi-Head LatentMoE equals a transcription of the authors' published layer (kerner-lab/Sparse-GPT-Pretraining,
  `src/model/modules/ffwd/mh_moe_hp_nrt.py` at commit 9e5fc473e8412543baae6967ff8019e86c44ea70 and its router
  `src/model/ops/mh_router/mh_router.py` at e475315be1fd811f0f5122984094657db55843b4), flex-attention "reversal
  trick" included, written here in plain torch for one rank;
- the degenerate points coincide exactly: Multi-Head LatentMoE with one head = LatentMoE (its router reading the
  latent item: router weight W_r·W_down); LatentMoE at full width with identity projections = SMoE; MH-MoE =
  Multi-Head LatentMoE whose heads share one router and one pool;
- the cost counter equals the built layers.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mhmoe import MHMoE, MoEConfig, SparseMoE
from mhmoe.layers.losses import balance_loss
from mhmoe.layers.routers import HeadRouters
from mhmoe.models.cost import cost_of, mhmoe_cost, sparse_moe_cost

EXACT = dict(rtol=1e-12, atol=1e-12)
D, L, E, K, FF = 12, 8, 4, 2, 6


def params_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters()}


def forward_backward(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def softmax_top_k(logits_E: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v1 Eq. 5: the top-k of softmax(logits), renormalised: (experts, gates)."""
    probs = logits_E.softmax(-1)
    gates, experts = probs.topk(k)
    return experts, gates / gates.sum()


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ w_in) @ w_out


# ----------------------------------------------------------------- slow references, one token at a time


def latent_moe_reference(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """LatentMoE: y = W_up Σ_k g_k E_k(W_down x) + shared(x), the router reading the full-width x."""
    out = []
    for x_D in x.reshape(-1, layer.d_model):
        experts, gates = softmax_top_k(layer.router.weight @ x_D, layer.top_k)
        h_L = layer.latent_down.weight @ x_D
        o_L = sum(g * expert_ffn(h_L, layer.experts.w_in[e], layer.experts.w_out[e]) for e, g in zip(experts, gates))
        y_D = layer.latent_up.weight @ o_L
        if layer.shared_experts is not None:
            y_D = y_D + layer.shared_experts(x_D)
        out.append(y_D)
    return torch.stack(out).view(x.shape)


def mh_latent_moe_reference(layer: MHMoE, x: torch.Tensor) -> torch.Tensor:
    """Multi-Head LatentMoE: h = W_mh x + b (D -> L), split into H heads of L/H; head j routes its sub-token by its
    own router among its own E experts; the heads' outputs concatenated and merged (L -> D)."""
    H, E_ = layer.num_heads, layer.num_experts
    routers = layer.moe.router.heads if layer.config.per_head_experts else [layer.moe.router] * H
    out = []
    for x_D in x.reshape(-1, layer.d_model):
        h_L = layer.multi_head_layer(x_D)
        heads = []
        for j, h_d in enumerate(h_L.chunk(H)):
            experts, gates = softmax_top_k(routers[j].weight @ h_d, layer.top_k)
            pool = j * E_ if layer.config.per_head_experts else 0
            w_in, w_out = layer.moe.experts.w_in, layer.moe.experts.w_out
            heads.append(sum(g * expert_ffn(h_d, w_in[pool + e], w_out[pool + e]) for e, g in zip(experts, gates)))
        out.append(layer.merge_layer(torch.cat(heads)))
    return torch.stack(out).view(x.shape)


def latent_moe(**changes) -> SparseMoE:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, latent_dim=L, **changes)
    return SparseMoE(config, d_model=D).double()


def mh_latent_moe(num_heads: int = 2, latent: int | None = L, **changes) -> MHMoE:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=num_heads, latent_dim=latent,
                       per_head_experts=True, **changes)  # fmt: skip
    return MHMoE(config, d_model=D).double()


def assert_same(fast, slow, x, g):
    """Two callables over the same module(s): equal outputs, input gradients and parameter gradients."""
    fast_module, fast_fn = fast
    slow_module, slow_fn = slow
    y, gx = forward_backward(fast_fn, x, g)
    fast_grads = params_grads(fast_module)
    if slow_module is fast_module:
        fast_grads = {n: t.clone() for n, t in fast_grads.items()}
        fast_module.zero_grad()
    y_ref, gx_ref = forward_backward(slow_fn, x, g)
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(gx, gx_ref, **EXACT)
    return fast_grads, params_grads(slow_module)


@pytest.mark.parametrize("dispatch", ["auto", "reference"])
@pytest.mark.parametrize("shared", [0, 1])
def test_latent_moe_equals_its_per_token_loop(dispatch, shared):
    layer = latent_moe(dispatch=dispatch, num_shared_experts=shared)
    x, g = torch.randn(3, 5, D, dtype=torch.float64), torch.randn(3, 5, D, dtype=torch.float64)
    grads, ref_grads = assert_same(
        (layer, lambda t: layer(t).y), (layer, lambda t: latent_moe_reference(layer, t)), x, g
    )
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **EXACT, msg=name)
    assert layer.experts.w_in.shape == (E, L, FF) and layer.latent_down.weight.shape == (L, D)


@pytest.mark.parametrize("dispatch", ["auto", "reference"])
@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_multi_head_latent_moe_equals_its_per_token_loop(dispatch, num_heads):
    layer = mh_latent_moe(num_heads=num_heads, dispatch=dispatch)
    assert isinstance(layer.moe.router, HeadRouters) and layer.moe.num_experts == num_heads * E
    x, g = torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 7, D, dtype=torch.float64)
    grads, ref_grads = assert_same(
        (layer, lambda t: layer(t).y), (layer, lambda t: mh_latent_moe_reference(layer, t)), x, g
    )
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **EXACT, msg=name)


def test_per_head_balance_loss_is_the_mean_of_the_heads_own():
    layer = mh_latent_moe(num_heads=4)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    captured = []
    handle = layer.moe.router.register_forward_hook(lambda m, a, out: captured.append(out))
    out = layer(x)
    handle.remove()
    r = captured[0]
    per_head = [
        balance_loss(r.balance_probs[j::4], r.top_experts[j::4, 0] - j * E) for j in range(4)
    ]  # rows i·H + j belong to head j; its experts j·E … (j+1)·E − 1
    torch.testing.assert_close(out.stats.balance_loss, torch.stack(per_head).mean(), **EXACT)
    assert r.balance_probs.shape == (15 * 4, E) and int(r.top_experts.max()) < 4 * E
    # each head's choices lie in its own pool
    assert all(((r.top_experts[j::4] // E) == j).all() for j in range(4))


def test_per_head_balance_loss_per_sequence():
    layer = mh_latent_moe(num_heads=2, token_group="sequence")
    x = torch.randn(3, 5, D, dtype=torch.float64)
    losses = []
    for b in range(3):  # each sequence alone: the per-sequence loss is the mean over sequences
        losses.append(layer(x[b : b + 1]).stats.balance_loss)
    torch.testing.assert_close(layer(x).stats.balance_loss, torch.stack(losses).mean(), **EXACT)


# ----------------------------------------------------------------- the authors' layer, transcribed


def kerner_mh_moe_hp_nrt(x, fc_mh, fc_mg, router_HdE, k_ffwd, v_ffwd, num_expert_active, expert_size):
    """`MHMoEHPNRT.forward` of kerner-lab/Sparse-GPT-Pretraining (commit 9e5fc473, file header above) on one rank
    (world_size 1: the all-to-alls are identities), in plain torch and the input's dtype instead of bfloat16.
    Their experts are attention: the sub-token is the query, an expert's F hidden units are F key/value rows, the
    score is modified by log1p(gelu(s)) and the block mask keeps the keys of the assigned expert only; the
    "reversal trick" multiplies by exp(lse) and subtracts the expert's summed values, leaving Σ_f gelu(q·k_f) v_f."""
    batch_size, num_token, emb_size = x.shape
    num_head, head_size, num_expert = router_HdE.shape
    bath = batch_size * num_token
    # _stage_multi_head_handling: fc_mh, view as heads, (num_head, bath, head_size)
    h = F.linear(x, fc_mh).view(bath, num_head, head_size).transpose(0, 1)
    # mh_router: top-k of the clean logits x·R (no aux-free bias here), then softmax over the k chosen
    logits = torch.einsum("hbd,hde->hbe", h, router_HdE)
    top_logit, expert_assign = logits.topk(num_expert_active, dim=-1)
    router_values = top_logit.softmax(dim=2)  # (num_head, bath, K)
    # _stage_token_duplication: every sub-token once per chosen expert, (num_head, pool, head_size)
    q = h[:, :, None, :].expand(-1, -1, num_expert_active, -1).reshape(num_head, bath * num_expert_active, head_size)
    assign = expert_assign.reshape(num_head, bath * num_expert_active)
    # flex_attention with score_mod log1p(gelu(score)), scale 1, keys of the assigned expert only, return_lse
    scores = torch.log1p(F.gelu(torch.einsum("hpd,hnd->hpn", q, k_ffwd[0])))  # n = expert · expert_size + f
    key_expert = torch.arange(num_expert * expert_size) // expert_size
    scores = scores.masked_fill(key_expert[None, None, :] != assign[:, :, None], -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.einsum("hpn,hnd->hpd", scores.softmax(-1), v_ffwd[0])
    # _stage_reversal_trick: o · exp(lse) − Σ_f v_(assigned expert, f)
    offsets = v_ffwd[0].view(num_head, num_expert, expert_size, head_size).sum(dim=2)
    o = o * lse.exp()[..., None] - torch.gather(offsets, 1, assign[..., None].expand(-1, -1, head_size))
    # _stage_token_aggregation, _stage_multi_head_merging
    o = (o.view(num_head, bath, num_expert_active, head_size) * router_values[..., None]).sum(dim=2)
    return F.linear(o.transpose(0, 1).reshape(batch_size, num_token, num_head * head_size), fc_mg)


def test_multi_head_latent_moe_equals_the_authors_layer():
    H, head_size, F_ = 3, 4, 5
    torch.manual_seed(1)
    fc_mh = torch.randn(H * head_size, D, dtype=torch.float64) * 0.3
    fc_mg = torch.randn(D, H * head_size, dtype=torch.float64) * 0.3
    router = torch.randn(H, head_size, E, dtype=torch.float64)
    k_ffwd = torch.randn(1, H, E * F_, head_size, dtype=torch.float64) * 0.5
    v_ffwd = torch.randn(1, H, E * F_, head_size, dtype=torch.float64) * 0.5
    x = torch.randn(2, 6, D, dtype=torch.float64)
    expected = kerner_mh_moe_hp_nrt(x, fc_mh, fc_mg, router, k_ffwd, v_ffwd, K, F_)

    config = MoEConfig(num_experts=E, top_k=K, expert_hidden=F_, num_heads=H, latent_dim=H * head_size,
                       per_head_experts=True, activation="gelu", balance_loss_coef=0.0)  # fmt: skip
    layer = MHMoE(config, d_model=D).double()
    with torch.no_grad():
        layer.multi_head_layer.weight.copy_(fc_mh), layer.multi_head_layer.bias.zero_()
        layer.merge_layer.weight.copy_(fc_mg), layer.merge_layer.bias.zero_()
        for j, head_router in enumerate(layer.moe.router.heads):
            head_router.weight.copy_(router[j].t())
        keys = k_ffwd[0].view(H, E, F_, head_size)  # expert (j, e): rows e·F … (e+1)·F − 1 of head j
        values = v_ffwd[0].view(H, E, F_, head_size)
        layer.moe.experts.w_in.copy_(keys.transpose(-1, -2).reshape(H * E, head_size, F_))
        layer.moe.experts.w_out.copy_(values.reshape(H * E, F_, head_size))
    torch.testing.assert_close(layer(x).y, expected, **EXACT)


# ----------------------------------------------------------------- the degenerate points


def test_one_head_multi_head_latent_moe_is_latent_moe():
    """With one head the sub-token is the latent item W_down·x; LatentMoE's router reads x, so the two coincide when
    LatentMoE's router is the composition W_r·W_down (a linear router of the latent item is one of x)."""
    mh = mh_latent_moe(num_heads=1)
    lat = latent_moe()
    with torch.no_grad():
        mh.multi_head_layer.bias.zero_(), mh.merge_layer.bias.zero_()
        lat.latent_down.weight.copy_(mh.multi_head_layer.weight)
        lat.latent_up.weight.copy_(mh.merge_layer.weight)
        lat.router.weight.copy_(mh.moe.router.heads[0].weight @ mh.multi_head_layer.weight)
        lat.experts.w_in.copy_(mh.moe.experts.w_in), lat.experts.w_out.copy_(mh.moe.experts.w_out)
    x, g = torch.randn(3, 5, D, dtype=torch.float64), torch.randn(3, 5, D, dtype=torch.float64)
    grads, lat_grads = assert_same((mh, lambda t: mh(t).y), (lat, lambda t: lat(t).y), x, g)
    torch.testing.assert_close(grads["moe.experts.w_in"], lat_grads["experts.w_in"], **EXACT)
    torch.testing.assert_close(grads["moe.experts.w_out"], lat_grads["experts.w_out"], **EXACT)
    torch.testing.assert_close(grads["merge_layer.weight"], lat_grads["latent_up.weight"], **EXACT)
    torch.testing.assert_close(mh(x).aux_loss, lat(x).aux_loss, **EXACT)


def test_full_width_latent_moe_with_identity_projections_is_smoe():
    torch.manual_seed(0)
    smoe = SparseMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_shared_experts=1), d_model=D).double()
    lat = SparseMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_shared_experts=1, latent_dim=D),
                    d_model=D).double()  # fmt: skip
    state = smoe.state_dict()
    state.update({"latent_down.weight": torch.eye(D, dtype=torch.float64), "latent_up.weight": torch.eye(D).double()})
    lat.load_state_dict(state)
    x, g = torch.randn(4, 3, D, dtype=torch.float64), torch.randn(4, 3, D, dtype=torch.float64)
    grads, smoe_grads = assert_same((lat, lambda t: lat(t).y), (smoe, lambda t: smoe(t).y), x, g)
    for name, grad in smoe_grads.items():
        torch.testing.assert_close(grads[name], grad, **EXACT, msg=name)
    torch.testing.assert_close(lat(x).aux_loss, smoe(x).aux_loss, **EXACT)


def test_mhmoe_is_multi_head_latent_moe_with_one_shared_router_and_pool():
    """MH-MoE's heads share a router and a pool; a per-head layer whose every head holds a copy of them computes the
    same outputs, and the shared parameters' gradient is the sum of the copies' gradients."""
    H = 3
    torch.manual_seed(0)
    shared = MHMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=H), d_model=D).double()
    per_head = MHMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=H, per_head_experts=True),
                     d_model=D).double()  # fmt: skip
    with torch.no_grad():
        for name in ("multi_head_layer", "merge_layer"):
            getattr(per_head, name).load_state_dict(getattr(shared, name).state_dict())
        for head_router in per_head.moe.router.heads:
            head_router.weight.copy_(shared.moe.router.weight)
        per_head.moe.experts.w_in.copy_(shared.moe.experts.w_in.repeat(H, 1, 1))
        per_head.moe.experts.w_out.copy_(shared.moe.experts.w_out.repeat(H, 1, 1))
    x, g = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    grads, shared_grads = assert_same((per_head, lambda t: per_head(t).y), (shared, lambda t: shared(t).y), x, g)
    summed = sum(r.weight.grad for r in per_head.moe.router.heads)
    torch.testing.assert_close(summed, shared_grads["moe.router.weight"], **EXACT)
    torch.testing.assert_close(grads["moe.experts.w_in"].view(H, E, D // H, FF).sum(0), shared_grads["moe.experts.w_in"],
                               **EXACT)  # fmt: skip
    assert torch.equal(per_head(x).stats.top_experts % E, shared(x).stats.top_experts)


# ----------------------------------------------------------------- cost and errors


@pytest.mark.parametrize(
    "layer",
    [
        lambda: SparseMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, latent_dim=L, num_shared_experts=1),
                          d_model=D),
        lambda: MHMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=2, latent_dim=L), d_model=D),
        lambda: MHMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=4, latent_dim=L,
                                per_head_experts=True, multi_head_layers=2), d_model=D),
        lambda: MHMoE(MoEConfig(num_experts=E, top_k=1, expert_hidden=FF, num_heads=2, per_head_experts=True,
                                router=__import__("mhmoe").RouterConfig(kind="xmoe")), d_model=D),
    ],
    ids=["latent", "mh-latent-shared", "mh-latent-per-head", "per-head-xmoe"],
)  # fmt: skip
def test_counter_equals_the_built_family(layer):
    layer = layer()
    cost = cost_of(layer)
    assert cost.params_total == sum(p.numel() for p in layer.parameters())
    count = mhmoe_cost if isinstance(layer, MHMoE) else sparse_moe_cost
    assert count(layer.config, d_model=D) == cost


def test_counter_by_hand():
    lat = sparse_moe_cost(d_model=D, num_experts=E, top_k=K, expert_hidden=FF, latent_dim=L)
    expert = 2 * L * FF
    assert lat.params_total == E * D + E * expert + 2 * D * L
    assert lat.flops_per_token == 2 * (E * D + K * expert + 2 * D * L)
    H = 4
    mh = mhmoe_cost(d_model=D, num_experts=E, top_k=K, expert_hidden=FF, num_heads=H, latent_dim=L,
                    per_head_experts=True)  # fmt: skip
    d, sub_expert = L // H, 2 * (L // H) * FF
    projections = (D * L + L) + (L * D + D)
    assert mh.params_total == projections + H * (E * d + E * sub_expert)
    assert mh.params_active == projections + H * E * d + H * K * sub_expert  # every head's router, H·K experts
    assert mh.flops_per_token == 2 * (D * L + L * D) + H * 2 * (E * d + K * sub_expert)


def test_family_errors_are_one_line():
    with pytest.raises(ValueError, match=r"latent_dim \(10\) must be divisible by num_heads \(4\)"):
        MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=4, latent_dim=10)
    with pytest.raises(ValueError, match="latent_dim must be"):
        MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, latent_dim=0)
    with pytest.raises(ValueError, match="cannot be removed; set multi_head_layers and merge_layers >= 1"):
        MHMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=2, latent_dim=L, merge_layers=0), d_model=D)
    with pytest.raises(TypeError, match="per_head_experts must be True or False"):
        MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, per_head_experts=1)
    router = copy.deepcopy(mh_latent_moe().moe.router.heads[0])
    with pytest.raises(ValueError, match="per_head_experts builds a router per head"):
        MHMoE(d_model=D, num_heads=2, num_experts=E, top_k=K, expert_hidden=FF, per_head_experts=True, router=router)


# ----------------------------------------------------------------- the pipeline: train, analyze, export


@pytest.mark.parametrize(
    "options",
    [["model.ffn.kind=smoe", "model.ffn.moe.latent_dim=16"],
     ["model.ffn.kind=mhmoe", "model.ffn.moe.num_heads=4", "model.ffn.moe.latent_dim=24",
      "model.ffn.moe.per_head_experts=true"]],
    ids=["latent", "mh-latent"],
)  # fmt: skip
def test_family_members_train_analyze_and_export(tmp_path, monkeypatch, capsys, options):
    pytest.importorskip("transformers")
    from conftest import english_documents
    from transformers import AutoModelForCausalLM

    from mhmoe.analysis.runs import load_run
    from mhmoe.cli import main

    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus").mkdir()
    corpus = english_documents(tmp_path / "corpus", 12, 5_000)
    settings = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.final_eval_batches=1",
                "model.d_model=32", "model.ffn.moe.expert_hidden=16", "train.threads=1", *options]  # fmt: skip
    run = tmp_path / "run"
    args = ["train", "--preset", "cpu-tiny", "--no-progress", "--data", str(corpus), "--out", str(run)]
    assert main(args + [item for kv in settings for item in ("--set", kv)]) == 0, capsys.readouterr().err
    assert main(["analyze", str(run)]) == 0, capsys.readouterr().err
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    model = load_run(run, data=False).model.eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_per_head_sigmoid_routers_count_their_own_load():
    """The authors balance with an auxiliary-loss-free bias: with the sigmoid router each head keeps its own load and
    bias, and only the sub-tokens of its head count in them."""
    from mhmoe import SigmoidRouter

    layer = mh_latent_moe(num_heads=2, router=__import__("mhmoe").RouterConfig(kind="sigmoid", bias_update_rate=0.1))
    layer.train()(torch.randn(3, 5, D, dtype=torch.float64))
    routers = [m for m in layer.modules() if isinstance(m, SigmoidRouter)]
    assert routers == list(layer.moe.router.heads)
    assert [float(r.load.sum()) for r in routers] == [15 * K, 15 * K]  # 15 tokens, one sub-token per head, K each
    loads = [r.load.clone() for r in routers]
    assert not torch.equal(*loads)  # each head counted its own sub-tokens
    for r, load in zip(routers, loads):
        r.update_bias()
        torch.testing.assert_close(r.expert_bias, 0.1 * torch.sign(load.mean() - load).double(), **EXACT)


# ----------------------------------------------------------------- NemotronH: transformers' LatentMoE block


def nemotron_h(latent: int | None = 12):
    transformers = pytest.importorskip("transformers", minversion="5.0")
    config = transformers.NemotronHConfig(
        vocab_size=97, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        layers_block_type=["attention", "moe", "attention", "moe"], n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, moe_shared_expert_intermediate_size=16, moe_latent_size=latent, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(config).double().eval()
    model.set_experts_implementation("eager")  # grouped_mm has no float64
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):  # untrained: zeros; make the bias matter
            module.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("latent", [12, None])
def test_latent_moe_equals_nemotron_h_block_forward_and_backward(latent):
    """NemotronH's MoE block (`NemotronHMoE`: sigmoid router with group-limited routing and a routed scale on the
    full-width token, latent projections, squared-ReLU experts, a shared expert on the full-width token) read into a
    SparseMoE with latent_dim: outputs and every gradient equal. transformers computes this router in float32 in a
    float64 model (`hidden_states.type(torch.float32)`), so the gates carry float32 rounding (tests/test_peers.py)."""
    from conftest import float32_tolerance

    from mhmoe.convert import find_moe_blocks, layer_from_block

    model = nemotron_h(latent)
    _, block = find_moe_blocks(model)[-1]
    layer = layer_from_block(block, model.config)
    assert layer.config.latent_dim == latent and layer.config.activation == "relu2"
    assert layer.config.router.kind == "sigmoid" and layer.config.router.num_groups == 4
    tolerance = float32_tolerance(reduction=2 * 32)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    g = torch.randn(3, 9, 32, dtype=torch.float64)
    expected, grad_x = forward_backward(block, x, g)
    actual, actual_grad_x = forward_backward(lambda t: layer(t).y, x, g)
    torch.testing.assert_close(actual, expected, **tolerance)
    torch.testing.assert_close(actual_grad_x, grad_x, **tolerance)
    pairs = [(layer.experts.w_in, block.experts.up_proj, True), (layer.experts.w_out, block.experts.down_proj, True),
             (layer.shared_experts.fc_in.weight, block.shared_experts.up_proj.weight, False),
             (layer.router.weight, block.gate.weight, False)]  # fmt: skip
    if latent:
        pairs += [(layer.latent_down.weight, block.fc1_latent_proj.weight, False),
                  (layer.latent_up.weight, block.fc2_latent_proj.weight, False)]  # fmt: skip
    for ours, theirs, transposed in pairs:
        torch.testing.assert_close(ours.grad, theirs.grad.transpose(1, 2) if transposed else theirs.grad, **tolerance)


def test_swapped_nemotron_h_equals_the_original():
    from conftest import float32_tolerance

    from mhmoe.convert import swap_moe_blocks

    original = nemotron_h()
    swapped = copy.deepcopy(original)
    assert swap_moe_blocks(swapped) == ["model.layers.1.mixer", "model.layers.3.mixer"]
    idx = torch.randint(1, 97, (2, 9))
    expected, actual = original(idx, labels=idx), swapped(idx, labels=idx)
    torch.testing.assert_close(actual.logits, expected.logits, **float32_tolerance(reduction=2 * 32 + 97))
    with torch.no_grad():  # the swapped layers are the ones computing
        swapped.get_submodule("model.layers.3.mixer").moe.latent_up.weight.zero_()
    assert not torch.allclose(swapped(idx).logits, expected.logits)


# ----------------------------------------------------------------- head parallelism (gloo, 2 processes)


def _check_head_cases(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for name, case in result.items():
            bad = {k: v for k, v in case["diffs"].items() if v > 1e-12}
            assert not bad, f"{name}, rank {rank}: {bad}"
            assert case["repeatable"], f"{name}, rank {rank}: a rerun differs"


def test_head_parallel_equals_one_process(tmp_path):
    """Heads on 2 ranks (`mhmoe.parallel.parallelize` with make_layout(head=2)): outputs, input gradients, every
    gradient (replicated head and merge layers averaged by DDP or FSDP2, the sharded experts and the routers, each
    run on its head's rank, finished by finish_gradients) and the mean auxiliary loss equal one process on the global
    batch, float64; a second run of the same step is bitwise identical."""
    from distributed_workers import head_job, launch

    cases = [
        dict(name="softmax-4-heads", heads=4, router="softmax"),
        dict(name="sigmoid-2-heads-masked", heads=2, router="sigmoid", mask=True),
        dict(name="per-sequence-capacity", heads=4, router="softmax", token_group="sequence", capacity=1.0),
        dict(name="call-capacity-local-balance", heads=2, router="softmax", capacity=1.0, balance="local"),
        dict(name="xmoe-reference-dispatch-fsdp", heads=4, router="xmoe", dispatch="reference", data="fsdp"),
    ]
    results = launch(head_job, 2, tmp_path, 240, cases)
    _check_head_cases(results)
    # each rank holds half of the experts (routers, head and merge layers replicated)
    for result in results:
        case = result["softmax-4-heads"]
        assert case["local_params"] == case["params"] - case["expert_params"] // 2


def test_head_parallel_with_replicas_on_four_processes(tmp_path):
    """Heads over 2 ranks, replicated twice (4 processes): the replicas' expert gradients are summed, the balance loss
    is over the global batch (reduced over the replicas), DDP or FSDP2 for the rest; heads over all 4 ranks; and head
    parallelism composed with expert parallelism, heads over 2 ranks and each head's experts over 2."""
    from distributed_workers import head_job, launch

    cases = [
        dict(name="head-2-ddp", heads=4, router="softmax", head=2),
        dict(name="head-2-fsdp-sigmoid-masked", heads=2, router="sigmoid", head=2, data="fsdp", mask=True),
        dict(name="head-4", heads=4, router="xmoe", head=4),
        dict(name="head-2-expert-2", heads=4, router="softmax", head=2, expert=2),
        dict(
            name="head-2-expert-2-fsdp-sigmoid-masked-capacity",
            heads=2,
            router="sigmoid",
            head=2,
            expert=2,
            data="fsdp",
            mask=True,
            token_group="sequence",
            capacity=1.0,
        ),
    ]
    results = launch(head_job, 4, tmp_path, 240, cases)
    _check_head_cases(results)
    for result in results:  # a quarter of the experts on each rank when heads and experts are split over 2 × 2
        for name, parts in (("head-2-ddp", 2), ("head-4", 4), ("head-2-expert-2", 4)):
            case = result[name]
            assert case["local_params"] == case["params"] - case["expert_params"] + case["expert_params"] // parts


def test_head_parallel_refuses_what_it_cannot_place():
    from mhmoe.parallel.head import check_head_layout

    shared = MHMoE(MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=2), d_model=D)
    with pytest.raises(ValueError, match="needs a router and a pool of experts per head"):
        check_head_layout(shared, 2)
    with pytest.raises(ValueError, match="needs MHMoE layers"):
        check_head_layout(latent_moe(), 2)
    with pytest.raises(ValueError, match=r"num_heads \(2\) must be divisible by the head-parallel size \(4\)"):
        check_head_layout(mh_latent_moe(num_heads=2), 4)
    with pytest.raises(ValueError, match="does not place shared experts"):
        check_head_layout(mh_latent_moe(num_heads=2, num_shared_experts=1), 2)
    assert check_head_layout(mh_latent_moe(num_heads=4), 2)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.head=2"], "parallel.head=2 needs MH-MoE layers with a router and a pool of experts per head; set "
         "model.ffn.kind=mhmoe and model.ffn.moe.per_head_experts=true, or parallel.head=1"),
        (["model.ffn.kind=smoe", "parallel.head=2"], "parallel.head=2 needs MH-MoE layers"),
        (["model.ffn.moe.per_head_experts=true", "parallel.head=4"],
         "model.ffn.moe.num_heads (2) must be divisible by parallel.head (4): each rank holds num_heads / "
         "parallel.head heads"),
        (["model.ffn.moe.per_head_experts=true", "parallel.head=2", "parallel.expert=2", "model.ffn.moe.dispatch=reference"],
         "parallel.head=2 with parallel.expert=2 needs the sorted dispatch; drop model.ffn.moe.dispatch=reference"),
        (["model.ffn.moe.per_head_experts=true", "parallel.head=2", "model.ffn.moe.num_shared_experts=1"],
         "parallel.head=2 does not place shared experts; set model.ffn.moe.num_shared_experts=0"),
        (["model.ffn.moe.per_head_experts=true", "parallel.head=2", "model.ffn.moe.expert_bias=true"],
         "parallel.head=2 does not shard expert biases yet; set model.ffn.moe.expert_bias=false"),
        (["parallel.head=0"], "parallel.head must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_head_parallel_settings_it_cannot_honour_are_one_line_errors(capsys, overrides, message):
    from mhmoe.cli import main

    assert main(["train", "--preset", "cpu-tiny", *[f"--set={item}" for item in overrides]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mhmoe: error: {message}") and "\n" not in err, err


def test_head_parallel_without_torchrun_or_on_a_world_it_does_not_divide(tmp_path, capsys, monkeypatch):
    """parallel.head=2 in a plain process is one line naming the torchrun command; on 2 processes, parallel.head=4
    (a world it does not divide), head with expert parallelism, or a model without per-head pools are one line each."""
    from distributed_workers import launch, layout_errors_job

    from mhmoe.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    sets = ["--set=model.ffn.moe.per_head_experts=true", "--set=parallel.head=2", "--set=train.max_steps=1"]
    assert main(["train", "--preset", "cpu-tiny", "--out", str(tmp_path / "run"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err == "mhmoe: error: parallel.head=2 needs 2 or more processes: torchrun --nproc-per-node 2 -m mhmoe train ..."
    )
    errors = launch(layout_errors_job, 2, tmp_path, 60)[0]
    assert errors == {
        "world": "parallel.head (4) must divide the number of processes (2); run torchrun --nproc-per-node with a "
        "multiple of 4",
        "with expert": "parallel.head × parallel.expert (2 × 2) must divide the number of processes (2)",
        "shared pool": "parallel.head=2: head parallelism needs a router and a pool of experts per head "
        "(per_head_experts=True): with one router and pool shared by the heads every rank would need every expert",
    }


def test_all_to_all_values_per_token():
    from mhmoe.models.cost import all_to_all_values_per_token as values

    H = 4
    per_head = MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, num_heads=H, latent_dim=L, per_head_experts=True)
    # head parallelism: the latent token's remote share, there and back; no K
    assert values(per_head, d_model=D, layer="mhmoe", parallel="head", size=2) == 2 * L / 2
    assert values(dataclasses.replace(per_head, top_k=1), d_model=D, layer="mhmoe", parallel="head", size=2) == L
    # expert parallelism: K rows per sub-token of width L/H, H sub-tokens: K times head parallelism's volume
    assert values(per_head, d_model=D, layer="mhmoe", parallel="expert", size=2) == K * L
    smoe = MoEConfig(num_experts=E, top_k=K, expert_hidden=FF)
    assert values(smoe, d_model=D, layer="smoe", parallel="expert", size=4) == 2 * K * D * 3 / 4
    latent = MoEConfig(num_experts=E, top_k=K, expert_hidden=FF, latent_dim=L)
    assert values(latent, d_model=D, layer="smoe", parallel="expert", size=2) == K * L
    with pytest.raises(ValueError, match="per_head_experts=True only"):
        values(smoe, d_model=D, layer="smoe", parallel="head", size=2)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by the head-parallel size \(3\)"):
        values(per_head, d_model=D, layer="mhmoe", parallel="head", size=3)
