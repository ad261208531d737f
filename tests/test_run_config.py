"""`mhmoe train`'s configuration: --config files and --print-config (presets as files to copy), settings that
cannot take effect refused, resume by folder (--resume RUN, or --out RUN alone) and fine-tuning (--init-from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import english_documents
from safetensors.torch import load_file

from mhmoe.cli import main
from mhmoe.train.checkpoint import latest_checkpoint
from mhmoe.train.config import PRESETS, RunConfig, apply_overrides, preset

SMALL = ["--set", "model.d_model=32", "--set", "model.ffn.moe.expert_hidden=32", "--set", "train.threads=1",
         "--set", "train.eval_batches=2", "--set", "train.final_eval_batches=2", "--set", "train.log_every=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    return english_documents(folder, 12, 5_000)


def one_line_error(capsys, argv: list[str], after_start: bool = False) -> str:
    """The error line of a refused command (after_start: it is the last line, after the start-up summary)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    err = err.splitlines()[-1] if after_start else err
    assert err.startswith("mhmoe: error: ") and "\n" not in err, err
    return err


def printed_config(capsys, argv: list[str]) -> str:
    assert main(["train", *argv, "--print-config"]) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_printed_preset_is_a_config_file_that_gives_the_preset_back(name, tmp_path, capsys):
    text = printed_config(capsys, ["--preset", name])
    assert text.startswith(f"# mhmoe train configuration (--preset {name})")
    (tmp_path / "run.yaml").write_text(text)
    # read over another preset, the file still gives the whole of its own back
    other = "paper" if name != "paper" else "cpu-tiny"
    again = printed_config(capsys, ["--preset", other, "--config", str(tmp_path / "run.yaml")])
    assert again.splitlines()[1:] == text.splitlines()[1:]
    import yaml

    printed, whole = yaml.safe_load(text), preset(name).to_dict()
    assert printed["train"] == whole["train"] and printed["model"]["ffn"] == whole["model"]["ffn"]
    if name == "cpu-tiny":  # what a byte tokenizer does not read is left out
        assert "vocab_size" not in printed["data"] and "language_alpha" not in printed["data"]


