"""transformers' MoE models with their MoE blocks swapped for this library's layers (`mhmoe.convert.peers`) compute
what the originals compute: tiny random configurations of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and
Switch Transformers, float64, weights copied, forward and backward, logits and losses.

transformers computes its routers in float32 even in a float64 model (Mixtral `router_logits.float()`, Qwen and
OLMoE `softmax(dtype=torch.float)`, DeepSeek-V3 casts the router input), so those comparisons allow float32 rounding
of the gates (ROUTED, derived from float32's epsilon: the gates' rounding moves the outputs by a few eps and the
logits sum it over the 2 blocks and the 97-token vocabulary; float32 bits differ between CPUs, tests/conftest.py).
Switch Transformers' routers take a `router_dtype`: set to float64 here, its comparisons are exact (EXACT). The
variants themselves are checked to 1e-12 against their formulas in tests/test_variants.py. Then MoE -> MH-MoE (`mhmoe.convert.heads`) and the saved-folder round trip.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")  # the fused-experts layout of transformers 5

from conftest import float32_tolerance  # noqa: E402
from transformers import (  # noqa: E402
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from mhmoe import MHMoE, SparseMoE  # noqa: E402
from mhmoe.cli import main  # noqa: E402
from mhmoe.convert import (  # noqa: E402
    MoEFFN,
    PeerBlock,
    calibrate,
    capture_ffn_io,
    find_dense_ffns,
    find_moe_blocks,
    layer_from_block,
    load_moeified,
    moe_aux_loss,
    moe_outputs,
    moe_to_mhmoe,
    moeify_pretrained,
    read_moe_block,
    relative_error,
    swap_moe_blocks,
)

ROUTED = float32_tolerance(reduction=2 * 32 + 97)  # float32 gates inside transformers (module doc)
EXACT = dict(rtol=1e-12, atol=1e-12)


def tolerance(name: str) -> dict[str, float]:
    return EXACT if name == "switch" else ROUTED


COMMON = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=97, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip


def mixtral(layers=2, **kw):
    options = dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_hidden_layers=layers, **{**options, **kw}))


def qwen2(layers=2, **kw):
    config = Qwen2MoeConfig(**COMMON, num_hidden_layers=layers, intermediate_size=40, moe_intermediate_size=24,
                            shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, **kw)  # fmt: skip
    return Qwen2MoeForCausalLM(config)


def qwen3(layers=2, **kw):
    config = Qwen3MoeConfig(**COMMON, num_hidden_layers=layers, intermediate_size=40, moe_intermediate_size=24,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **kw)  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def olmoe(layers=2, **kw):
    return OlmoeForCausalLM(OlmoeConfig(**COMMON, num_hidden_layers=layers, intermediate_size=24, num_experts=4,
                                        num_experts_per_tok=2, **kw))  # fmt: skip


def deepseek_v3(layers=2, **kw):
    config = DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 2}, num_hidden_layers=layers, intermediate_size=40,
        moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5, **kw,
    )  # fmt: skip
    return DeepseekV3ForCausalLM(config)


def switch(**kw):
    options = dict(
        vocab_size=97, d_model=32, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=4,
        expert_capacity=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, router_jitter_noise=0.0,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**{**options, **kw}))


PEERS = {"mixtral": mixtral, "qwen2-moe": qwen2, "qwen3-moe": qwen3, "olmoe": olmoe, "deepseek-v3": deepseek_v3,
         "switch": switch}  # fmt: skip


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = PEERS[name](**kw).double().eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # grouped_mm has no float64
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):  # untrained: zeros; make the bias matter
            module.e_score_correction_bias.normal_(0, 0.05)
        if name == "switch" and hasattr(module, "classifier"):  # a router: in float64, as the model is
            module.dtype = torch.float64
    return model


def run(model, idx, **kwargs):
    if isinstance(model, SwitchTransformersForConditionalGeneration):
        kwargs["decoder_input_ids"] = idx
    return model(idx, labels=idx, **kwargs)


@pytest.mark.parametrize("name", list(PEERS))
def test_swapped_model_equals_the_original(name):
    original = build(name)
    swapped = copy.deepcopy(original)
    replaced = swap_moe_blocks(swapped)
    assert replaced == [n for n, _ in find_moe_blocks(original)] and find_moe_blocks(swapped) == []
    assert all(isinstance(swapped.get_submodule(n).moe, SparseMoE) for n in replaced)
    idx = torch.randint(1, 97, (2, 9))
    expected, actual = run(original, idx), run(swapped, idx)
    torch.testing.assert_close(actual.logits, expected.logits, **tolerance(name))
    torch.testing.assert_close(actual.loss, expected.loss, **tolerance(name))
    expected.loss.backward()
    actual.loss.backward()
    embeddings = [m.get_input_embeddings().weight.grad for m in (swapped, original)]
    torch.testing.assert_close(*embeddings, **tolerance(name))
    if name == "switch":  # the capacity is reached: tokens are dropped, per sequence
        assert any(out.stats.dropped_fraction > 0 for out in moe_outputs(swapped))


@contextlib.contextmanager
def gradients_as_weights(module: torch.nn.Module):
    """The module's parameters temporarily hold their gradients, so `read_moe_block` lays out the gradients."""
    saved = [(p, p.data) for p in module.parameters()]
    for p, _ in saved:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


