"""torch.compile(fullgraph=True) traces the fast path, matches eager, and does not recompile when routing changes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mhmoe import MHMoE


def test_compiled_mhmoe_matches_eager_without_recompiling():
    torch._dynamo.reset()
    layer = MHMoE(d_model=32, num_heads=4, num_experts=6, top_k=2, expert_hidden=32, capacity_factor=1.0)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for _ in range(3):  # new data each step: routing, expert counts and drops change
        x = torch.randn(2, 8, 32, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        out, ref = compiled(x), layer(x_eager)
        (out.y.square().sum() + out.aux_loss).backward()
        (ref.y.square().sum() + ref.aux_loss).backward()
        torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)
        torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.stats.tokens_per_expert, ref.stats.tokens_per_expert)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times: routing changes must not recompile"


def test_compiled_gpt_matches_eager_without_recompiling():
    """The whole model traces as one graph (aot_eager keeps this fast on 2 cores; the layer test above runs
    inductor), forward and backward match eager, and new batches with new routing reuse the graph."""
    from conftest import ffn_config

    from mhmoe.models.gpt import GPT, GPTConfig

    torch._dynamo.reset()
    ffn = ffn_config("mhmoe", hidden=64, num_experts=4, top_k=2, expert_hidden=32, num_heads=2, capacity_factor=1.0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, ffn=ffn))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(3):
        idx = torch.randint(0, 64, (2, 16))
        out = compiled(idx, idx)
        (out.loss + out.aux_loss).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(idx, idx)
        (ref.loss + ref.aux_loss).backward()
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)
        for grad, p in zip(grads, model.parameters()):
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
        model.zero_grad()
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times: routing changes must not recompile"


def test_compiled_moeified_mlp_matches_eager():
    """A converted GPT-2 MLP (biases and tanh-GELU through ExpertExtras) compiles as one graph."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from mhmoe.convert import moeify

    torch._dynamo.reset()
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    moeify(model, "smoe", num_experts=4, top_k=2)
    layer = model.transformer.h[0].mlp
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for _ in range(3):
        x = torch.randn(2, 8, 32)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_mhmoe_on_the_triton_kernels_matches_eager(triton_interpreter, recompute):
    """dispatch="triton" traces as one graph too: each kernel launch is an opaque custom op with a shape rule
    (run here by the interpreter); outputs and gradients match eager, new routing reuses the graph."""
    torch._dynamo.reset()
    layer = MHMoE(
        d_model=32, num_heads=2, num_experts=4, top_k=2, expert_hidden=32, dispatch="triton", recompute=recompute
    )
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for _ in range(2):
        x = torch.randn(2, 8, 32, requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        out, ref = compiled(x), layer(x_eager)
        grads = torch.autograd.grad(out.y.square().sum() + out.aux_loss, [x, *layer.parameters()])
        grads_eager = torch.autograd.grad(ref.y.square().sum() + ref.aux_loss, [x_eager, *layer.parameters()])
        torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, grads_eager):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times: routing changes must not recompile"
