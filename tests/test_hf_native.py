"""The native transformers model (`MHMoEModel`, `MHMoEForCausalLM`): Auto classes, the attention interface
(eager, sdpa, flex_attention, any registered function), inputs_embeds, position_ids, hidden states, attentions,
router logits and router_aux_loss_coef, gradient checkpointing; all against `GPT` on the same modules, float64."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from mhmoe.hf import MHMoEConfig, MHMoEForCausalLM, MHMoEModel  # noqa: E402
from mhmoe.hf.standalone import write_remote_code  # noqa: E402

V = 61


def config(kind: str = "mhmoe", tie: bool = False, **kwargs) -> MHMoEConfig:
    moe = dict(num_heads=2, num_experts=4, top_k=2, expert_hidden=16)
    ffn = dict(kind=kind, hidden=32, moe_every=2 if kind == "dense" else 1, moe=moe)
    return MHMoEConfig(
        vocab_size=V, seq_len=24, d_model=16, n_layers=2, n_heads=2, ffn=ffn, tie_word_embeddings=tie, **kwargs
    )


def model(kind: str = "mhmoe", seed: int = 0, **kwargs) -> MHMoEForCausalLM:
    torch.manual_seed(seed)
    return MHMoEForCausalLM(config(kind, **kwargs)).double().eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    return idx, mask


def test_auto_classes_load_the_decoder_and_the_causal_lm(tmp_path):
    hf = model()
    hf.save_pretrained(tmp_path)
    write_remote_code(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "modeling_mhmoe.MHMoEConfig",
        "AutoModel": "modeling_mhmoe.MHMoEModel",
        "AutoModelForCausalLM": "modeling_mhmoe.MHMoEForCausalLM",
    }
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MHMoEConfig)
    base = AutoModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(base) is MHMoEModel and type(lm) is MHMoEForCausalLM
    assert MHMoEModel._supports_attention_backend and MHMoEForCausalLM._supports_attention_backend
    idx = torch.randint(0, V, (2, 7))
    hidden = base(idx).last_hidden_state  # (B, L, D)
    assert hidden.shape == (2, 7, 16)
    assert torch.equal(lm.lm_head(hidden), lm(idx).logits)
    torch.testing.assert_close(lm(idx).logits, hf(idx).logits, rtol=0, atol=1e-13)  # its rotary tables: float32


@pytest.mark.parametrize("kind", ["dense", "smoe", "mhmoe"])
def test_the_model_equals_the_gpt_of_its_modules(kind):
    """One implementation: the transformers model and GPT share modules, and compute the same (padding too)."""
    hf = model(kind)
    gpt = hf.to_gpt()
    assert gpt.blocks is hf.model.blocks and gpt.lm_head is hf.lm_head
    idx, mask = padded_batch()
    torch.testing.assert_close(hf(idx).logits, gpt(idx).logits, rtol=0, atol=1e-13)
    out, ref = hf(idx, attention_mask=mask), gpt(idx, attention_mask=mask)
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(out.logits[1, 3:], ref.logits[1, 3:], rtol=0, atol=1e-13)  # the real tokens
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=0, atol=1e-15)
    again = MHMoEForCausalLM.from_gpt(gpt)
    assert again.model.blocks is gpt.blocks and torch.equal(again(idx).logits, hf(idx).logits)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_agree_forward_and_backward(implementation):
    idx, mask = padded_batch()
    reference = model().train()
    reference.set_attn_implementation("sdpa")
    other = model(attn_implementation=implementation).train()
    assert other.config._attn_implementation == implementation
    labels = idx.clone()
    labels[1, :4] = -100  # the padding and the first real token (which the last padding position would predict)
    for m in (reference, other):
        m.zero_grad()
        out = m(idx, attention_mask=mask, labels=labels)
        assert torch.isfinite(out.logits).all()  # padding queries included
        out.loss.backward()
    torch.testing.assert_close(
        other(idx, attention_mask=mask).logits[1, 3:], reference(idx, attention_mask=mask).logits[1, 3:]
    )
    for (name, a), b in zip(other.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.slow  # flex_attention compiles (inductor) on the CPU: about a minute; forward only in float32 there
def test_flex_attention_agrees_with_sdpa():
    idx, mask = padded_batch()
    torch.manual_seed(0)
    flex = MHMoEForCausalLM(config(attn_implementation="flex_attention")).eval()
    gpt = flex.to_gpt()
    with torch.no_grad():
        out, ref = flex(idx, attention_mask=mask).logits, gpt(idx, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 3:], ref[1, 3:], rtol=1e-5, atol=1e-5)


def test_an_unsupported_attn_implementation_names_the_supported_ones():
    with pytest.raises(ValueError, match=r'"bogus".*"eager".*sdpa.*flex_attention'):
        MHMoEForCausalLM(config(attn_implementation="bogus"))
    hf = model()
    with pytest.raises(
        ValueError, match=r"output_attentions needs attn_implementation='eager' \(this model uses 'sdpa'\)"
    ):
        hf(torch.zeros(1, 3, dtype=torch.long), output_attentions=True)


def test_a_registered_attention_function_gets_the_extra_keyword_arguments():
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape), module.scaling, kwargs.get("my_flag")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mhmoe_test_recording", recording)
    hf = model()
    expected = hf(torch.arange(5)[None]).logits
    hf.set_attn_implementation("mhmoe_test_recording")
    out = hf(torch.arange(5)[None], my_flag="seen")
    assert torch.equal(out.logits, expected)
    assert calls == [(i, (1, 2, 5, 8), (1, 2, 5, 8), 1 / math.sqrt(8), "seen") for i in range(2)]


def test_inputs_embeds_position_ids_and_hidden_states():
    hf = model()
    idx = torch.randint(0, V, (2, 8))
    out = hf(idx, output_hidden_states=True)
    embeds = hf.get_input_embeddings()(idx)
    assert torch.equal(hf(inputs_embeds=embeds).logits, out.logits)
    hidden = out.hidden_states  # the embeddings, each block's output, the last one after the final norm
    assert len(hidden) == 3 and torch.equal(hidden[0], embeds)
    assert torch.equal(hf.model(idx).last_hidden_state, hidden[-1])
    assert torch.equal(hf(idx, position_ids=torch.arange(8).expand(2, 8)).logits, out.logits)
    gap = torch.tensor([[0, 1, 2, 3, 10, 11, 12, 13]]).expand(2, 8)  # rotary scores depend on distances only
    moved = hf(idx, position_ids=gap).logits
    torch.testing.assert_close(moved, hf.to_gpt()(idx, position_ids=gap).logits, rtol=0, atol=1e-13)
    torch.testing.assert_close(moved[:, :4], out.logits[:, :4], rtol=0, atol=1e-13)
    assert not torch.allclose(moved[:, 4:], out.logits[:, 4:])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        hf(idx, inputs_embeds=embeds)


def test_output_attentions_with_eager():
    hf = model(attn_implementation="eager")
    idx, mask = padded_batch()
    out = hf(idx, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 9, 9)  # (B, nh, L, S) per block
    weights = out.attentions[1]
    torch.testing.assert_close(weights.sum(-1)[1, :, 3:], torch.ones(2, 6, dtype=torch.float64))
    assert (weights[0].triu(1) == 0).all() and (weights[1, :, 3:, 4:].triu(1) == 0).all()  # causal
    assert (weights[1, :, 3:, :3] == 0).all()  # padding is not attended to


def test_router_logits_and_router_aux_loss_coef(tmp_path):
    hf = model(output_router_logits=True)
    idx = torch.randint(0, V, (2, 8))
    out = hf(idx, labels=idx)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * 8 * 2, 4)  # (B·L·H sub-tokens, E)
    for logits, stats in zip(out.router_logits, out.router_stats):  # softmax router: the top-k of its logits
        assert torch.equal(logits.topk(2).indices, stats.top_experts)
    assert out.router_logits[0].requires_grad  # usable in a loss, as in Mixtral
    balance = sum(s.balance_loss for s in out.router_stats)
    assert hf.config.router_aux_loss_coef == 0.01 and hf.config.ffn["moe"]["balance_loss_coef"] == 0.01
    torch.testing.assert_close(out.aux_loss, 0.01 * balance)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert hf(idx, output_router_logits=False).router_logits is None

    stronger = model(router_aux_loss_coef=0.5)
    out = stronger(idx, labels=idx)
    assert stronger.config.ffn["moe"]["balance_loss_coef"] == 0.5
    torch.testing.assert_close(out.aux_loss, 0.5 * sum(s.balance_loss for s in out.router_stats))
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    stronger.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, router_aux_loss_coef=0.25)  # as transformers users set it
    assert all(layer.routed.config.balance_loss_coef == 0.25 for layer in loaded.model.moe_layers())
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.1 cannot take effect: this model has no MoE layers"):
        config("dense", router_aux_loss_coef=0.1)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    idx = torch.randint(0, V, (2, 8))
    plain, checkpointed = model().train(), model().train()
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.model.gradient_checkpointing
    recomputed = []
    checkpointed.model.blocks[0].register_forward_pre_hook(lambda m, a: recomputed.append(1))
    losses = []
    for m in (plain, checkpointed):
        out = m(idx, labels=idx, use_cache=False, output_router_logits=True)
        out.loss.backward()
        losses.append(out.loss)
        assert len(out.router_logits) == 2  # the recompute in backward records none
    assert len(recomputed) == 2  # forward, then again in backward
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-15)
    for (name, a), b in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15, msg=name)
    with pytest.raises(ValueError, match="a KV cache cannot be used while gradient checkpointing"):
        checkpointed(idx, use_cache=True)