@pytest.mark.parametrize("name", list(PEERS))
def test_swapped_block_equals_the_block_forward_and_backward(name):
    model = build(name)
    block_name, block = find_moe_blocks(model)[-1]
    exact = tolerance(name)
    layer = layer_from_block(block, model.config)
    x = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 9, 32, dtype=torch.float64)
    expected = block(x)
    (grad_x,) = torch.autograd.grad((expected * g).sum(), x, retain_graph=True)
    (expected * g).sum().backward()
    actual = layer(x)
    torch.testing.assert_close(actual.y, expected, **exact)
    (actual_grad_x,) = torch.autograd.grad((actual.y * g).sum(), x, retain_graph=True)
    torch.testing.assert_close(actual_grad_x, grad_x, **exact)
    (actual.y * g).sum().backward()
    with gradients_as_weights(block):
        peer = read_moe_block(block, model.config)
        assert peer is not None
        grads = PeerBlock(**{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in vars(peer).items()})
    torch.testing.assert_close(layer.experts.w_in.grad, grads.w_in, **exact)
    torch.testing.assert_close(layer.experts.w_out.grad, grads.w_out, **exact)
    torch.testing.assert_close(layer.router.weight.grad, grads.router_weight.to(torch.float64), **exact)
    if grads.shared_in is not None:
        torch.testing.assert_close(layer.shared_experts.fc_in.weight.grad, grads.shared_in.t(), **exact)
        torch.testing.assert_close(layer.shared_experts.fc_out.weight.grad, grads.shared_out.t(), **exact)
    if grads.shared_gate is not None:
        torch.testing.assert_close(layer.shared_expert_gate.weight.grad, grads.shared_gate, **exact)


