"""MoE-ifying existing models: upcycled SMoE equals the dense model at init; MH-MoE converts and trains."""

import copy
import pickle

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mhmoe.cli import main  # noqa: E402
from mhmoe.convert import (  # noqa: E402
    ExpertExtras,
    MoEFFN,
    calibrate,
    capture_ffn_io,
    find_dense_ffns,
    load_moeified,
    moe_aux_loss,
    moe_outputs,
    moeify,
    moeify_pretrained,
)
from mhmoe.layers.experts import DenseFFN  # noqa: E402
from mhmoe.layers.moe import SparseMoE  # noqa: E402
from mhmoe.layers.multihead import MHMoE  # noqa: E402
from mhmoe.models.gpt import GPT, FFNConfig, GPTConfig  # noqa: E402


def tiny_gpt2(**overrides) -> nn.Module:
    cfg = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides})).eval()


def tiny_llama(**overrides) -> nn.Module:
    cfg = dict(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=97, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_ours(activation: str = "swiglu") -> nn.Module:
    ffn = FFNConfig(kind="dense", hidden=48, activation=activation)
    return GPT(GPTConfig(vocab_size=97, seq_len=32, d_model=32, n_layers=2, n_heads=2, ffn=ffn)).eval()


MODELS = {
    "gpt2": tiny_gpt2,
    "gpt2-relu": lambda: tiny_gpt2(activation_function="relu"),
    "llama": tiny_llama,
    "llama-bias": lambda: tiny_llama(mlp_bias=True),
    "ours-swiglu": tiny_ours,
    "ours-gelu": lambda: tiny_ours("gelu"),
}


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(idx).logits


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_smoe_equals_the_dense_model(name, top_k):
    torch.manual_seed(0)
    dense = MODELS[name]().double()
    idx = torch.randint(0, 97, (2, 10))
    converted = copy.deepcopy(dense)
    replaced = moeify(converted, "smoe", num_experts=4, top_k=top_k)
    assert len(replaced) == 2 and all(isinstance(converted.get_submodule(n), MoEFFN) for n in replaced)
    torch.testing.assert_close(logits(converted, idx), logits(dense, idx), rtol=1e-12, atol=1e-12)
    # the routing is not trivial: several experts are used, and the gates are not all equal
    counts = sum(out.stats.tokens_per_expert for out in moe_outputs(converted))
    assert (counts > 0).sum() >= 2


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_upcycling_in_float32_and_mhmoe_with_one_head(name):
    torch.manual_seed(0)
    dense = MODELS[name]()
    idx = torch.randint(0, 97, (2, 10))
    for kind, kwargs in (("smoe", {}), ("mhmoe", {"num_heads": 1})):
        converted = copy.deepcopy(dense)
        moeify(converted, kind, num_experts=4, top_k=2, **kwargs)
        torch.testing.assert_close(logits(converted, idx), logits(dense, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "ours-swiglu"])
@pytest.mark.parametrize("kind", ["smoe", "mhmoe"])
def test_converted_models_train(name, kind):
    """Forward + backward through the host model; the aux loss reaches the routers."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    kwargs = {"num_heads": 2} if kind == "mhmoe" else {}
    replaced = moeify(model, kind, num_experts=4, top_k=2, every=2, **kwargs)
    assert len(replaced) == 1  # every=2: the second FFN only
    idx = torch.randint(0, 97, (2, 10))
    out = model(idx)
    aux = moe_aux_loss(model)
    torch.testing.assert_close(aux, sum(o.aux_loss for o in moe_outputs(model)))
    assert aux > 0
    (out.logits.square().mean() + aux).backward()
    layer = model.get_submodule(replaced[0]).moe
    router = layer.moe.router if isinstance(layer, MHMoE) else layer.router
    experts = layer.moe.experts if isinstance(layer, MHMoE) else layer.experts
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert experts.w_in.grad.abs().sum() > 0


def test_mhmoe_upcycling_is_close_but_not_exact():
    torch.manual_seed(0)
    dense = tiny_llama().double()
    converted = copy.deepcopy(dense)
    moeify(converted, "mhmoe", num_experts=4, top_k=2, num_heads=2)
    layer = converted.get_submodule(find_dense_ffns(dense)[0][0]).moe
    assert torch.equal(layer.multi_head_layer.weight, torch.eye(32, dtype=torch.float64))
    idx = torch.randint(0, 97, (2, 10))
    gap = (logits(converted, idx) - logits(dense, idx)).norm() / logits(dense, idx).norm()
    assert 0 < gap < 0.5


def test_expert_extras_match_a_per_expert_loop():
    """The bias + custom-activation runner equals a slow loop over experts (outputs and all gradients)."""
    torch.manual_seed(0)
    moe = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=12, activation="gelu").double()
    act = nn.Tanh()
    moe.expert_runner = ExpertExtras(4, act, False, torch.randn(4, 12), torch.randn(4, 8)).double()
    x = torch.randn(5, 7, 8, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    r = moe.router(x_ref.reshape(-1, 8))
    w_in, w_out, b_in, b_out = moe.experts.w_in, moe.experts.w_out, moe.expert_runner.b_in, moe.expert_runner.b_out
    rows = []
    for s in range(35):
        row = sum(
            r.gates[s, k] * (act(x_ref.reshape(-1, 8)[s] @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e])
            for k, e in enumerate(r.top_experts[s].tolist())
        )
        rows.append(row)
    expected = torch.stack(rows).view(5, 7, 8)
    torch.testing.assert_close(out.y, expected, rtol=1e-12, atol=1e-12)
    params = [x, *moe.parameters()]
    grads = torch.autograd.grad(out.y.sin().sum(), params)
    moe.zero_grad()
    params_ref = [x_ref, *moe.parameters()]
    grads_ref = torch.autograd.grad(expected.sin().sum(), params_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_calibration_reduces_the_mhmoe_gap():
    torch.manual_seed(0)
    model = tiny_ours("gelu")
    batches = [torch.randint(0, 97, (4, 16)) for _ in range(2)]
    names = [n for n, _ in find_dense_ffns(model)]
    io = capture_ffn_io(model, batches, names)
    assert io[names[0]][0].shape == (128, 32)
    moeify(model, "mhmoe", num_experts=4, top_k=2, num_heads=2)
    report = calibrate(model, io, steps=60, lr=3e-3)
    for before, after in report.values():
        assert after < before


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no dense FFN found"):
        moeify(nn.Sequential(nn.Linear(4, 4)), "smoe")
    with pytest.raises(ValueError, match="switch"):
        moeify(tiny_gpt2(), "smoe", router="switch", top_k=1)
    with pytest.raises(ValueError, match="expert_hidden must equal"):
        moeify(tiny_gpt2(), "smoe", expert_hidden=16)
    with pytest.raises(ValueError, match="unknown MoE kind"):
        moeify(tiny_gpt2(), "dense")
    assert len(moeify(tiny_gpt2(), "smoe", expert_hidden=16, init="random")) == 2


def test_our_dense_ffn_is_found_and_replaced_in_place():
    model = tiny_ours("gelu")
    assert [n for n, m in find_dense_ffns(model)] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert all(isinstance(m, DenseFFN) for _, m in find_dense_ffns(model))
    moeify(model, "mhmoe", num_heads=4, num_experts=4, top_k=1)
    assert find_dense_ffns(model) == []


def test_moeify_a_saved_model_folder_and_load_it_back(tmp_path, capsys):
    torch.manual_seed(0)
    dense = tiny_gpt2()
    dense.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "gpt2-mhmoe"
    code = main(["moeify", str(tmp_path / "gpt2"), str(out), "--kind", "mhmoe", "--experts", "4", "--heads", "2"])
    assert code == 0, capsys.readouterr().err
    loaded = load_moeified(out)
    assert sum(isinstance(m, MoEFFN) for m in loaded.modules()) == 2
    idx = torch.randint(0, 97, (2, 10))
    assert torch.equal(logits(loaded, idx), logits(load_moeified(out), idx))  # every weight is saved (random router)
    assert not (out / "model.safetensors").exists()  # plain from_pretrained must not load it half-dense
    smoe = tmp_path / "gpt2-smoe"
    moeify_pretrained(tmp_path / "gpt2", smoe, "smoe", num_experts=4, top_k=2)
    torch.testing.assert_close(logits(load_moeified(smoe), idx), logits(dense, idx), rtol=1e-5, atol=1e-5)
    assert main(["moeify", str(tmp_path / "gpt2"), str(tmp_path / "bad"), "--top-k", "9"]) == 2
    assert "top_k" in capsys.readouterr().err and not (tmp_path / "bad").exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_moeify_refuses_pickle_weights(tmp_path):
    folder = tmp_path / "evil"
    tiny_gpt2().config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Exploit(tmp_path / "pwned")}, f)
    assert main(["moeify", str(folder), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json", "merges.txt"])
def test_moeify_refuses_tokenizer_files_that_link_out_of_the_folder(tmp_path, capsys, name):
    """The tokenizer files are copied into the output: a link to elsewhere would copy any readable file there."""
    folder = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(folder)
    secret = tmp_path / "secret"
    secret.write_text("not for the output")
    (folder / name).symlink_to(secret)
    assert main(["moeify", str(folder), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mhmoe: error: {folder / name} is a symbolic link to {secret}, outside {folder}; copy the real file there"
    )
    assert not (tmp_path / "out").exists()


def test_expert_extras_refuse_recompute():
    import torch.nn.functional as F

    from mhmoe.convert import ExpertExtras
    from mhmoe.layers.experts import Experts

    runner = ExpertExtras(2, F.gelu, False, None, None)
    experts = Experts(num_experts=2, d_model=8, hidden=8, activation="gelu")
    with pytest.raises(ValueError, match="recompute is not supported for converted experts"):
        runner(torch.randn(3, 8), torch.tensor([1, 2]), experts, "slices", True)
