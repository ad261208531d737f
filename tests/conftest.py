"""Shared helpers: build layer pairs with identical weights, run forward + backward, compare.

Shapes are tiny so the whole suite runs in a few minutes on 2 CPU cores. Widths used with the
grouped_mm backend are multiples of 16 bytes (4 float32 / 8 bfloat16 values), which that kernel needs.
"""

from __future__ import annotations

from mhmoe.train.threads import set_openmp_defaults

# Before torch loads (below), as the command line does: idle OpenMP threads sleep instead of spinning. On a busy
# machine spinning threads made a test 15x slower (tests/test_model.py's generation tests: 145 s, 9 s passive).
set_openmp_defaults()

import copy
import gzip
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from mhmoe import MHMoE, MoEOutput

# The offline data pack: beside the repository as ../shared/data (as in CI), or $MHMOE_SHARED_DATA. The default
# suite reads the small sample of it committed in tests/fixtures/pack-sample (pack_sample); tests that need the whole
# pack are marked `data_pack` and are skipped, with one line saying how to get it, when it is absent.
SHARED_DATA = Path(os.environ.get("MHMOE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
PACK_SAMPLE = Path(__file__).resolve().parent / "fixtures" / "pack-sample"
DATA_PACK_HINT = (
    "needs the full offline data pack: put it at ../shared/data or set MHMOE_SHARED_DATA "
    "(rebuild it with `mhmoe data prepare english|multilingual|multimodal --out DIR`)"
)


# float32 bits depend on the CPU: oneDNN, MKL and ATen pick kernels by instruction set (AVX2, AVX-512, ...), and each
# sums in its own order. A float32 result that sums n terms may move by about n·eps relative between two machines (the
# n·u bound on a sum's rounding, u = eps / 2, for each of the two results). Exactness is claimed in float64; a float32
# value, and above all a stored one, is compared within this tolerance, never with `==` (tests run a second time
# with the kernels capped below the machine's, .ci/run, to catch the next test that depends on one CPU's bits).
FLOAT32_EPS = torch.finfo(torch.float32).eps


def float32_tolerance(reduction: int) -> dict[str, float]:
    """rtol/atol for torch.testing.assert_close / pytest.approx on float32 results whose longest chain of sums adds
    about `reduction` terms (the widest dot product or softmax, summed over the layers it passes through)."""
    tol = reduction * FLOAT32_EPS
    return {"rtol": tol, "atol": tol}


def pack_sample(*parts: str) -> Path:
    """A file or folder of the committed sample of the pack (same layout as the pack)."""
    path = PACK_SAMPLE.joinpath(*parts)
    assert path.exists(), f"{path} missing: run tests/fixtures/make_pack_sample.py"
    return path


def english_documents(folder: Path, documents: int = 12, chars: int = 5_000) -> Path:
    """`documents` text files of `chars` characters each of the pack sample's English text in `folder`: a small
    corpus for training tests."""
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt", encoding="utf-8").read()[: documents * chars]
    for i in range(documents):
        (folder / f"doc{i:02d}.txt").write_text(text[i * chars : (i + 1) * chars])
    return folder


def data_pack(*parts: str) -> Path:
    """A file or folder of the full pack; only for tests marked `data_pack` (skipped without the pack)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(DATA_PACK_HINT)
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("data_pack") and not (SHARED_DATA / "MANIFEST.sha256").is_file():
        if os.environ.get("MHMOE_REQUIRE_DATA_PACK") == "1":  # .ci/run: the pack is beside the clone, so run them
            pytest.fail(f"MHMOE_REQUIRE_DATA_PACK=1 but no data pack at {SHARED_DATA}")
        pytest.skip(DATA_PACK_HINT)


# (router, top_k, router_kwargs): every router the library ships, each in a configuration it accepts.
ROUTER_CASES = [
    pytest.param("softmax", 2, {}, id="softmax"),
    pytest.param("switch", 1, {}, id="switch"),
    pytest.param("xmoe", 2, {"form": "paper"}, id="xmoe-paper"),
    pytest.param("xmoe", 2, {"form": "code"}, id="xmoe-code"),
    pytest.param("sigmoid", 2, {}, id="sigmoid"),
]
ACTIVATIONS = ["gelu", "relu", "swiglu"]
# --set overrides of a toy-sized language model, for end-to-end runs of the reproductions
TOY_MODEL = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.seq_len=32",
    "model.ffn.hidden=64",
    "model.ffn.moe.expert_hidden=64",
    "model.ffn.moe.num_experts=4",
]
TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The Triton kernels built for the CPU interpreter (TRITON_INTERPRET=1): kernels are built on first use, in
    the mode TRITON_INTERPRET says then, so the cache is cleared before and after the test."""
    pytest.importorskip("triton")
    from mhmoe.ops import triton_experts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_experts._kernels.cache_clear()
    yield
    triton_experts._kernels.cache_clear()


def layer_kwargs(cls: type[nn.Module], **overrides) -> dict:
    """Small default constructor arguments for SparseMoE (d_model 8) or MHMoE (d_model 8, H 2 -> d 4)."""
    kwargs: dict = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
    if cls is MHMoE:
        kwargs["num_heads"] = 2
    kwargs.update(overrides)
    return kwargs


def make_pair(
    cls: type[nn.Module], *, fast: str = "auto", dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs
) -> tuple[nn.Module, nn.Module]:
    """Two copies of one layer with identical weights and buffers: (dispatch="reference", dispatch=fast)."""
    torch.manual_seed(seed)
    reference = cls(dispatch="reference", **kwargs).to(dtype)
    other = cls(dispatch=fast, **kwargs).to(dtype)
    other.load_state_dict(reference.state_dict())
    return reference, other


def clone_layer(layer: nn.Module, **attrs) -> nn.Module:
    """A deep copy of `layer` with some attributes changed (e.g. dispatch, residual)."""
    twin = copy.deepcopy(layer)
    for name, value in attrs.items():
        setattr(twin, name, value)
    return twin


class Result(NamedTuple):
    out: MoEOutput
    x_grad: Tensor
    param_grads: dict[str, Tensor]


def forward_backward(layer: nn.Module, x: Tensor, token_mask: Tensor | None = None, *, grad_seed: int = 1234) -> Result:
    """Forward, then backward of (y · g).sum() + aux_loss with a fixed random g; grads by parameter name.

    A parameter that received no gradient is reported as zeros, so layers that differ only in whether an
    unused parameter is touched by autograd still compare equal.
    """
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x, token_mask)
    generator = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(out.y.shape, generator=generator, dtype=torch.float64).to(out.y.dtype)
    ((out.y * g).sum() + out.aux_loss).backward()
    grads = {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in layer.named_parameters()
    }
    return Result(out, x.grad.clone(), grads)


def assert_results_close(actual: Result, expected: Result, *, rtol: float, atol: float) -> None:
    """Outputs, aux loss, routing statistics, input gradient and every parameter gradient agree."""
    torch.testing.assert_close(actual.out.y, expected.out.y, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(actual.out.aux_loss, expected.out.aux_loss, rtol=rtol, atol=atol, equal_nan=True)
    assert torch.equal(actual.out.stats.top_experts, expected.out.stats.top_experts)
    assert torch.equal(actual.out.stats.tokens_per_expert, expected.out.stats.tokens_per_expert)
    torch.testing.assert_close(actual.out.stats.dropped_fraction, expected.out.stats.dropped_fraction)
    torch.testing.assert_close(actual.x_grad, expected.x_grad, rtol=rtol, atol=atol)
    assert actual.param_grads.keys() == expected.param_grads.keys()
    for name, expected_grad in expected.param_grads.items():
        torch.testing.assert_close(
            actual.param_grads[name], expected_grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def assert_fast_matches_reference(
    reference: nn.Module, fast: nn.Module, x: Tensor, token_mask: Tensor | None = None, *, rtol: float, atol: float
) -> tuple[Result, Result]:
    expected = forward_backward(reference, x, token_mask)
    actual = forward_backward(fast, x, token_mask)
    assert_results_close(actual, expected, rtol=rtol, atol=atol)
    return actual, expected


def assert_bitwise_equal(a: Result, b: Result) -> None:
    assert torch.equal(a.out.y, b.out.y)
    assert torch.equal(a.out.aux_loss, b.out.aux_loss)
    assert torch.equal(a.x_grad, b.x_grad)
    for name in a.param_grads:
        assert torch.equal(a.param_grads[name], b.param_grads[name]), name


def set_identity_(linear: nn.Linear) -> None:
    """Make a D×D linear layer the identity map (weight I, bias 0)."""
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.in_features, dtype=linear.weight.dtype))
        linear.bias.zero_()


def ffn_config(kind: str = "dense", *, hidden: int = 1024, activation: str = "gelu", moe_every: int = 2, **moe):
    """A model's FFN section with MoE options given flat (num_experts=..., router=..., ...), as tests write them."""
    from mhmoe import FFNConfig, MoEConfig

    moe = {"num_experts": 8, "top_k": 2, "expert_hidden": 1024, "num_heads": 4, "activation": activation, **moe}
    return FFNConfig(kind=kind, hidden=hidden, activation=activation, moe_every=moe_every,
                     moe=MoEConfig.from_kwargs(**moe))  # fmt: skip
