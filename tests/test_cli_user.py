"""The command line a new user meets: it says what it does (start-up summary, resume, progress on every evaluation,
warnings about the data), and has the next steps after training (eval --max-batches, generate, compare, the
Python `mhmoe.load_run`), a version, keys with meanings and help on every flag."""

import argparse
import gzip
import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import english_documents, pack_sample

import mhmoe
from mhmoe.cli import build_parser, main
from mhmoe.data.corpus import DataWarning, load_corpus
from mhmoe.errors import ConfigError, DataError
from mhmoe.train.config import PRESETS, field_names, preset
from mhmoe.train.keyhelp import key_meanings

TINY = ["--preset", "cpu-tiny", "--set", "train.max_steps=4", "--set", "train.eval_every=2",
        "--set", "train.checkpoint_every=2", "--set", "train.final_eval_batches=2", "--set", "model.d_model=32",
        "--set", "model.ffn.moe.expert_hidden=32", "--set", "train.threads=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~60 KB of English in 12 documents (the pack sample)."""
    return english_documents(tmp_path_factory.mktemp("corpus"), 12, 5_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A tiny run trained by `mhmoe train` (stderr kept), and a second one with a dense FFN."""
    out = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("MHMOE_CACHE", str(out / "cache"))
    logs = {}
    dense = [*TINY[: TINY.index("model.ffn.moe.expert_hidden=32") - 1], *TINY[TINY.index("train.threads=1") - 1 :]]
    for name, flags in (("mh", TINY), ("dense", [*dense, "--set", "model.ffn.kind=dense"])):
        result = subprocess.run(
            [sys.executable, "-m", "mhmoe", "train", *flags, "--data", str(corpus), "--out", str(out / name)],
            capture_output=True, text=True, env={**_env(), "MHMOE_CACHE": str(out / "cache")},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        logs[name] = result
    mp.undo()
    return out, logs


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mhmoe {mhmoe.__version__}"


def _actions(parser: argparse.ArgumentParser, where: str = "mhmoe"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield where, action


def test_every_flag_and_argument_has_help():
    missing = [f"{where} {a.dest}" for where, a in _actions(build_parser()) if not (a.help or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_config_key_has_a_meaning(name):
    meanings = key_meanings(preset(name))
    assert list(meanings) == field_names(preset(name))
    assert not [key for key, text in meanings.items() if not text]


def test_list_keys_prints_values_types_and_meanings(capsys):
    assert main(["train", "--preset", "cpu", "--list-keys"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\.lr +  = 0\.002  \(float\)  peak learning rate of AdamW$", out, re.M)
    assert re.search(
        r"^model\.ffn\.moe\.router\.kind +  = 'xmoe'  \(softmax \| switch \| xmoe \| sigmoid\)  \S", out, re.M
    )
    assert len(out.strip().splitlines()) == len(field_names(preset("cpu"))) + 1


def test_train_says_what_it_does_and_resumes_aloud(trained, corpus):
    out, logs = trained
    err = logs["mh"].stderr
    assert f"mhmoe: run folder {out / 'mh'}" in err
    assert re.search(r"mhmoe: model: [\d,]+ parameters \([\d,]+ active per token\)", err)
    assert re.search(rf"mhmoe: data: {re.escape(str(corpus))} \(sha256 [0-9a-f]{{12}}\): train [\d,]+ tokens", err)
    assert "mhmoe: training 4 steps of 4 sequences" in err
    assert re.search(r"valid: 100%\|", err)  # a progress bar on the final evaluations too
    summary = json.loads((out / "mh" / "summary.json").read_text())
    assert summary["data"]["source"] == str(corpus) and len(summary["data"]["sha256"]) == 64
    assert summary["train_cpu_seconds"] > 0 and summary["test_tokens"] == 2 * 4 * 64
    again = subprocess.run(
        [sys.executable, "-m", "mhmoe", "train", *TINY, "--set", "train.max_steps=6", "--data", str(corpus),
         "--out", str(out / "mh"), "--no-progress"],
        capture_output=True, text=True, env={**_env(), "MHMOE_CACHE": str(out / "cache")},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "mhmoe: resuming from step 4 of 6 (" in again.stderr and "100%|" not in again.stderr


def test_eval_max_batches_reproduces_the_training_summary(trained, capsys):
    out, _ = trained
    run = out / "dense"
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run), "--max-batches", "2"]) == 0
    captured = capsys.readouterr()
    assert (
        f"test: loss {summary['test_loss']:.4f} nats/token, ppl {summary['test_ppl']:.2f}, "
        f"{summary['test_bpb']:.4f} bits/byte over 512 tokens ({summary['test_bytes']:,} bytes)"
    ) in captured.out
    assert "the first 2 batches of each split" in captured.out and "test: 100%|" in captured.err
    assert main(["eval", str(run), "--no-progress"]) == 0
    full = capsys.readouterr()
    assert "all of each split" in full.out and "100%|" not in full.err
    with pytest.raises(SystemExit, match="--max-batches must be >= 0"):
        main(["eval", str(run), "--max-batches", "-1"])


def test_generate_continues_the_prompt_reproducibly(trained, capsys):
    out, _ = trained
    args = ["generate", str(out / "dense"), "--prompt", "The ", "--max-new-tokens", "12", "--top-p", "0.9"]
    assert main(args + ["--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The ") and len(first) > 5
    assert main(args + ["--seed", "1"]) == 0 and capsys.readouterr().out == first
    # past the context (64 tokens) the window slides: all 10 tokens come (the model: tests/test_model.py)
    assert main(["generate", str(out / "dense"), "--prompt", "x" * 60, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("x" * 60)
    assert main(args + ["--top-p", "1.5"]) == 2 and "top_p must be in (0, 1]" in capsys.readouterr().err


def test_load_run_is_public_and_lazy(trained):
    out, _ = trained
    code = "import sys, mhmoe; print(any(m.startswith('mhmoe.train') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env()).stdout == "False\n"
    run = mhmoe.load_run(out / "dense", data=False)
    assert run.splits == {} and run.step == 4
    ids = torch.tensor([run.tokenizer.encode("To be")])
    assert run.model.generate(ids, 5).shape == (1, ids.shape[1] + 5)


def test_compare_prints_a_table_and_plots_curves(trained, tmp_path, capsys):
    out, _ = trained
    plot = tmp_path / "curves.png"
    assert main(["compare", str(out / "mh"), str(out / "dense"), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | layer |") and len(table) == 4
    assert table[2].startswith("| mh | mhmoe 4×2 H=2 |") and table[3].startswith("| dense | dense |")
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(tmp_path)]) == 2 and "has no summary.json" in capsys.readouterr().err


def test_analyze_labels_another_corpus_by_its_name(trained, tmp_path, capsys):
    out, _ = trained
    other = tmp_path / "german"
    other.mkdir()
    german = gzip.open(pack_sample("multilingual", "de.valid.txt.gz"), "rt", encoding="utf-8").read()
    for i in range(4):
        (other / f"{i}.txt").write_text(german[i * 5000 : (i + 1) * 5000])
    assert main(["analyze", str(out / "mh"), "--data", str(other), "--batches", "2"]) == 0
    analysis = out / "mh" / "analysis"
    report = json.loads((analysis / "analysis.json").read_text())
    assert (analysis / "heatmap-german.png").exists() and "german" in report
    # a readable summary: a column per text, each figure as the report has it, labelled
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mh (mhmoe, 4 experts, top-2, H=2), step ") and "first 2 held-out batches" in lines[0]
    assert lines[1].split() == ["validation", "split", "german"]
    valid, other_text = report["valid"], report["german"]

    def row(label: str, *cells: str) -> None:
        pattern = r"\s+".join([re.escape(label), *(re.escape(cell) for cell in cells)])
        assert any(re.fullmatch(pattern, line) for line in lines), (label, cells, lines)

    both = (valid, other_text)
    row("tokens routed", *(f"{r['tokens']:,}" for r in both))
    row("  pooled over the 2 heads", *(f"{r['effective_experts']:.2f} ({r['effective_fraction']:.0%})" for r in both))
    row("  over all choices", *(f"{r['divergence_mean']:.2f} ({r['divergence_chance']:.2f})" for r in both))
    for i, layer in enumerate(valid["per_layer"]):
        row(f"  {layer['name']}", *(f"{r['per_layer'][i]['effective_experts']:.2f}" for r in both))
    assert not any(line.lstrip().startswith("{") for line in lines)
    # --json: the report itself
    assert main(["analyze", str(out / "mh"), "--batches", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((analysis / "analysis.json").read_text()) and set(printed) == {"step", "valid"}


def test_analyze_says_a_dense_run_has_no_routing(trained, capsys):
    out, _ = trained
    assert main(["analyze", str(out / "dense"), "--batches", "1"]) == 0
    assert capsys.readouterr().out.strip().startswith("dense (dense), step ")


def test_a_badly_held_out_corpus_is_warned_about(tmp_path, capsys):
    paragraphs = [f"paragraph {i} " + "word " * 200 for i in range(450)]  # ~1 KB each
    (tmp_path / "one.txt").write_text("\n\n".join(paragraphs[:8]))  # ~9 pieces of the smallest size: too few
    with pytest.warns(DataWarning, match=r"one\.txt: held out .* of the characters: its \d+ documents/pieces"):
        load_corpus(tmp_path / "one.txt")
    (tmp_path / "big.txt").write_text("\n\n".join(paragraphs))  # 450 KB, once 7 chunks of 64 KB: now fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(tmp_path / "big.txt")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        (folder / f"{i}.txt").write_text(paragraphs[i])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(folder)  # 400 documents: close to 5% + 5%, no warning


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_shows_warnings(monkeypatch, capsys, rank, shown):
    from mhmoe import cli

    others: list[str] = []
    monkeypatch.setattr(cli, "_default_showwarning", lambda message, *_: others.append(str(message)))
    monkeypatch.setenv("RANK", rank)  # what torchrun sets in each process
    cli._show_warning(DataWarning("few documents"), DataWarning, "corpus.py", 1)
    cli._show_warning(UserWarning("a torch warning"), UserWarning, "x.py", 2)
    assert ("mhmoe: warning: few documents" in capsys.readouterr().err) is shown
    assert (others == ["a torch warning"]) is shown


@pytest.mark.slow
def test_torchrun_prints_a_data_warning_once(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 200 for i in range(450)]  # few chunks: a held-out warning
    (tmp_path / "one.txt").write_text("\n\n".join(paragraphs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mhmoe", "train",
           "--preset", "cpu-tiny", "--data", str(tmp_path / "one.txt"), "--out", str(tmp_path / "run"),
           "--set", "train.max_steps=2", "--set", "train.final_eval_batches=1", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("mhmoe: warning: ") == 1 and "held out" in done.stderr


@pytest.mark.parametrize("rows, experts", [(2, 4), (1, 2), (6, 64)])
def test_heat_maps_cut_nothing_off(tmp_path, monkeypatch, rows, experts):
    """Every text of a routing heat map (title, axis and colour-bar labels, ticks) lies inside the figure."""
    pytest.importorskip("matplotlib")
    import numpy as np

    from mhmoe.analysis import plots
    from mhmoe.analysis.runs import RELATIVE_SHARE_LABEL, RELATIVE_SHARE_MAX

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    title = "mhmoe_params-seed0 (mhmoe, 8 experts, top-2, H=4): expert share per layer, validation split"
    shares = np.random.default_rng(0).random((rows, experts))
    plots.plot_activation_heatmap(shares, tmp_path / "h.png", title, None, RELATIVE_SHARE_LABEL, RELATIVE_SHARE_MAX)
    (figure,) = figures
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    texts = [t for t in figure.findobj(lambda a: hasattr(a, "get_text")) if t.get_visible() and t.get_text()]
    assert any("expert share" in t.get_text().replace("\n", " ") for t in texts)
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, text.get_text()
        assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, text.get_text()


@pytest.mark.parametrize(
    "env, error, line",
    [
        ({}, ConfigError("bad key"), "mhmoe: error: bad key"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, ConfigError("bad key"), "mhmoe: error: bad key"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, ConfigError("bad key"), None),  # rank 0 says it for every rank
        ({"WORLD_SIZE": "2", "RANK": "1"}, DataError("no data"), "mhmoe: error (rank 1 of 2): no data"),
        ({"WORLD_SIZE": "1", "RANK": "0"}, DataError("no data"), "mhmoe: error: no data"),
    ],
)
def test_under_torchrun_a_config_error_prints_once_and_others_name_their_rank(monkeypatch, env, error, line):
    from mhmoe import cli

    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli._error_line(str(error), error) == line


@pytest.mark.slow
def test_torchrun_prints_a_config_error_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mhmoe", "train",
           "--preset", "cpu-tiny", "--out", str(tmp_path / "run"), "--set", "train.max_steps=0", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode != 0
    assert done.stderr.count("mhmoe: error: ") == 1 and "train.max_steps" in done.stderr, done.stderr[-2000:]
