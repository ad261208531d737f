"""Hugging Face integration: save/load round trip, KV-cache generation, losses, run conversion, no pickle."""

import gzip
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import ffn_config, pack_sample  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mhmoe.analysis.runs import load_run  # noqa: E402
from mhmoe.cli import main  # noqa: E402
from mhmoe.errors import UserError  # noqa: E402
from mhmoe.hf import MHMoEConfig, MHMoEForCausalLM  # noqa: E402
from mhmoe.hf.runs import _read_run, byte_tokenizer_as_bpe, import_run, load_pretrained  # noqa: E402
from mhmoe.models.gpt import GPT, GPTConfig, KVCache  # noqa: E402

KINDS = ["dense", "smoe", "mhmoe"]


def gpt(kind: str, tie: bool = True, **ffn) -> GPT:
    ffn = dict(kind=kind, hidden=64, num_experts=4, top_k=2, expert_hidden=32, num_heads=2, moe_every=1, **ffn)
    cfg = GPTConfig(vocab_size=61, seq_len=32, d_model=32, n_layers=2, n_heads=2, tie_embeddings=tie)
    cfg.ffn = ffn_config(**ffn)
    return GPT(cfg).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, kind, tie):
    model = MHMoEForCausalLM.from_gpt(gpt(kind, tie))
    model.save_pretrained(tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MHMoEForCausalLM and isinstance(loaded.config, MHMoEConfig)
    assert (loaded.lm_head.weight is loaded.model.embed.weight) == tie
    idx = torch.randint(0, 61, (2, 12))
    assert torch.equal(model(idx).logits, loaded.eval()(idx).logits)
    assert loaded.config.to_gpt_config() == model.config.to_gpt_config() == loaded.to_gpt().cfg


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_prefill_and_steps_equal_the_full_forward(kind):
    model = gpt(kind).double()
    idx = torch.randint(0, 61, (3, 14))
    full = model(idx).logits
    cache = KVCache()
    parts = [model(idx[:, :6], cache=cache).logits, model(idx[:, 6:7], cache=cache).logits]
    parts.append(model(idx[:, 7:], cache=cache).logits)  # several new tokens after a cache: offset causal mask
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-12, atol=1e-12)
    assert cache.get_seq_length() == 14
    with pytest.raises(ValueError, match="length <= 32"):
        model(torch.zeros(3, 19, dtype=torch.long), cache=cache)


def test_left_padding_gives_the_unpadded_outputs():
    model = gpt("mhmoe").double()
    idx = torch.randint(0, 61, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    padded = model(idx, attention_mask=mask)
    torch.testing.assert_close(padded.logits[1, 4:], model(idx[1:, 4:]).logits[0], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(padded.logits).all()
    # padding is not routed: the MoE layers see 2·10 − 4 tokens
    assert int(padded.routing[0].tokens_per_expert.sum()) == (20 - 4) * 2 * 2  # tokens × heads × top-k


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_with_and_without_cache_gives_the_same_tokens(kind):
    torch.manual_seed(1)
    hf = MHMoEForCausalLM.from_gpt(gpt(kind), eos_token_id=None, pad_token_id=0).eval()
    prompt = torch.randint(1, 61, (2, 5))
    lengths: list[int] = []
    hook = hf.model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True
    )
    cached = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert lengths == [5] + [1] * 11, "with a cache each step feeds one token"
    lengths.clear()
    recomputed = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert lengths == list(range(5, 17))
    hook.remove()
    assert cached.shape == (2, 17) and torch.equal(cached, recomputed)
    assert torch.equal(cached, hf.to_gpt().generate(prompt, 12))  # plain PyTorch generate, cached
    assert torch.equal(cached, hf.to_gpt().generate(prompt, 12, use_cache=False))


def test_batched_generate_with_left_padding_equals_one_by_one():
    hf = MHMoEForCausalLM.from_gpt(gpt("mhmoe"), pad_token_id=0).eval()
    a, b = torch.randint(1, 61, (1, 7)), torch.randint(1, 61, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    together = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0, 7:], hf.generate(a, max_new_tokens=6, do_sample=False)[0, 7:])
    assert torch.equal(together[1, 7:], hf.generate(b, max_new_tokens=6, do_sample=False)[0, 4:])


def test_loss_is_shifted_cross_entropy_plus_aux_loss():
    hf = MHMoEForCausalLM.from_gpt(gpt("mhmoe")).train()
    idx = torch.randint(0, 61, (2, 12))
    labels = idx.clone()
    labels[0, :3] = -100
    out = hf(idx, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.aux_loss > 0 and len(out.router_stats) == 2
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in hf.model.moe_layers()[0].parameters())
    assert hf(idx).loss is None and hf(idx).aux_loss is not None


