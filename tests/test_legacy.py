"""Runs and exported models written by mhmoe 0.1 (the flat FFN section, before `MoEConfig`) still load, compute
the same outputs and evaluate to the same numbers. The fixture was written by mhmoe at commit 85334c9
(tests/fixtures/legacy-0.1/README.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FLOAT32_EPS, float32_tolerance

from mhmoe.cli import main
from mhmoe.models.gpt import GPT
from mhmoe.train.checkpoint import load_model_weights, run_checkpoint
from mhmoe.train.config import RunConfig

LEGACY = Path(__file__).parent / "fixtures" / "legacy-0.1"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.fixture
def legacy_run(tmp_path, monkeypatch) -> Path:
    """A copy of the 0.1 run folder, its data path pointed at the fixture's corpus (the run was made elsewhere)."""
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["path"] = str(LEGACY / "corpus")
    (run / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return run


def test_a_0_1_config_becomes_todays(legacy_run):
    with run_checkpoint(legacy_run) as (config, _):
        pass
    assert "num_experts" in config["model"]["ffn"] and "moe" not in config["model"]["ffn"]  # the old layout
    cfg = RunConfig.from_dict(config)
    moe = cfg.model.ffn.moe
    assert (cfg.model.ffn.kind, moe.num_experts, moe.top_k, moe.expert_hidden, moe.num_heads) == ("mhmoe", 4, 2, 8, 2)
    assert (moe.router.kind, moe.router.form, moe.capacity_factor) == ("xmoe", "code", None)  # 0 meant dropless
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def _legacy_model(run: Path) -> GPT:
    with run_checkpoint(run) as (config, checkpoint):
        model = GPT(RunConfig.from_dict(config).model)
        load_model_weights(checkpoint, model)  # strict: every weight has its place
    return model.eval()


# The stored values are float32 results of another machine: compared within float32's rounding over the longest sum
# (the log-softmax over 257 tokens, 2 blocks of width 8), never bit for bit (tests/conftest.py).
STORED = float32_tolerance(reduction=2 * 8 + 257)


def test_a_0_1_checkpoint_gives_the_same_outputs(legacy_run):
    model = _legacy_model(legacy_run)
    ids = torch.tensor(EXPECTED["input_ids"])
    with torch.no_grad():
        out = model(ids, ids)
    assert out.loss.item() == pytest.approx(EXPECTED["loss"], rel=STORED["rtol"])
    assert out.aux_loss.item() == pytest.approx(EXPECTED["aux_loss"], rel=STORED["rtol"])
    logits = out.logits.double()
    assert logits.sum().item() == pytest.approx(EXPECTED["logits_sum"], abs=STORED["atol"] * logits.abs().sum().item())
    torch.testing.assert_close(out.logits[0, 0, :8].tolist(), EXPECTED["logits_first"], **STORED)
    assert out.routing[0].top_experts[:8].tolist() == EXPECTED["top_experts_block0"]  # margins: the next test


def test_the_stored_routing_is_no_near_tie(legacy_run):
    """The routing choices are compared exactly above; they are discrete, so that holds on any CPU only if no choice
    is a near tie that float32 rounding could flip: in float64 every chosen expert beats the first one left out by far
    more than float32's rounding of the scores."""
    model = _legacy_model(legacy_run).double()
    captured = []
    router = model.blocks[0].ffn.moe.router
    handle = router.register_forward_hook(lambda module, args, out: captured.append(out.logits))
    with torch.no_grad():
        model(torch.tensor(EXPECTED["input_ids"]))
    handle.remove()
    ranked = captured[0].sort(dim=-1, descending=True).values  # (S, E): the xmoe scores, monotone in the gates
    margin = (ranked[:, 1] - ranked[:, 2]).abs().min().item()  # top-2: second chosen vs best left out
    assert margin > 1e3 * FLOAT32_EPS * ranked.abs().max().item()


def test_a_0_1_run_evaluates_to_its_summary_and_resumes(legacy_run, capsys):
    summary = json.loads((legacy_run / "summary.json").read_text())
    assert main(["eval", str(legacy_run)]) == 0
    printed = capsys.readouterr().out
    valid, test = (line for line in printed.splitlines() if line.startswith(("valid:", "test:")))
    assert f"ppl {summary['val_ppl']:.2f}," in valid and f"over {summary['val_tokens']:,} tokens" in valid
    assert f"ppl {summary['test_ppl']:.2f}," in test and f"over {summary['test_tokens']:,} tokens" in test
    config = json.loads((legacy_run / "config.json").read_text())
    args = [
        "train",
        "--out",
        str(legacy_run),
        "--preset",
        "cpu-tiny",
        "--no-progress",
        "--data",
        config["data"]["path"],
    ]
    settings = [
        "model.d_model=8",
        "model.n_heads=2",
        "model.seq_len=16",
        "model.ffn.hidden=16",
        "model.ffn.moe.expert_hidden=8",
        "model.ffn.moe.num_experts=4",
        "model.ffn.moe.router.kind=xmoe",
        "model.ffn.moe.router.form=code",
        "model.ffn.moe_every=1",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        "data.held_out=chunks",
    ]  # fmt: skip  (its splits, as runs before pieces drew them)
    assert main(args + [item for kv in settings for item in ("--set", kv)]) == 0  # the 0.1 run accepts today's keys
    assert json.loads((legacy_run / "summary.json").read_text())["step"] == 4


def test_a_0_1_export_loads_with_the_same_logits():
    pytest.importorskip("transformers")
    from mhmoe.hf import MHMoEForCausalLM

    model = MHMoEForCausalLM.from_pretrained(LEGACY / "hf").eval()
    assert model.config.ffn["moe"]["router"] == {**model.config.ffn["moe"]["router"], "kind": "xmoe", "form": "code"}
    ids = torch.tensor(EXPECTED["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits.double()
    assert logits.sum().item() == pytest.approx(EXPECTED["logits_sum"], abs=STORED["atol"] * logits.abs().sum().item())
