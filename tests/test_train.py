"""The trainer: exact resume, gradient accumulation, crash-safe checkpoints, non-finite losses,
one-line user errors, and a tiny `mhmoe train` + `eval` + `analyze` run end to end."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pack_sample
from safetensors.torch import load_file

from mhmoe.cli import main
from mhmoe.errors import CheckpointError
from mhmoe.models.gpt import GPT
from mhmoe.train.checkpoint import latest_checkpoint, load_checkpoint, verify
from mhmoe.train.config import apply_overrides, preset
from mhmoe.train.lm import train
from mhmoe.train.loop import TrainingError, lr_at

ENGLISH = pack_sample("english", "valid.txt.gz")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """~100 KB of real English prose in 12 documents (from the sample of the offline data pack)."""
    text = gzip.open(ENGLISH, "rt", encoding="utf-8").read()[:120_000]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    return folder


def tiny(corpus: Path, *overrides: str):
    cfg = preset("cpu-tiny")
    cfg.data.path = str(corpus)
    return apply_overrides(cfg, ["train.eval_batches=2", *overrides])


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


def test_resume_continues_exactly(corpus, tmp_path):
    cfg = tiny(
        corpus,
        "train.max_steps=12",
        "train.checkpoint_every=6",
        "train.log_every=1",
        "train.eval_every=6",
        "model.dropout=0.1",
        "model.ffn.moe.router.kind=xmoe",
        "train.keep_checkpoints=3",
    )
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    # A run that stopped after its step-6 checkpoint: remove what came later, then train again.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000012")
    (cut / "checkpoints" / "latest").write_text("step-00000006\n")
    train(cfg, cut, progress=False)
    assert [r["loss"] for r in records(cut, "loss")] == [r["loss"] for r in records(full, "loss")]
    assert len(records(full, "loss")) == 12
    for name, tensor in weights(full).items():
        assert torch.equal(tensor, weights(cut)[name]), name


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    # The balance loss is a per-micro-batch statistic, so it is switched off for this identity.
    common = ["train.max_steps=3", "model.ffn.moe.balance_loss_coef=0", "train.warmup_steps=0", "train.log_every=1"]
    train(tiny(corpus, *common, "train.batch_size=4", "train.grad_accum=1"), tmp_path / "one", progress=False)
    train(tiny(corpus, *common, "train.batch_size=2", "train.grad_accum=2"), tmp_path / "two", progress=False)
    for a, b in zip(records(tmp_path / "one", "loss"), records(tmp_path / "two", "loss"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the whole gradient, before clipping
    # Adam's first steps move each weight by about ±lr whatever the gradient's size, so a float-rounding
    # difference in a near-zero gradient can still move one weight differently; allow 1/30 of a step.
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-4, msg=name)


def test_crash_while_saving_leaves_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    cfg = tiny(corpus, "train.max_steps=8", "train.checkpoint_every=4")
    import safetensors.torch as st

    original = st.save_file

    def crash_in_second_checkpoint(tensors, filename, *args, **kwargs):
        if "step-00000008" in str(filename) and str(filename).endswith("optimizer.safetensors"):
            Path(filename).write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(st, "save_file", crash_in_second_checkpoint)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train(cfg, run_dir, progress=False)
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step-00000004"
    verify(latest)
    model = GPT(json_config(run_dir))
    assert load_checkpoint(latest, model, None)["step"] == 4
    monkeypatch.setattr(st, "save_file", original)
    result = train(cfg, run_dir, progress=False)  # resumes from step 4 and finishes
    assert result.step == 8


def json_config(run_dir: Path):
    from mhmoe.train.config import RunConfig

    return RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())).model


def test_truncated_and_foreign_checkpoints_are_detected(corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(corpus, "train.max_steps=2", "train.checkpoint_every=2"), run_dir, progress=False)
    latest = latest_checkpoint(run_dir / "checkpoints")
    weights_file = latest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="missing, truncated or altered"):
        verify(latest)
    assert main(["eval", str(run_dir)]) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(CheckpointError, match="not an mhmoe checkpoint"):
        verify(foreign)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(corpus, tmp_path, monkeypatch, policy):
    original = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = original(self, idx, targets)
        calls["n"] += 1
        if calls["n"] == 3 and targets is not None:
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg = tiny(corpus, "train.max_steps=5", f"train.on_nonfinite={policy}", "train.checkpoint_every=2")
    if policy == "stop":
        with pytest.raises(TrainingError, match="non-finite loss or gradient at step 2"):
            train(cfg, tmp_path / "run", progress=False)
        verify(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    else:
        result = train(cfg, tmp_path / "run", progress=False)
        assert result.step == 5 and len(records(tmp_path / "run", "skipped")) == 1
        assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())


def test_lr_schedule():
    cfg = apply_overrides(preset("cpu"), ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    assert lr_at(0, cfg.train) == pytest.approx(cfg.train.lr / 10)
    assert lr_at(9, cfg.train) == pytest.approx(cfg.train.lr)
    assert lr_at(100, cfg.train) == pytest.approx(0.1 * cfg.train.lr)
    apply_overrides(cfg, ["train.schedule=linear"])
    assert lr_at(55, cfg.train) == pytest.approx(cfg.train.lr * (0.1 + 0.9 * 0.5))


def test_cli_train_eval_analyze_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "cpu-tiny",
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "train.max_steps=6",
                "--set",
                "train.eval_batches=2",
            ]
        )
        == 0
    )
    assert "valid ppl" in capsys.readouterr().out
    for name in ("config.json", "env.json", "metrics.csv", "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), name
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env
    assert main(["eval", str(out)]) == 0
    assert "valid: loss" in capsys.readouterr().out
    assert main(["analyze", str(out), "--batches", "2"]) == 0
    report = json.loads((out / "analysis" / "analysis.json").read_text())
    assert 0 < report["valid"]["activation_ratio"] <= 1 and report["valid"]["effective_experts"] >= 1
    for png in ("heatmap-valid.png", "head-usage-valid.png", "divergence-valid.png"):
        assert (out / "analysis" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_cli_resumes_a_run_with_more_steps(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "cpu-tiny",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "train.eval_batches=2",
        "--set",
        "train.checkpoint_every=2",
    ]
    assert main([*args, "--set", "train.max_steps=4"]) == 0
    assert main([*args, "--set", "train.max_steps=6"]) == 0
    assert "step 6" in capsys.readouterr().out
    steps = [r["step"] for r in records(out, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "reproduce" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("missing", ["--data", "{tmp}/nope"], "does not exist"),
        ("latin1", ["--data", "{tmp}/latin1.txt"], "not UTF-8"),
        ("empty", ["--data", "{tmp}/empty.txt"], "empty"),
        ("none", ["--set", "model.ffn.moe.num_expert=3"], "did you mean 'model.ffn.moe.num_experts'"),
        ("none", ["--set", "train.lr=-1"], "train.lr must be > 0"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, setup, args, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    (tmp_path / "empty.txt").write_text("  \n\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["train", "--preset", "cpu-tiny", "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.startswith("mhmoe: error:") and "\n" not in err, err


def test_a_held_out_split_shorter_than_a_window_is_said(corpus, tmp_path, capsys):
    """A one-character validation file still gives a perplexity, over one target: the run says so."""
    data = tmp_path / "split"
    data.mkdir()
    (data / "train.txt").write_text("".join((corpus / f"doc{i:02d}.txt").read_text() for i in range(3)))
    (data / "valid.txt").write_text("x")
    train(tiny(data, "train.max_steps=1"), tmp_path / "run", progress=False)
    assert (
        f"mhmoe: warning: the valid split of {data} has 2 tokens, less than one window of model.seq_len + 1 = 65: "
        "its perplexity says little; hold out more text"
    ) in capsys.readouterr().err


def test_resuming_with_another_model_is_refused(corpus, tmp_path):
    train(tiny(corpus, "train.max_steps=2"), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="different model settings"):
        train(
            tiny(corpus, "train.max_steps=2", "model.d_model=32", "model.n_heads=2"), tmp_path / "run", progress=False
        )
