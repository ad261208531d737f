"""Model folders exported by earlier versions of mhmoe keep loading with identical outputs: with this version's
classes (`import mhmoe.hf`) and with the remote code the folder carries (trust_remote_code, no mhmoe installed).
The fixture was exported by mhmoe at commit 70d22cb (tests/fixtures/hf-export-70d22cb/README.md). Its expected
outputs are float32 results of the machine that made it: compared within float32's rounding over the longest sum
(tests/conftest.py), never bit for bit; the greedy tokens exactly, as no step of them is a near tie."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import FLOAT32_EPS, float32_tolerance  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import mhmoe.hf  # noqa: E402, F401  (registers model_type "mhmoe")

FIXTURE = Path(__file__).parent / "fixtures" / "hf-export-70d22cb"
EXPECTED = load_file(FIXTURE / "expected.safetensors")
STORED = float32_tolerance(reduction=2 * 8 + 257)  # 2 blocks of width 8, the log-softmax over 257 tokens


def test_an_earlier_export_loads_with_identical_outputs():
    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "hf").eval()
    assert type(model).__module__.startswith("mhmoe.hf")  # this version's class, not the folder's code
    ids = EXPECTED["input_ids"]
    with torch.no_grad():
        out = model(ids, labels=ids)
        generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out.logits, EXPECTED["logits"], **STORED)
    torch.testing.assert_close(out.loss, EXPECTED["loss"], **STORED)
    torch.testing.assert_close(out.aux_loss, EXPECTED["aux_loss"], **STORED)
    assert torch.equal(generated, EXPECTED["generated"])
    with torch.no_grad():  # each greedy choice wins by far more than float32 rounding could move it
        top2 = model.double()(generated).logits[0, 3:-1].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e3 * FLOAT32_EPS * top2.abs().max()


def test_an_earlier_export_saves_again_in_todays_layout(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "hf").eval()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")  # was model.lm_head.weight
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(EXPECTED["input_ids"]).logits, EXPECTED["logits"], **STORED)


OWN_CODE = """
import json, sys
sys.modules["mhmoe"] = None  # as where mhmoe is not installed
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, expected = sys.argv[1], load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
difference = (logits - expected["logits"]).abs().max().item()
print(json.dumps({"module": type(model).__module__, "difference": difference}))
"""


def test_an_earlier_export_loads_with_its_own_remote_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    result = subprocess.run(
        [sys.executable, "-c", OWN_CODE, str(FIXTURE / "hf"), str(FIXTURE / "expected.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules.")
    assert out["difference"] <= STORED["atol"] + STORED["rtol"] * EXPECTED["logits"].abs().max().item()
