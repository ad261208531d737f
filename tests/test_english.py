"""`mhmoe reproduce english` end to end at toy size: every model, the results.json contract, the plots."""

import gzip
import json

import pytest
from conftest import TOY_MODEL, pack_sample

from mhmoe.cli import main
from mhmoe.experiments.common import JobProgress, clock_time
from mhmoe.experiments.english import base as english_base
from mhmoe.experiments.english import models as english_variants
from mhmoe.models.gpt import gpt_cost

SHARED = pack_sample()
TOY = [
    *TOY_MODEL,
    "train.max_steps=4",
    "train.eval_every=2",
    "train.eval_batches=2",
    "train.final_eval_batches=2",
    "train.batch_size=2",
    "data.tokenizer=byte",
]


def test_variants_are_matched():
    base = english_base(quick=True, gpu=False)
    costs = {}
    for v in english_variants(base, "all"):
        base.model.ffn = v.ffn
        costs[v.name] = gpt_cost(base.model)
    assert [v.name for v in english_variants(base)] == ["dense", "smoe", "xmoe", "mhmoe_flops"]
    assert [v.name for v in english_variants(base, "params")] == ["dense", "xmoe", "mhmoe_params"]
    assert abs(costs["mhmoe_params"].params_total / costs["xmoe"].params_total - 1) < 0.01
    assert abs(costs["mhmoe_flops"].flops_per_token / costs["xmoe"].flops_per_token - 1) < 0.02
    assert abs(costs["mhmoe_flops"].params_total / costs["xmoe"].params_total - 1) < 0.05
    assert costs["mhmoe_params"].flops_per_token > 1.5 * costs["xmoe"].flops_per_token


def test_reproduce_english_toy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = gzip.open(SHARED / "english" / "valid.txt.gz", "rt").read()[:40_000]
    for i in range(8):
        (corpus / f"{i}.txt").write_text(text[i * 5000 : (i + 1) * 5000])
    args = [
        "reproduce",
        "english",
        "--quick",
        "--seeds",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--data",
        str(corpus),
        "--no-progress",
    ]
    for item in TOY:
        args += ["--set", item]
    assert main(args) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "english"
    assert set(results["models"]) == {"dense", "smoe", "xmoe", "mhmoe_flops"}
    assert set(results["ood_data"]) == {"udhr-de"}
    keys = {
        "matching",
        "params_total",
        "params_active",
        "flops_per_token",
        "val_ppl",
        "test_ppl",
        "activation_ratio",
        "effective_experts",
        "tokens_seen",
        "train_seconds",
        "seeds",
    }
    for name, model in results["models"].items():
        assert keys <= set(model), name
        assert len(model["seeds"]) == 2 and model["tokens_seen"] == 4 * 2 * 32
        assert model["val_ppl"] > 1
        if name != "dense":
            assert 0 < model["activation_ratio"] <= 1 and 1 <= model["effective_experts"] <= model["num_experts"]
            assert model["activation_ratio_ood"] is not None
    table = (out / "results.md").read_text()
    assert "± " in table and "mhmoe_flops" in table and "| mhmoe_flops | udhr-de |" in table  # a routing row per corpus
    assert results["ood_data"]["udhr-de"].endswith("udhr-de.txt")  # the built-in German text, without --ood-data
    assert results["data"]["source"] == str(corpus) and len(results["data"]["sha256"]) == 64
    assert "perplexity over the first 128 / 128 tokens of the held-out valid / test documents" in table
    assert f"data: {corpus} (sha256 {results['data']['sha256'][:12]}" in table
    assert "Exploratory: paired per-seed differences" in table and "Holm p = " in table
    paired = results["paired"]["val_loss"]
    assert paired["mhmoe_flops"]["baseline"] in ("smoe", "xmoe") and paired["mhmoe_flops"]["vs_dense"]["seeds"] == 2
    assert "vs_dense" not in paired["dense"]
    for name in results["models"]:
        for r in results["models"][name]["seeds"]:
            assert set(r["seconds"]) == {"train", "analysis"} and r["seconds"]["train"]["cpu"] > 0
    assert (out / "val_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "heatmaps" / "mhmoe_flops.png").exists()
    printed = capsys.readouterr().out
    assert "mhmoe_flops" in printed
    assert "== run 1 of 8 (0:00 elapsed, time left known after the first run): dense (seed 0)" in printed
    assert "== run 8 of 8 (" in printed and " left): mhmoe_flops (seed 1)" in printed
    # --tables-only: the statistics and tables again from results.json, nothing trained
    (out / "results.md").write_text("stale")
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert main(["reproduce", "english", "--tables-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == table  # the same statistics from the same per-seed values
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamp
    assert "nothing trained" in capsys.readouterr().out


def test_job_progress_counts_runs_and_estimates_from_trained_ones(tmp_path):
    dirs = [tmp_path / f"run{i}" for i in range(4)]
    dirs[1].mkdir()
    (dirs[1] / "record.json").write_text("{}")  # finished before: reused, not trained again
    now = [100.0]
    progress = JobProgress(dirs, clock=lambda: now[0])
    assert progress.start(dirs[0]) == "run 1 of 4 (0:00 elapsed, time left known after the first run): "
    now[0] += 30  # run 0 trained in 30 s; 3 runs to train were left, 2 now
    assert progress.start(dirs[1]) == "run 2 of 4 (0:30 elapsed, about 1:00 left): "
    now[0] += 1  # run 1 reused: no time, and no change to the estimate
    assert progress.start(dirs[2]) == "run 3 of 4 (0:31 elapsed, about 1:00 left): "
    now[0] += 3580  # run 2 took 3,580 s: the mean of 30 and 3,580 s for the last one
    assert progress.start(dirs[3]) == "run 4 of 4 (1:00:11 elapsed, about 30:05 left): "
    assert clock_time(59.6) == "1:00" and clock_time(7322) == "2:02:02"


def test_tables_only_needs_a_finished_reproduction(tmp_path, capsys):
    assert main(["reproduce", "english", "--tables-only", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{}")
    assert main(["reproduce", "english", "--tables-only", "--out", str(tmp_path)]) == 2
    assert "is not a reproduction's results" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--seeds", "0"], "--seeds must be >= 1")])
def test_reproduce_argument_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        main(["reproduce", "english", *args])


def test_one_seed_reports_no_spread():
    from mhmoe.experiments.common import fmt, mean_std

    assert mean_std([172.7]) == (172.7, None) and fmt(*mean_std([172.7]), seeds=1) == "172.70"
    assert mean_std([1.0, 3.0]) == (2.0, 2**0.5)


def test_out_of_distribution_corpora_are_named_and_read_whole(tmp_path, monkeypatch):
    from mhmoe.data import ByteTokenizer
    from mhmoe.errors import DataError
    from mhmoe.experiments.english import ood_corpora, ood_tokens

    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    small = tmp_path / "fr.test.txt"  # one short document: load_corpus could not split it, it is used whole
    small.write_text("Déclaration universelle des droits de l'homme.")
    folder = tmp_path / "de"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"Dokument {i}.")
    corpora = ood_corpora([f"{small},{folder}", f"other={small}"])
    assert corpora == {"fr": small, "de": folder, "other": small}
    tokens = ood_tokens(corpora, ByteTokenizer())
    assert len(tokens["fr"]) == len(small.read_bytes()) + 1  # every byte and one end of text
    assert len(tokens["de"]) == 3 * (len("Dokument 0.") + 1)
    with pytest.raises(DataError, match="two out-of-distribution corpora are named 'fr'"):
        ood_corpora([str(small), str(small)])
