"""The grouped_mm fast path never waits for the device: no op in its forward or backward reads a value
back to the host.

On CUDA a host sync comes from ops whose result the host must see: `.item()` / `bool(t)`
(`aten._local_scalar_dense`), `.tolist()` / `.numpy()` (which on the CPU read memory without
dispatching, so they are wrapped here), and ops with data-dependent output shapes (`nonzero`,
`masked_select`, `unique`, boolean-mask indexing). The layers run the same ops on every device, so
recording what they do on the CPU (a TorchDispatchMode; the CPU backward runs on the calling thread)
shows what they would do on a GPU. The slices backend (`.tolist()` of the counts) and the reference
loop (`nonzero`) do sync by design, which checks that the spy sees both kinds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import ffn_config, layer_kwargs
from torch.utils._python_dispatch import TorchDispatchMode

from mhmoe import MHMoE, SparseMoE

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_consecutive}


class SyncSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in SYNCING:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def spying():
    """A SyncSpy that also records Tensor.tolist / Tensor.numpy."""
    spy = SyncSpy()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def reading(self, *args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                spy.syncs.append(f"Tensor.{_name}")
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, reading)
        with spy:
            yield spy


def forward_backward_syncs(layer, x, token_mask=None) -> list[str]:
    x = x.clone().requires_grad_()
    with spying() as spy:
        out = layer(x, token_mask)
        ((out.y * torch.randn_like(out.y)).sum() + out.aux_loss).backward()
    return spy.syncs


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize(
    ("router", "router_kwargs", "capacity_factor"),
    [
        ("softmax", {}, None),
        ("softmax", {}, 1.0),
        ("xmoe", {"form": "code"}, None),
        ("sigmoid", {}, 0.5),
    ],
)
@pytest.mark.parametrize("cls", [SparseMoE, MHMoE])
def test_grouped_mm_path_has_no_host_sync(cls, router, router_kwargs, capacity_factor, recompute):
    kwargs = layer_kwargs(
        cls, router=router, router_kwargs=router_kwargs, capacity_factor=capacity_factor, z_loss_coef=1e-3
    )
    layer = cls(dispatch="grouped_mm", recompute=recompute, **kwargs)
    x = torch.randn(3, 5, 8)
    token_mask = torch.arange(5) < torch.tensor([5, 2, 4])[:, None]
    assert forward_backward_syncs(layer, x) == []
    assert forward_backward_syncs(layer, x, token_mask) == []


@pytest.mark.parametrize(("dispatch", "sync"), [("slices", "Tensor.tolist"), ("reference", "aten.nonzero.default")])
def test_the_spy_sees_syncs(dispatch, sync):
    layer = SparseMoE(dispatch=dispatch, **layer_kwargs(SparseMoE))
    assert sync in forward_backward_syncs(layer, torch.randn(4, 8))


@pytest.mark.parametrize("kind", ["smoe", "mhmoe"])
def test_language_model_step_has_no_host_sync(kind):
    """The whole GPT forward and backward (attention, MoE blocks, loss); logging the loss is the trainer's sync."""
    from mhmoe.models.gpt import GPT, GPTConfig

    ffn = ffn_config(kind, hidden=64, num_experts=4, expert_hidden=32, num_heads=2)
    model = GPT(GPTConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=2, ffn=ffn))
    idx = torch.randint(0, 50, (2, 17))
    with spying() as spy:
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
    assert spy.syncs == []
