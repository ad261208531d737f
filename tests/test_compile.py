"""torch.compile(fullgraph=True) traces the fast path, matches eager, and does not recompile when routing changes."""

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