def test_what_each_peer_maps_to():
    configs = {name: read_moe_block(find_moe_blocks(build(name))[-1][1], build(name).config).config for name in PEERS}
    assert configs["mixtral"].router.renormalize is True and configs["mixtral"].balance_loss == "all_choices"
    assert configs["qwen2-moe"].shared_expert_gate and configs["qwen2-moe"].shared_expert_hidden == 16
    assert configs["qwen2-moe"].router.renormalize is False and configs["qwen3-moe"].router.renormalize is True
    ds = configs["deepseek-v3"]
    assert (ds.router.kind, ds.router.num_groups, ds.router.top_groups, ds.router.scale) == ("sigmoid", 4, 2, 2.5)
    assert (ds.num_shared_experts, ds.balance_loss_coef, ds.token_group) == (1, 0.0, "sequence")
    sw = configs["switch"]
    assert (sw.router.kind, sw.expert_capacity, sw.token_group, sw.balance_loss) == (
        "switch",
        3,
        "sequence",
        "first_choice",
    )
    assert (sw.balance_loss_coef, sw.z_loss_coef) == (0.001, 0.001)


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe"])
def test_balance_loss_over_all_choices_equals_transformers(name):
    """One MoE layer (transformers pools all layers' statistics before its loss; here each layer has its own):
    the swapped model's lm loss + moe_aux_loss equals transformers' loss with output_router_logits."""
    original = build(name, layers=1)
    swapped = copy.deepcopy(original)
    swap_moe_blocks(swapped)
    idx = torch.randint(1, 97, (2, 9))
    expected = run(original, idx, output_router_logits=True)
    actual = run(swapped, idx)
    coef = original.config.router_aux_loss_coef
    torch.testing.assert_close(moe_aux_loss(swapped).double(), coef * expected.aux_loss.double(), **ROUTED)
    torch.testing.assert_close(actual.loss + moe_aux_loss(swapped), expected.loss, **ROUTED)
    assert (
        1.5 < float(expected.aux_loss.detach()) < 2.5
    )  # all K choices counted: about K, where first choices give about 1
    with pytest.raises(ValueError, match="record no router_logits: .* add mhmoe.convert.moe_aux_loss"):
        run(swapped, idx, output_router_logits=True)


def test_mixtral_top1_gate_is_p_over_p():
    original = build("mixtral", num_experts_per_tok=1)
    block = find_moe_blocks(original)[0][1]
    layer = layer_from_block(block, original.config)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert torch.equal(layer.router(x.view(-1, 32)).gates, torch.ones(10, 1, dtype=torch.float64))
    torch.testing.assert_close(layer(x).y, block(x), **ROUTED)


def test_switch_losses_per_sequence_equal_transformers():
    original = build("switch")
    swapped = copy.deepcopy(original)
    swap_moe_blocks(swapped)
    idx = torch.randint(2, 97, (3, 9))
    expected = run(original, idx, output_router_logits=True)
    run(swapped, idx)
    encoder, decoder = moe_outputs(swapped)
    for ours, aux, z in ((encoder, expected.encoder_aux_loss, expected.encoder_z_loss),
                         (decoder, expected.decoder_aux_loss, expected.decoder_z_loss)):  # fmt: skip
        # transformers computes these losses in float32 whatever the router's dtype
        torch.testing.assert_close(ours.stats.balance_loss, aux.to(torch.float64), **ROUTED)
        torch.testing.assert_close(ours.stats.z_loss, z.to(torch.float64), **ROUTED)


def test_dense_layers_and_shared_experts_stay_dense():
    """Qwen2-MoE with dense layers between MoE ones: moeify converts the dense MLPs only, never a shared expert;
    the swap converts the MoE blocks only."""
    model = build("qwen2-moe", layers=4, decoder_sparse_step=2)
    assert [n for n, _ in find_dense_ffns(model)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert swap_moe_blocks(model) == ["model.layers.1.mlp", "model.layers.3.mlp"]
    assert [n for n, _ in find_dense_ffns(model)] == ["model.layers.0.mlp", "model.layers.2.mlp"]


def test_blocks_that_cannot_map_are_refused():
    with pytest.raises(ValueError, match="router_bias=True"):
        swap_moe_blocks(build("switch", router_bias=True))
    with pytest.raises(ValueError, match="activation GELUTanh has no exact counterpart"):
        swap_moe_blocks(build("mixtral", hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="no MoE block found in Sequential"):
        swap_moe_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.warns(UserWarning, match=r"inner dropout \(p=0.1\) is not converted"):
        swap_moe_blocks(build("switch", dropout_rate=0.1))


# ------------------------------------------------------------------------ MoE -> MH-MoE


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "deepseek-v3", "switch"])
def test_one_head_mhmoe_from_a_moe_model_is_exact(name):
    original = build(name)
    converted = copy.deepcopy(original)
    replaced = moe_to_mhmoe(converted, num_heads=1)
    assert all(isinstance(converted.get_submodule(n).moe, MHMoE) for n in replaced)
    idx = torch.randint(1, 97, (2, 9))
    torch.testing.assert_close(run(converted, idx).logits, run(original, idx).logits, **tolerance(name))


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "deepseek-v3"])
def test_mhmoe_from_a_moe_model_keeps_its_parameters_and_calibrates(name):
    original = build(name)
    blocks = [n for n, _ in find_moe_blocks(original)]
    batches = [torch.randint(1, 97, (4, 16)) for _ in range(2)]
    io = capture_ffn_io(original, batches, blocks)
    converted = copy.deepcopy(original)
    moe_to_mhmoe(converted, num_heads=2)
    layer = converted.get_submodule(blocks[-1]).moe
    smoe = layer_from_block(original.get_submodule(blocks[-1]), original.config)
    assert layer.num_experts == 2 * smoe.num_experts
    assert sum(p.numel() for p in layer.moe.experts.parameters()) == sum(p.numel() for p in smoe.experts.parameters())
    gap = relative_error(layer(io[blocks[-1]][0]).y, io[blocks[-1]][1])
    assert 0 < gap < 1.5
    report = calibrate(converted, io, steps=40, lr=3e-3)
    assert all(after < before for before, after in report.values())


