"""mhmoe as transformers' experts implementation (`mhmoe.hf.experts`): `experts_implementation="mhmoe"` gives the
logits, the loss and every gradient of `experts_implementation="eager"` on tiny random Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE and DeepSeek-V3 models in float64 (the "slices" backend: grouped_mm has no float64), within a
float32 tolerance in float32 (grouped_mm) and through the Triton kernels (interpreter); the layouts the decorator
allows beyond those five (transposed, biased, ungated) against the decorated class's own loop; the layouts not
handled refused in one line.

Both implementations get the same routing from transformers' router, so float64 agreement is to rounding. That
router computes in float32 even in a float64 model (`router_logits.float()`, `softmax(dtype=torch.float)`), so
the gradient that flows back through it to the router's weights and everything below is float32-rounded: two
gate gradients equal to 1e-16 can round to neighbouring float32 values. Whole models are therefore compared with
logits and loss to float64 rounding and gradients to float32 rounding (ROUTED); each model's own experts module,
called on the inputs its router gave, is compared in float64 throughout, outputs and gradients of the hidden
states, the routing weights and every expert weight (EXACT).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5.0")

from test_peers import deepseek_v3, mixtral, olmoe, qwen2, qwen3  # noqa: E402
from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, PretrainedConfig  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402

import mhmoe.hf  # noqa: E402, F401  (registers "mhmoe")
from mhmoe.hf.experts import HANDLED, ExpertsLayoutError  # noqa: E402
from mhmoe.ops.backend import resolve_backend  # noqa: E402

MODELS = {"mixtral": mixtral, "qwen2-moe": qwen2, "qwen3-moe": qwen3, "olmoe": olmoe, "deepseek-v3": deepseek_v3}
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64, summation order only
ROUTED = dict(rtol=1e-6, atol=1e-7)  # gradients through transformers' float32 router (module doc)


def build(name: str, implementation: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    model.set_experts_implementation(implementation)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):  # untrained: zeros; make the bias matter
            module.e_score_correction_bias.normal_(0, 0.05)
    return model


def logits_loss_grads(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad()
    out = model(idx, labels=idx)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_model_outputs(model: nn.Module, twin: nn.Module, idx: torch.Tensor, tolerance, grad_tolerance) -> None:
    logits, loss, grads = logits_loss_grads(model, idx)
    twin_logits, twin_loss, twin_grads = logits_loss_grads(twin, idx)
    torch.testing.assert_close(twin_logits, logits, **tolerance)
    torch.testing.assert_close(twin_loss, loss, **tolerance)
    assert twin_grads.keys() == grads.keys() and any(".experts." in n for n in grads)
    for n in grads:
        torch.testing.assert_close(twin_grads[n], grads[n], **grad_tolerance, msg=lambda m, n=n: f"{n}: {m}")


def experts_calls(model: nn.Module, idx: torch.Tensor) -> list[tuple[nn.Module, tuple]]:
    """Each experts module of the model with the (hidden_states, top_k_index, top_k_weights) it was called on."""
    calls: list[tuple[nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, tuple(a.detach() for a in args))))
             for m in model.modules() if type(m).__name__.endswith("Experts")]  # fmt: skip
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    return calls


def assert_experts_call_equal(module: nn.Module, args: tuple, implementations=("eager", "mhmoe")) -> None:
    """Outputs and gradients (hidden states, routing weights, every expert weight) of one experts call under two
    implementations, float64."""
    x_TD, index_TK, weights_TK = args
    x_TD, weights_TK = x_TD.double().requires_grad_(), weights_TK.double().requires_grad_()
    results = []
    for implementation in implementations:
        module.config._experts_implementation = implementation
        module.zero_grad()
        x_TD.grad = weights_TK.grad = None
        y_TD = module(x_TD, index_TK, weights_TK)
        (y_TD * torch.linspace(-1, 1, y_TD.numel(), dtype=y_TD.dtype).view_as(y_TD)).sum().backward()
        results.append([y_TD.detach(), x_TD.grad, weights_TK.grad] + [p.grad for p in module.parameters()])
    assert all(g is not None for g in results[1])
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, **EXACT)


def test_import_registers_mhmoe_with_transformers():
    assert {"mhmoe", "mhmoe_triton"} <= set(ALL_EXPERTS_FUNCTIONS)


@pytest.mark.parametrize("name", list(MODELS))
def test_mhmoe_experts_equal_eager_in_float64(name):
    eager = build(name, "eager")
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("mhmoe")
    assert ours.config._experts_implementation == "mhmoe"
    idx = torch.randint(1, 97, (2, 9))
    assert_same_model_outputs(eager, ours, idx, EXACT, ROUTED)
    calls = experts_calls(eager, idx)
    assert len(calls) >= 1
    for module, args in calls:
        assert_experts_call_equal(module, args)


def test_from_pretrained_and_from_config_take_experts_implementation_mhmoe(tmp_path, monkeypatch):
    eager = build("qwen3-moe", "eager")
    eager.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="mhmoe", dtype=torch.float64)
    built = AutoModelForCausalLM.from_config(
        copy.deepcopy(eager.config), experts_implementation="mhmoe", dtype=torch.float64
    )
    assert loaded.config._experts_implementation == built.config._experts_implementation == "mhmoe"
    assert eager.config._experts_implementation == "eager"
    calls = []
    forward = ALL_EXPERTS_FUNCTIONS["mhmoe"]
    monkeypatch.setitem(
        ALL_EXPERTS_FUNCTIONS._global_mapping, "mhmoe", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    assert_same_model_outputs(eager, loaded, torch.randint(1, 97, (2, 9)), EXACT, ROUTED)
    assert len(calls) == eager.config.num_hidden_layers  # every MoE layer went through mhmoe


def test_mhmoe_experts_in_float32_use_grouped_mm_and_agree():
    eager = build("qwen3-moe", "eager", torch.float32)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("mhmoe")
    assert resolve_backend("auto", torch.float32, torch.device("cpu"), (32, 24)) == "grouped_mm"
    assert_same_model_outputs(eager, ours, torch.randint(1, 97, (2, 9)), *[dict(rtol=1e-4, atol=1e-5)] * 2)


def test_decoding_fewer_rows_than_experts_runs_only_the_experts_hit():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", torch.float32, cpu, (32, 24), rows_per_expert=0.5) == "slices"
    assert resolve_backend("auto", torch.float32, cpu, (32, 24), rows_per_expert=2.0) == "grouped_mm"
    eager = build("qwen3-moe", "eager", torch.float32)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("mhmoe")
    prompt = torch.randint(1, 97, (1, 3))  # decoding: 1 token × top-2 of 4 experts per step
    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False),
                           eager.generate(prompt, max_new_tokens=6, do_sample=False))  # fmt: skip
        one = torch.randint(1, 97, (1, 1))
        torch.testing.assert_close(ours(one).logits, eager(one).logits, rtol=1e-4, atol=1e-5)


def test_mhmoe_triton_runs_the_triton_kernels(triton_interpreter):
    eager = build("mixtral", "eager", torch.float32)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("mhmoe_triton")
    assert_same_model_outputs(eager, ours, torch.randint(1, 97, (1, 5)), *[dict(rtol=1e-4, atol=1e-5)] * 2)


class ToyConfig(PretrainedConfig):
    hidden_size, intermediate_size, num_experts, hidden_act = 8, 6, 4, "silu"


def toy_experts(**flags) -> type[nn.Module]:
    """An experts class in any of the layouts `use_experts_implementation` describes, with a plain loop as its
    eager forward (the reference)."""

    @use_experts_implementation(**flags)
    class ToyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
            g = 2 if flags.get("has_gate", True) else 1
            first = "gate_up_proj" if g == 2 else "up_proj"
            transposed = flags.get("is_transposed", False)
            setattr(self, first, nn.Parameter(torch.randn((E, D, g * F) if transposed else (E, g * F, D))))
            self.down_proj = nn.Parameter(torch.randn((E, F, D) if transposed else (E, D, F)))
            if flags.get("has_bias", False):
                setattr(self, f"{first}_bias", nn.Parameter(torch.randn(E, g * F)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, D))
            self.act_fn = ACT2FN[config.hidden_act]
            self.num_experts, self.first = E, first

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for t in range(hidden_states.shape[0]):
                for k, e in enumerate(top_k_index[t].tolist()):
                    w_in, w_out = getattr(self, self.first)[e], self.down_proj[e]
                    h = hidden_states[t] @ w_in if self.is_transposed else w_in @ hidden_states[t]
                    if self.has_bias:
                        h = h + getattr(self, f"{self.first}_bias")[e]
                    a = self._apply_gate(h) if self.has_gate else self.act_fn(h)
                    y = a @ w_out if self.is_transposed else w_out @ a
                    if self.has_bias:
                        y = y + self.down_proj_bias[e]
                    out[t] = out[t] + top_k_weights[t, k] * y
            return out

    return ToyExperts


LAYOUTS = [dict(is_transposed=True), dict(has_bias=True), dict(is_transposed=True, has_bias=True),
           dict(has_gate=False), dict(has_gate=False, is_transposed=True, has_bias=True)]  # fmt: skip


@pytest.mark.parametrize("flags", LAYOUTS, ids=lambda f: ",".join(f))
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_every_handled_layout_equals_its_eager_loop(flags, act):
    experts = toy_experts(**flags)(ToyConfig(hidden_act=act)).double()
    index_TK = torch.stack([torch.randperm(4)[:2] for _ in range(7)])
    assert_experts_call_equal(experts, (torch.randn(7, 8), index_TK, torch.rand(7, 2)))


def test_a_layout_not_handled_is_refused_in_one_line():
    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          vocab_size=97, experts_implementation="mhmoe")  # fmt: skip
    model = GptOssForCausalLM(config)
    with pytest.raises(ExpertsLayoutError) as error:
        model(torch.randint(0, 97, (1, 4)))
    message = str(error.value)
    assert "\n" not in message and message.startswith("GptOssExperts: its gate and up rows are interleaved")
    assert message.endswith(HANDLED)
    experts = toy_experts()(ToyConfig(hidden_act="gelu_pytorch_tanh"))  # tanh-approximated: no exact counterpart
    experts.config._experts_implementation = "mhmoe"
    with pytest.raises(ExpertsLayoutError, match="activation .* has no exact counterpart"):
        experts(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def test_triton_refuses_expert_biases(triton_interpreter):
    config = ToyConfig(experts_implementation="mhmoe_triton")
    experts = toy_experts(has_bias=True)(config)
    with pytest.raises(ExpertsLayoutError, match="experts_implementation='mhmoe'"):
        experts(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
