"""Bad arguments and inputs raise, and the message names the offending values (STYLE.md item 13)."""

from __future__ import annotations

import re

import pytest
import torch

from mhmoe import DenseFFN, Experts, MHMoE, SigmoidRouter, SoftmaxRouter, SparseMoE, XMoERouter
from mhmoe.ops.backend import resolve_backend


def moe(**overrides) -> SparseMoE:
    kwargs = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
    kwargs.update(overrides)
    return SparseMoE(**kwargs)


def mhmoe(**overrides) -> MHMoE:
    kwargs = dict(d_model=8, num_heads=2, num_experts=4, top_k=2, expert_hidden=8)
    kwargs.update(overrides)
    return MHMoE(**kwargs)


# ---------------------------------------------------------------- constructor arguments


def test_d_model_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by num_heads \(4\)"):
        mhmoe(d_model=10, num_heads=4)


@pytest.mark.parametrize("name", ["d_model", "num_heads"])
@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_non_positive_sizes(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {re.escape(repr(value))}"):
        mhmoe(**{name: value})


@pytest.mark.parametrize("name", ["d_model", "num_experts", "expert_hidden"])
def test_non_positive_moe_sizes(name):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got 0"):
        moe(**{name: 0})


@pytest.mark.parametrize("top_k", [0, 5, -1, 1.5, 2.0, True, "2"])
@pytest.mark.parametrize("layer", [moe, mhmoe])
def test_bad_top_k(layer, top_k):
    message = rf"top_k must be an integer in 1\.\.num_experts \(4\), got {re.escape(repr(top_k))}"
    with pytest.raises(ValueError, match=message):
        layer(top_k=top_k)


def test_unknown_router_with_suggestion():
    with pytest.raises(ValueError, match=r"unknown router 'softmx' \(did you mean 'softmax'\?\)"):
        moe(router="softmx")
    with pytest.raises(ValueError, match=r"unknown router 'sigmod' \(did you mean 'sigmoid'\?\)"):
        mhmoe(router="sigmod")
    with pytest.raises(ValueError, match=r"unknown router 'zzz'; choose one of \['sigmoid', 'softmax'"):
        moe(router="zzz")


def test_router_of_wrong_type():
    with pytest.raises(TypeError, match="router must be a name or a Router, got int"):
        moe(router=3)


def test_switch_router_is_top1():
    with pytest.raises(ValueError, match=r"the switch router is top-1; got top_k=2"):
        moe(router="switch", top_k=2)


def test_unknown_activation():
    choices = r"\('gelu', 'relu', 'silu', 'relu2', 'swiglu', 'geglu', 'reglu'\)"
    with pytest.raises(ValueError, match=rf"unknown activation 'tanh'; choose one of {choices}"):
        moe(activation="tanh")
    with pytest.raises(ValueError, match=r"unknown activation 'elu'"):
        DenseFFN(d_model=8, hidden=8, activation="elu")


def test_unknown_dispatch():
    with pytest.raises(ValueError, match=r"unknown dispatch 'fast'; choose one of \('auto', 'grouped_mm'"):
        mhmoe(dispatch="fast")


def test_unknown_residual():
    with pytest.raises(ValueError, match=r"unknown residual 'inner'; choose one of \('outer', 'subtoken'\)"):
        mhmoe(residual="inner")


@pytest.mark.parametrize("name", ["multi_head_layers", "merge_layers"])
@pytest.mark.parametrize("value", [-1, 1.0, True])
def test_bad_projection_depth(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 0, got {re.escape(repr(value))}"):
        mhmoe(**{name: value})


@pytest.mark.parametrize("capacity_factor", [0, 0.0, -0.5])
def test_capacity_factor_must_be_positive(capacity_factor):
    with pytest.raises(ValueError, match=rf"capacity_factor must be > 0 or None \(dropless\), got {capacity_factor}"):
        moe(capacity_factor=capacity_factor)


def test_negative_coefficients_and_shared_experts():
    with pytest.raises(ValueError, match=r"balance_loss_coef must be >= 0, got -0.1"):
        moe(balance_loss_coef=-0.1)
    with pytest.raises(ValueError, match=r"z_loss_coef must be >= 0, got -1"):
        moe(z_loss_coef=-1)
    with pytest.raises(ValueError, match=r"num_shared_experts must be >= 0, got -1"):
        moe(num_shared_experts=-1)


def test_router_object_that_does_not_fit():
    with pytest.raises(
        ValueError, match=re.escape("router has (d_model, num_experts, top_k) = (8, 4, 2), the layer needs (8, 4, 1)")
    ):
        moe(top_k=1, router=SoftmaxRouter(8, 4, 2))
    with pytest.raises(ValueError, match=re.escape("= (8, 3, 2), the layer needs (8, 4, 2)")):
        moe(router=SoftmaxRouter(8, 3, 2))
    # Inside MH-MoE the router sees sub-tokens of width d_model / num_heads = 4, not 8.
    with pytest.raises(ValueError, match=re.escape("= (8, 4, 2), the layer needs (4, 4, 2)")):
        mhmoe(router=SigmoidRouter(8, 4, 2))
    with pytest.raises(ValueError, match=r"router_kwargs \['jitter'\] given with a router object"):
        moe(router=SoftmaxRouter(8, 4, 2), router_kwargs={"jitter": 0.1})
    mhmoe(router=SigmoidRouter(4, 4, 2))  # one that fits is accepted


def test_router_arguments():
    with pytest.raises(ValueError, match=r"jitter must be in \[0, 1\), got 1.5"):
        SoftmaxRouter(8, 4, 2, jitter=1.5)
    with pytest.raises(ValueError, match=r"unknown X-MoE form 'torchscale'; choose 'paper' or 'code'"):
        moe(router="xmoe", router_kwargs={"form": "torchscale"})
    with pytest.raises(ValueError, match=r"X-MoE routing dim must be >= 1, got 0"):
        XMoERouter(8, 4, 1, dim=0)
    with pytest.raises(ValueError, match=r"init_temperature must be > 0, got 0"):
        XMoERouter(8, 4, 1, init_temperature=0)
    with pytest.raises(ValueError, match=r"bias_update_rate must be >= 0, got -0.1"):
        SigmoidRouter(8, 4, 2, bias_update_rate=-0.1)
    with pytest.raises(ValueError, match=r"load must have shape \(4,\), got \(3,\)"):
        SigmoidRouter(8, 4, 2).update_bias(torch.ones(3))
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        moe(router="softmax", router_kwargs={"temperature": 1.0})


def test_load_dense_that_does_not_fit():
    experts = Experts(num_experts=2, d_model=8, hidden=8, activation="gelu")
    message = r"DenseFFN\(d_model=8, hidden=4, activation='gelu', bias=False\) does not fit experts of d_model=8"
    with pytest.raises(ValueError, match=message):
        experts.load_dense(0, DenseFFN(d_model=8, hidden=4))
    with pytest.raises(ValueError, match=r"bias=True\) does not fit"):
        experts.load_dense(0, DenseFFN(d_model=8, hidden=8, bias=True))


# ---------------------------------------------------------------- inputs


@pytest.mark.parametrize(("layer", "name"), [(moe, "SparseMoE"), (mhmoe, "MHMoE")])
def test_wrong_last_dimension(layer, name):
    with pytest.raises(ValueError, match=re.escape(f"{name} expects input of shape (..., 8), got (2, 3, 7)")):
        layer()(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=re.escape("expects input of shape (..., 8), got ()")):
        layer()(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize(("layer", "name"), [(moe, "SparseMoE"), (mhmoe, "MHMoE")])
def test_integer_input(layer, name, dtype):
    with pytest.raises(TypeError, match=rf"{name} expects a floating-point input, got dtype {re.escape(str(dtype))}"):
        layer()(torch.ones(2, 8, dtype=dtype))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="SparseMoE expects a tensor, got list"):
        moe()([[0.0] * 8])


@pytest.mark.parametrize("layer", [moe, mhmoe])
def test_token_mask_of_wrong_shape_or_dtype(layer):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=re.escape("token_mask must have shape (2, 3), got (3, 2)")):
        layer()(x, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape("token_mask must have shape (2, 3), got (6,)")):
        layer()(x, torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"token_mask must be bool \(True = route this token\), got torch.float32"):
        layer()(x, torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"got torch.int64"):
        layer()(x, torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("layer", [moe, mhmoe])
def test_token_mask_that_is_not_a_tensor(layer):
    x = torch.randn(2, 3, 8)
    message = re.escape("token_mask must be a bool tensor of shape (2, 3), got list; pass torch.tensor(mask, dtype=")
    with pytest.raises(TypeError, match=message):
        layer()(x, [[True, True, False], [True, False, False]])


@pytest.mark.parametrize("options", [{}, {"dispatch": "reference"}, {"num_shared_experts": 1}], ids=str)
@pytest.mark.parametrize(("layer", "name"), [(moe, "SparseMoE"), (mhmoe, "MHMoE")])
def test_input_dtype_must_be_the_weights_dtype(layer, name, options):
    """Every path refuses the same way (the default path computed in the input's dtype, the shared-expert and
    reference paths raised torch's own dtype error); autocast picks the dtype itself, so it is accepted there."""
    message = re.escape(f"{name} got a torch.float64 input but its weights are torch.float32; cast one to the other")
    with pytest.raises(TypeError, match=message):
        layer(**options)(torch.randn(3, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(**options)(torch.randn(3, 8).bfloat16()).y.shape == (3, 8)


def test_non_finite_layer_options():
    with pytest.raises(ValueError, match=r"capacity_factor must be finite \(None is dropless\), got inf"):
        moe(capacity_factor=float("inf"))
    with pytest.raises(ValueError, match=r"balance_loss_coef must be >= 0, got nan"):
        mhmoe(balance_loss_coef=float("nan"))
    with pytest.raises(ValueError, match=r"z_loss_coef must be finite, got inf"):
        moe(z_loss_coef=float("inf"))


@pytest.mark.parametrize("layer", [moe, mhmoe])
def test_grouped_mm_for_float64(layer):
    with pytest.raises(ValueError, match=r"grouped_mm cannot run torch.float64 on cpu"):
        layer(dispatch="grouped_mm").double()(torch.randn(3, 8, dtype=torch.float64))


def test_grouped_mm_for_misaligned_widths():
    # d = 8 float32, F = 6: 24-byte rows.
    with pytest.raises(ValueError, match=re.escape("grouped_mm cannot run torch.float32 on cpu with widths (8, 6)")):
        moe(dispatch="grouped_mm", expert_hidden=6)(torch.randn(3, 8))


def test_resolve_backend_unknown_name():
    with pytest.raises(ValueError, match=r"unknown dispatch backend 'reference'"):
        resolve_backend("reference", torch.float32, torch.device("cpu"))


def test_shared_expert_hidden_without_shared_experts_is_an_error():
    with pytest.raises(ValueError, match="shared_expert_hidden=8 given but num_shared_experts is 0"):
        SparseMoE(d_model=8, num_experts=2, top_k=1, expert_hidden=4, shared_expert_hidden=8)