def test_a_partial_config_file_over_the_preset_and_set_over_the_file(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("train:\n  max_steps: 7\n  lr: 0.01\nmodel:\n  ffn:\n    moe:\n      top_k: 1\n")
    text = printed_config(capsys, ["--preset", "cpu-tiny", "--config", str(tmp_path / "run.yaml"),
                                   "--set", "train.lr=0.02"])  # fmt: skip
    import yaml

    cfg = RunConfig.from_dict(yaml.safe_load(text))
    expected = apply_overrides(preset("cpu-tiny"), ["train.max_steps=7", "model.ffn.moe.top_k=1", "train.lr=0.02"])
    assert cfg == expected


@pytest.mark.parametrize(
    "content,message",
    [
        ("train:\n  max_step: 7\n", "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        ("train:\n  max_steps: many\n", "train.max_steps='many': expected a int"),
        ("train:\n  max_steps: 2.5\n", "train.max_steps='2.5': expected a int"),
        ("train:\n  compile: 3\n", "train.compile='3': expected a bool"),
        ("- 1\n- 2\n", "must hold sections (model:, data:, train:, parallel:)"),
        ("train: [1\n", "is not YAML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    (tmp_path / "run.yaml").write_text(content)
    err = one_line_error(capsys, ["train", "--config", str(tmp_path / "run.yaml"), "--print-config"])
    assert f"--config {tmp_path / 'run.yaml'}" in err and message in err, err


# ------------------------------------------------------------------------ settings that cannot take effect


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.ffn.kind=smoe", "model.ffn.moe.num_heads=4"],
         "model.ffn.moe.num_heads=4 cannot take effect: only model.ffn.kind=mhmoe splits tokens into heads"),
        (["model.ffn.moe.residual=subtoken", "model.ffn.kind=smoe"], "model.ffn.moe.residual=subtoken cannot"),
        (["model.ffn.kind=dense", "model.ffn.moe.num_experts=16"],
         "model.ffn.moe.num_experts=16 cannot take effect: model.ffn.kind=dense has no MoE layer"),
        (["data.tokenizer=byte", "data.vocab_size=512"], "data.vocab_size=512 cannot take effect"),
        (["data.language_alpha=0.7"], "it is for language-tagged data (data.multilingual=true)"),
    ],
)  # fmt: skip
def test_a_setting_that_cannot_take_effect_is_refused(capsys, overrides, message):
    err = one_line_error(capsys, ["train", "--preset", "cpu", *[f"--set={item}" for item in overrides]])
    assert message in err


def test_an_smoe_records_no_multi_head_setting_it_inherits(tmp_path, capsys):
    """A copied preset file whose kind is changed to smoe is fine: what the SMoE does not read is recorded at its
    default (what was trained), not the MH-MoE's value; the same file setting heads for the SMoE is refused."""
    text = printed_config(capsys, ["--preset", "cpu"]).replace("kind: mhmoe", "kind: smoe")
    (tmp_path / "smoe.yaml").write_text(text)
    import yaml

    cfg = yaml.safe_load(printed_config(capsys, ["--config", str(tmp_path / "smoe.yaml")]))
    assert cfg["model"]["ffn"]["kind"] == "smoe" and "num_heads" not in cfg["model"]["ffn"]["moe"]
    assert preset("cpu").model.ffn.moe.num_heads == 4
    (tmp_path / "bad.yaml").write_text(text.replace("num_heads: 4", "num_heads: 2"))
    err = one_line_error(capsys, ["train", "--config", str(tmp_path / "bad.yaml"), "--print-config"])
    assert "model.ffn.moe.num_heads=2 cannot take effect" in err


# -------------------------------------------------------------------------------------- resume by folder


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_resume_by_folder_with_more_steps_ends_where_the_longer_run_does(corpus, tmp_path, capsys):
    """--resume RUN --set train.max_steps=8 after 4 steps gives the weights, bit for bit, of one 8-step run. The
    learning rate is held after warmup (min_lr_ratio=1): a decaying schedule is a function of max_steps, so the
    first 4 steps of a 4-step run decay faster than those of an 8-step one (docs/training.md)."""
    common = ["--preset", "cpu-tiny", "--data", str(corpus), *SMALL, "--set", "train.min_lr_ratio=1",
              "--set", "model.dropout=0.1", "--no-progress"]  # fmt: skip
    assert main(["train", *common, "--set", "train.max_steps=8", "--out", str(tmp_path / "long")]) == 0
    assert main(["train", *common, "--set", "train.max_steps=4", "--out", str(tmp_path / "short")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "short"), "--set", "train.max_steps=6", "--no-progress"]) == 0
    assert "resuming from step 4 of 6" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "short"), "--set", "train.max_steps=8", "--no-progress"]) == 0
    assert "resuming from step 6 of 8" in capsys.readouterr().err
    assert losses(tmp_path / "short") == losses(tmp_path / "long")
    long, short = weights(tmp_path / "long"), weights(tmp_path / "short")
    assert long.keys() == short.keys() and all(torch.equal(long[k], short[k]) for k in long)
    stored = json.loads((tmp_path / "short" / "config.json").read_text())
    assert stored["train"]["max_steps"] == 8 and stored["model"]["d_model"] == 32


def test_resume_refuses_what_is_not_train_with_one_line(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "cpu-tiny", "--data", str(corpus), *SMALL, "--set", "train.max_steps=1",
                 "--out", str(run), "--no-progress"]) == 0  # fmt: skip
    err = one_line_error(capsys, ["train", "--resume", str(run), "--set", "model.n_layers=3"])
    assert f"model.n_layers cannot change when {run} resumes (train.*, parallel.* and data.path can)" in err
    assert f"--init-from {run} --out NEW_FOLDER" in err
    err = one_line_error(capsys, ["train", "--out", str(run), "--set", "data.valid_fraction=0.2"])
    assert "data.valid_fraction cannot change when" in err
    err = one_line_error(capsys, ["train", "--resume", str(run), "--preset", "cpu"])
    assert "takes the run's stored configuration: drop --preset" in err
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=3", "--print-config"]) == 0
    assert ("mhmoe: train.max_steps 1 -> 3: the learning rate decays to step 3 from here on; the steps so far "
            "followed the schedule to 1") in capsys.readouterr().err  # fmt: skip
    err = one_line_error(capsys, ["train", "--resume", str(tmp_path / "nothing")])
    assert "not a run folder (no config.json)" in err