class _Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_only_folder(folder: Path, marker: Path) -> Path:
    """A model folder whose only weights are a crafted pickle (.bin) with a malicious __reduce__."""
    MHMoEForCausalLM.from_gpt(gpt("dense")).config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed.weight": _Exploit(marker)}, f)
    return folder


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = pickle_only_folder(tmp_path / "evil", marker)
    with pytest.raises(OSError):
        MHMoEForCausalLM.from_pretrained(folder)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(folder)  # goes through our class: safetensors forced
    with pytest.raises(ValueError, match="safetensors"):
        MHMoEForCausalLM.from_pretrained(folder, use_safetensors=False)
    with pytest.raises(UserError, match="safetensors"):
        load_pretrained(MHMoEForCausalLM, folder)
    with pytest.raises(UserError):
        import_run(folder, tmp_path / "run")
    assert main(["import-hf", str(folder), str(tmp_path / "run")]) == 2
    assert not marker.exists(), "the pickle was executed"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="safetensors"):
        MHMoEForCausalLM.from_gpt(gpt("dense")).save_pretrained(tmp_path / "out", safe_serialization=False)


def test_an_index_naming_a_pickle_shard_is_refused_before_unpickling(tmp_path):
    folder = pickle_only_folder(tmp_path / "evil", tmp_path / "pwned")
    (folder / "pytorch_model.bin").rename(folder / "model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": {"model.embed.weight": "model-00001-of-00001.bin"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = (
        f"{folder / 'model.safetensors.index.json'} names 'model-00001-of-00001.bin', which is not a safetensors "
        f"file of {folder}: refused before anything is unpickled"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        MHMoEForCausalLM.from_pretrained(folder)
    with pytest.raises(UserError, match=re.escape(message)):
        load_pretrained(MHMoEForCausalLM, folder)
    assert main(["import-hf", str(folder), str(tmp_path / "run")]) == 2
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()


def test_a_pickle_named_model_safetensors_is_refused_before_unpickling(tmp_path, capsys):
    folder = pickle_only_folder(tmp_path / "evil", tmp_path / "pwned")
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    message = f"{folder / 'model.safetensors'} is not a safetensors file (it may be a pickle renamed)"
    with pytest.raises(UserError, match=re.escape(message)):
        MHMoEForCausalLM.from_pretrained(folder)
    assert main(["import-hf", str(folder), str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"mhmoe: error: {message}: refused before anything is unpickled"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()


def exported(folder: Path) -> Path:
    """A model folder as `mhmoe export-hf` writes it (weights, config, a BPE tokenizer.json)."""
    from mhmoe.data import BPETokenizer
    from mhmoe.hf.runs import hf_tokenizer

    MHMoEForCausalLM.from_gpt(gpt("dense")).save_pretrained(folder)
    hf_tokenizer(BPETokenizer.train(["a small text to learn from"] * 4, 300)).save_pretrained(folder)
    return folder


def test_import_refuses_a_tokenizer_that_links_out_of_the_folder(tmp_path, capsys):
    folder = exported(tmp_path / "hf")
    secret = tmp_path / "secret.txt"
    secret.write_text("any readable file of the machine")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret)
    assert main(["import-hf", str(folder), str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mhmoe: error: {folder / 'tokenizer.json'} is a symbolic link to {secret}, outside {folder}; "
        "copy the real file there"
    )
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_tokenizer_json_that_is_not_a_tokenizer(tmp_path, capsys):
    folder = exported(tmp_path / "hf")
    (folder / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    assert main(["import-hf", str(folder), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mhmoe: error: {folder / 'tokenizer.json'} is not a tokenizer (")
    assert not (tmp_path / "run").exists()


def test_links_inside_a_hub_cache_are_followed(tmp_path):
    """A Hugging Face hub cache keeps files in blobs/ and links them from snapshots/REV/: that is allowed."""
    from mhmoe.hf.files import folder_file

    repo = tmp_path / "models--someone--model"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to(Path("..") / ".." / "blobs" / "abc123")
    assert folder_file(snapshot / "tokenizer.json", snapshot) == snapshot / "tokenizer.json"
    (snapshot / "vocab.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(UserError, match="is a symbolic link to .*elsewhere.json, outside"):
        folder_file(snapshot / "vocab.json", snapshot)


def test_no_pickle_loading_in_the_package():
    """Weights load through safetensors; any torch.load must pass weights_only=True, and nothing unpickles."""
    src = Path(__file__).resolve().parents[1] / "src" / "mhmoe"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|import pickle|allow_pickle=True", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_byte_tokenizer_export_encodes_like_the_byte_tokenizer():
    from mhmoe.data import ByteTokenizer

    text = "Hello wörld — ünïcode 漢字 🙂 \t\n  end"
    assert byte_tokenizer_as_bpe().encode(text).ids == ByteTokenizer().encode(text)
    assert byte_tokenizer_as_bpe().token_to_id("<|endoftext|>") == ByteTokenizer.eos_id


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """Two tiny trained runs (byte and BPE tokenizers) on real English text, 2 steps each."""
    from mhmoe.train.config import apply_overrides, preset
    from mhmoe.train.lm import train

    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt", encoding="utf-8").read()[:40_000]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    runs = {}
    for tokenizer in ("byte", "bpe"):
        cfg = preset("cpu-tiny")
        cfg.data.path = str(corpus)
        overrides = ["train.max_steps=2", "train.eval_batches=1", "train.final_eval_batches=1", "model.seq_len=32"]
        vocab = ["data.vocab_size=300"] if tokenizer == "bpe" else []  # a byte tokenizer has its own
        apply_overrides(cfg, [*overrides, f"data.tokenizer={tokenizer}", *vocab])
        train(cfg, tmp_path / f"run-{tokenizer}", progress=False)
        runs[tokenizer] = tmp_path / f"run-{tokenizer}"
    return runs


def test_run_export_and_import_are_lossless(run_dirs, tmp_path, capsys):
    text = "The quick brown fox — naïve café, 漢字.\n  Done"
    for name, run_dir in run_dirs.items():
        hf_dir, back = tmp_path / f"hf-{name}", tmp_path / f"back-{name}"
        assert main(["export-hf", str(run_dir), str(hf_dir)]) == 0
        assert main(["import-hf", str(hf_dir), str(back)]) == 0
        cfg, model, tokenizer, state = _read_run(run_dir)
        cfg_back, model_back, tokenizer_back, state_back = _read_run(back)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
        assert torch.equal(hf(idx).logits, model(idx).logits)
        assert torch.equal(model_back(idx).logits, model(idx).logits)
        assert cfg_back.to_dict() == cfg.to_dict()
        assert state_back["step"] == state["step"] == 2 and state_back["sampler"] == state["sampler"]
        hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text) == tokenizer_back.encode(text)
        assert hf.config.eos_token_id == tokenizer.eos_id
        assert torch.equal(load_run(back).model(idx).logits, model(idx).logits)  # as eval / analyze load it
        assert main(["export-hf", str(run_dir), str(hf_dir)]) == 2  # refuses to overwrite
        assert "already exists" in capsys.readouterr().err


def test_plain_generate_samples_reproducibly_and_pads_after_eos():
    model = gpt("smoe")
    prompt = torch.randint(0, 61, (3, 4))
    draw = [
        model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(draw[0], draw[1]) and draw[0].shape == (3, 14)
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 6])  # the first row emits this token at its third step
    stopped = model.generate(prompt, 10, eos_id=eos)
    assert (stopped[0, 6:] == eos).all() and torch.equal(stopped[0, :7], greedy[0, :7])
    slid = model.generate(prompt, 30)  # past seq_len (32): the window slides (tests/test_model.py)
    assert slid.shape == (3, 34) and torch.equal(slid[:, :14], greedy)


def test_encoder_attention_takes_no_cache():
    from mhmoe.models.gpt import Attention

    attn = Attention(16, 2, causal=False)
    with pytest.raises(ValueError, match="causal"):
        attn(torch.randn(1, 3, 16), cache=KVCache())


STANDALONE = """
import json, sys
sys.modules["mhmoe"] = None  # as where mhmoe is not installed: `import mhmoe` fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, idx = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert not any(name == "mhmoe" or name.startswith("mhmoe.") for name in sys.modules if sys.modules[name])
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, use_safetensors=False)
    print("pickle allowed")
except ValueError as e:
    assert "safetensors weights only" in str(e)
text = AutoTokenizer.from_pretrained(folder, trust_remote_code=True).decode(model.generate(idx[:1, :3], max_new_tokens=4, do_sample=False)[0])
print(json.dumps({"logits": model(idx).logits.tolist(), "type": type(model).__module__, "text": text}))
"""


def test_exported_folder_loads_without_mhmoe(run_dirs, tmp_path):
    """The exported folder carries its model code: plain transformers + torch load it with trust_remote_code."""
    import json
    import os
    import re
    import subprocess
    import sys

    hf_dir = tmp_path / "hf"
    assert main(["export-hf", str(run_dirs["bpe"]), str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhmoe.MHMoEForCausalLM"
    imports_mhmoe = re.compile(r"^\s*(from|import)\s+mhmoe\b", re.M)
    assert not [f for f in hf_dir.glob("*.py") if imports_mhmoe.search(f.read_text())]
    _, model, _, _ = _read_run(run_dirs["bpe"])
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(hf_dir), json.dumps(idx.tolist())],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), result.stdout[-2000:]
    out = json.loads(lines[-1])
    assert lines[:-1] == [] and out["type"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(out["logits"]), model(idx).logits, rtol=1e-5, atol=1e-5)
