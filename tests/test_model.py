"""The GPT decoder: causal, exact accounting, MoE placement, learns."""

import pytest
import torch
from conftest import ffn_config

from mhmoe.layers.experts import DenseFFN
from mhmoe.layers.moe import SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.models.gpt import GPT, GPTConfig, gpt_cost


def config(kind: str, **ffn) -> GPTConfig:
    ffn = dict(kind=kind, hidden=64, num_experts=4, top_k=2, expert_hidden=32, num_heads=2, **ffn)
    return GPTConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=4, n_heads=2, ffn=ffn_config(**ffn))


@pytest.mark.parametrize("kind", ["dense", "smoe", "mhmoe"])
@pytest.mark.parametrize("tie", [True, False])
def test_cost_counts_every_parameter(kind, tie):
    cfg = config(kind)
    cfg.tie_embeddings = tie
    model = GPT(cfg)
    assert gpt_cost(cfg).params_total == sum(p.numel() for p in model.parameters())


def test_moe_replaces_every_second_ffn():
    kinds = [type(b.ffn) for b in GPT(config("mhmoe")).blocks]
    assert kinds == [DenseFFN, MHMoE, DenseFFN, MHMoE]
    every = config("smoe", moe_every=1)
    assert all(isinstance(b.ffn, SparseMoE) for b in GPT(every).blocks)


@pytest.mark.parametrize("kind", ["dense", "smoe", "mhmoe"])
def test_causal(kind):
    torch.manual_seed(0)
    model = GPT(config(kind)).double().eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50, (2, 6))
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_outputs_and_routing_stats():
    model = GPT(config("mhmoe"))
    idx = torch.randint(0, 50, (3, 16))
    out = model(idx, idx)
    assert out.logits.shape == (3, 16, 50) and out.loss.ndim == 0
    assert len(out.routing) == 2 and out.routing[0].top_experts.shape == (3 * 16 * 2, 2)
    torch.testing.assert_close(out.aux_loss, sum(0.01 * s.balance_loss for s in out.routing))
    assert GPT(config("dense"))(idx).aux_loss.item() == 0.0


def test_rejects_sequences_longer_than_seq_len():
    with pytest.raises(ValueError, match=r"length <= 16"):
        GPT(config("dense"))(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kind", ["dense", "mhmoe"])
def test_overfits_one_batch(kind):
    torch.manual_seed(0)
    model = GPT(config(kind))
    idx = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.1 * first, (first, out.loss.item())


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    from mhmoe.models.gpt import pick_token

    # probabilities 0.2, 0.5, 0.3 (in a shuffled order): top_p=0.6 keeps {1, 2}; 0.5 keeps {1}; 1.0 keeps all
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log().repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)

    def counts(top_p, top_k=None):
        ids = pick_token(logits, 1.0, top_k, generator, top_p).flatten()
        return torch.bincount(ids, minlength=3).tolist()

    assert counts(top_p=0.5) == [0, 2000, 0]
    kept = counts(top_p=0.6)
    assert kept[0] == 0 and kept[1] > 1000 and kept[2] > 600  # renormalised: 5/8 and 3/8
    assert all(c > 300 for c in counts(top_p=1.0))
    assert counts(top_p=0.99, top_k=2)[0] == 0  # top-k first, then top-p over what is left
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p must be in"):
            pick_token(logits, 1.0, None, generator, top_p=bad)


def test_generate_takes_top_p():
    model = GPT(GPTConfig(vocab_size=32, seq_len=16, d_model=16, n_layers=1, n_heads=2)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    tiny_p = model.generate(prompt, 5, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny_p, model.generate(prompt, 5))  # a nucleus of one token is greedy decoding


def _windowed_reference(model: GPT, idx: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding the slow, obvious way: each token from the last seq_len tokens, recomputed (nanoGPT)."""
    tokens = idx
    for _ in range(new):
        logits = model(tokens[:, -model.cfg.seq_len :]).logits[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("prompt_len", [3, 20])  # within the context (cached, then slid), and longer than it
def test_generate_slides_the_window_past_the_context(prompt_len):
    torch.manual_seed(0)
    model = GPT(config("mhmoe")).double().eval()  # seq_len 16, 4 blocks: the deeper blocks see the window only
    prompt = torch.randint(0, 50, (2, prompt_len))
    want = _windowed_reference(model, prompt, 30)
    assert want.shape == (2, prompt_len + 30)
    assert torch.equal(model.generate(prompt, 30), want)
    assert torch.equal(model.generate(prompt, 30, use_cache=False), want)
    sample = dict(temperature=1.0, top_k=10)  # sampling: the cached start and the recomputed one agree too
    draws = [model.generate(prompt, 30, use_cache=c, generator=torch.Generator().manual_seed(2), **sample)
             for c in (True, False)]  # fmt: skip
    assert torch.equal(draws[0], draws[1])