def test_init_from_starts_a_new_run_from_the_weights(corpus, tmp_path, capsys):
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    flags = ["--preset", "cpu-tiny", "--data", str(corpus), *SMALL, "--no-progress"]
    assert main(["train", *flags, "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300",
                 "--set", "train.max_steps=2", "--out", str(source)]) == 0  # fmt: skip
    other = corpus.parent / "other"
    other.mkdir()
    for i in range(3):
        (other / f"{i}.txt").write_text((corpus / f"doc0{i + 3}.txt").read_text()[::-1])
    capsys.readouterr()
    argv = ["train", "--init-from", str(source), "--out", str(tuned), "--data", str(other), "--no-progress",
            "--set", "train.max_steps=1", "--set", "train.lr=1e-9", "--set", "train.warmup_steps=0"]  # fmt: skip
    assert main(argv) == 0
    assert f"starting from the weights of {latest_checkpoint(source / 'checkpoints')}" in capsys.readouterr().err
    before, after = weights(source), weights(tuned)
    for name in before:  # one step at lr 1e-9 (Adam moves each weight by about lr) from the source's weights
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-8, msg=name)
    assert (tuned / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    cfg = json.loads((tuned / "config.json").read_text())
    assert cfg["train"]["init_from"] == str(source) and cfg["data"]["path"] == str(other)
    assert main(["train", "--out", str(tuned), "--set", "train.max_steps=2", "--no-progress"]) == 0  # resumes
    err = one_line_error(capsys, ["train", "--init-from", str(source), "--out", str(tmp_path / "wide"),
                                  "--set", "model.d_model=64"], after_start=True)  # fmt: skip
    assert "weights do not fit this model (size mismatch for " in err
    err = one_line_error(capsys, ["train", "--init-from", str(source)])
    assert "starts a new run: name its folder with --out" in err


# ------------------------------------------------------------------------------------ one number per question


def test_every_validation_figure_says_what_it_covers_and_the_same_question_gives_the_same_number(
    corpus, tmp_path, capsys
):
    """The progress bar's figure (the first train.eval_batches batches of valid at a step), metrics.jsonl's, and
    `mhmoe eval --max-batches train.eval_batches` at that step are one number; the end-of-run line and `eval`
    without a limit cover the whole splits, and each printed figure names the tokens it covers."""
    run = tmp_path / "run"
    argv = ["train", "--preset", "cpu-tiny", "--data", str(corpus), *SMALL, "--set", "train.max_steps=2",
            "--set", "train.eval_every=2", "--set", "train.final_eval_batches=0", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert ("mhmoe: validation every 2 steps on the first 2 batches of the valid split (progress bar, "
            "metrics.jsonl); at the end on all of valid and test (summary.json)") in err  # fmt: skip
    last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_ppl" in r][-1]
    assert last["step"] == 2 and last["val_tokens"] == 2 * 4 * 64
    assert f"val_ppl={last['val_ppl']:.1f} (step 2, first 512 tokens)" in err  # the bar
    summary = json.loads((run / "summary.json").read_text())
    assert (f"valid ppl {summary['val_ppl']:.2f} over {summary['val_tokens']:,} tokens, test ppl "
            f"{summary['test_ppl']:.2f} over {summary['test_tokens']:,} tokens (all of each split)") in out  # fmt: skip
    assert main(["eval", str(run), "--max-batches", "2", "--no-progress"]) == 0
    valid = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("valid:"))
    assert valid.startswith(f"valid: loss {last['val_loss']:.4f} nats/token, ppl {last['val_ppl']:.2f}, ")
    assert valid.endswith("bits/byte over 512 tokens (512 bytes)")  # bits per byte beside it (a byte tokenizer)
    assert main(["eval", str(run), "--no-progress"]) == 0
    valid = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("valid:"))
    assert f"ppl {summary['val_ppl']:.2f}, " in valid and f"over {summary['val_tokens']:,} tokens" in valid
