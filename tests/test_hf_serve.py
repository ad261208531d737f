"""Serving an exported model on the CPU: `pipeline("text-generation")` and `transformers serve` (its
OpenAI-compatible server, on localhost) answer with the greedy text of `mhmoe generate`; and the folder meets the
contract of vLLM's Transformers backend as far as it can be checked without vLLM (AutoModel in auto_map, a base
model, any attention function registered in transformers' AttentionInterface called with the model's arguments)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import pipeline  # noqa: E402

from mhmoe.cli import main  # noqa: E402
from mhmoe.data import ByteTokenizer  # noqa: E402
from mhmoe.hf import MHMoEConfig, MHMoEForCausalLM  # noqa: E402
from mhmoe.hf.runs import export_run, hf_tokenizer, import_run  # noqa: E402

PROMPT, NEW = "Alle Menschen sind", 12


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its `mhmoe export-hf` folder) of a tiny MH-MoE model whose greedy continuations are printable
    text (its output layer rows of other byte ids are 0), so that texts, not only ids, can be compared."""
    tmp = tmp_path_factory.mktemp("serve")
    moe = dict(num_heads=2, num_experts=4, top_k=2, expert_hidden=16)
    config = MHMoEConfig(
        vocab_size=257, seq_len=64, d_model=16, n_layers=2, n_heads=2, tie_word_embeddings=False,
        ffn=dict(kind="mhmoe", moe_every=1, moe=moe), eos_token_id=256, pad_token_id=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MHMoEForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[torch.cat([torch.arange(32), torch.arange(127, 257)])] = 0
    model.save_pretrained(tmp / "src")
    hf_tokenizer(ByteTokenizer()).save_pretrained(tmp / "src")
    run = import_run(tmp / "src", tmp / "run")
    return run, export_run(run, tmp / "hf")


def mhmoe_generate(run: Path, capsys) -> str:
    args = ["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--temperature", "0"]
    assert main(args) == 0
    return capsys.readouterr().out[:-1]  # print's newline


def test_pipeline_returns_the_greedy_text_of_mhmoe_generate(served, capsys):
    run, folder = served
    expected = mhmoe_generate(run, capsys)
    assert len(expected) == len(PROMPT) + NEW and expected.isprintable()
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    assert type(generator.model) is MHMoEForCausalLM  # where mhmoe is not installed: trust_remote_code=True
    assert generator(PROMPT, max_new_tokens=NEW, do_sample=False)[0]["generated_text"] == expected


# transformers serve (5.25) loads a model by `getattr(transformers, config.architectures[0])`, in a process of its
# own: an architecture from remote code or a registered class is not found there (AttributeError), so the model's
# process is given the class through sitecustomize, which Python imports at start-up in every process.
SITECUSTOMIZE = """import transformers
from mhmoe.hf import MHMoEForCausalLM
transformers.MHMoEForCausalLM = MHMoEForCausalLM
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# two Python processes start (the API server and the model's): about 20 s on an idle machine, in the default suite so
# that CI shows the server answering
def test_transformers_serve_answers_with_the_greedy_text_of_mhmoe_generate(served, tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    run, folder = served
    expected = mhmoe_generate(run, capsys)
    (tmp_path / "patch").mkdir()
    (tmp_path / "patch" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "patch"), str(src)])}
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--device", "cpu",
               "--dtype", "float32", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 240 s"
            try:
                urllib.request.urlopen(f"http://localhost:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        body = {"model": str(folder), "prompt": PROMPT, "max_tokens": NEW, "temperature": 0}
        answer = post(f"http://localhost:{port}/v1/completions", body, timeout=120)
        assert PROMPT + answer["choices"][0]["text"] == expected
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


VLLM_CONTRACT = """
import json, sys
sys.modules["mhmoe"] = None  # as a serving machine without mhmoe: the folder's own code
import torch
from transformers import AttentionInterface, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
calls = []

def recording(module, query, key, value, attention_mask, **kwargs):
    calls.append([module.layer_idx, module.is_causal, list(query.shape), list(key.shape), kwargs["marker"]])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

AttentionInterface.register("mhmoe_vllm_contract", recording)
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="mhmoe_vllm_contract")
ids, positions = torch.arange(10, 17)[None], torch.arange(7)[None]  # vLLM: the flattened tokens, their positions
hidden = base(ids, position_ids=positions, use_cache=False, return_dict=False, marker="from vllm")[0]
base.set_attn_implementation("sdpa")
print(json.dumps({
    "class": type(base).__module__ + "." + type(base).__name__,
    "supports_attention_backend": base._supports_attention_backend,
    "hidden_shape": list(hidden.shape),
    "calls": calls,
    "same_as_sdpa": bool(torch.equal(base(ids, position_ids=positions).last_hidden_state, hidden)),
}))
"""


def test_the_folder_meets_the_vllm_transformers_backend_contract(served, tmp_path):
    """What vLLM's Transformers backend needs of a remote-code model, checked without vLLM (and without mhmoe):
    auto_map names AutoModel; the base model from the folder's own code supports any attention backend; the
    attention function registered in transformers' AttentionInterface is called by every layer with (module,
    query, key, value, mask) of the model's shapes, the module's layer_idx, and the forward call's extra keyword
    arguments; the base model returns the hidden states (B, L, D) first in its tuple output."""
    _, folder = served
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_mhmoe.MHMoEModel"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    result = subprocess.run(
        [sys.executable, "-c", VLLM_CONTRACT, str(folder)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(".MHMoEModel")
    assert out["supports_attention_backend"] and out["hidden_shape"] == [1, 7, 16] and out["same_as_sdpa"]
    assert out["calls"] == [[i, True, [1, 2, 7, 8], [1, 2, 7, 8], "from vllm"] for i in range(2)]