def test_our_own_smoe_model_becomes_mhmoe():
    from mhmoe import MoEConfig
    from mhmoe.models.gpt import GPT, FFNConfig, GPTConfig

    ffn = FFNConfig(kind="smoe", moe_every=1, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
    model = GPT(GPTConfig(vocab_size=97, seq_len=32, d_model=32, n_layers=2, n_heads=2, ffn=ffn)).double().eval()
    idx = torch.randint(0, 97, (2, 10))
    before = model(idx)
    assert moe_to_mhmoe(model, num_heads=1) == ["blocks.0.ffn", "blocks.1.ffn"]
    assert all(isinstance(layer, MHMoE) for layer in model.moe_layers())
    torch.testing.assert_close(model(idx), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_experts must be 8"):
        moe_to_mhmoe(GPT(GPTConfig(vocab_size=97, seq_len=32, d_model=32, n_layers=2, n_heads=2, ffn=ffn)),
                     num_heads=2, num_experts=4)  # fmt: skip


# ------------------------------------------------------------------------ saved folders and the CLI


@pytest.mark.parametrize("kind", ["smoe", "mhmoe"])
def test_moeify_a_saved_moe_model_and_load_it_back(tmp_path, kind, capsys):
    original = build("qwen2-moe").float()
    original.save_pretrained(tmp_path / "hf")
    out = tmp_path / kind
    args = ["moeify", str(tmp_path / "hf"), str(out), "--kind", kind] + (["--heads", "2"] if kind == "mhmoe" else [])
    assert main(args) == 0, capsys.readouterr().err
    loaded = load_moeified(out)
    assert sum(isinstance(m, MoEFFN) for m in loaded.modules()) == 2
    idx = torch.randint(1, 97, (2, 9))
    if kind == "smoe":  # an exact swap
        torch.testing.assert_close(loaded(idx).logits, original.eval()(idx).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(loaded(idx).logits, load_moeified(out)(idx).logits)  # every weight is saved
    assert main(["moeify", str(tmp_path / "hf"), str(tmp_path / "bad"), "--every", "2"]) == 2
    assert "apply to dense models only" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_moeify_a_saved_switch_model(tmp_path):
    original = build("switch").float()
    original.save_pretrained(tmp_path / "hf")
    assert moeify_pretrained(tmp_path / "hf", tmp_path / "out") == [n for n, _ in find_moe_blocks(original)]
    idx = torch.randint(2, 97, (2, 9))
    loaded = load_moeified(tmp_path / "out")
    torch.testing.assert_close(run(loaded, idx).logits, run(original, idx).logits, rtol=1e-4, atol=1e-5)
