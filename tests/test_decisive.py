"""The decisive English part (issue 24): its plan with the primary contrasts, seed-major rounds with results after
each, a part stopped midway and rerun into the same --out giving the results of an uninterrupted run, checkpoints
deleted after analysis, and the exported files within a device session's limits."""

import gzip
import json
import re
import tarfile

import pytest
from conftest import TOY_MODEL, pack_sample

from mhmoe.cli import main
from mhmoe.experiments import english
from mhmoe.experiments.common import PART_SPECS, PRIMARY, PlannedModel
from mhmoe.experiments.plan import (
    Budget,
    ExportLimits,
    Overheads,
    Plan,
    PlanError,
    Rate,
    export,
    gpu_model,
    size_steps,
)

TINY = [
    *TOY_MODEL,
    "model.d_model=64",
    "train.max_steps=3",
    "train.batch_size=2",
    "train.final_eval_batches=2",
    "data.tokenizer=byte",
]


def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = gzip.open(pack_sample() / "english" / "valid.txt.gz", "rt").read()[:40_000]
    for i in range(8):
        (corpus / f"{i}.txt").write_text(text[i * 5000 : (i + 1) * 5000])
    return corpus


def _args(out, corpus, *extra):
    args = ["reproduce", "english", "--gpu", "--part", "decisive", "--device", "cpu", "--seeds", "2",
            "--min-tokens", "0", "--out", str(out), "--data", str(corpus), "--no-progress", *extra]  # fmt: skip
    for item in TINY:
        args += ["--set", item]
    return args


def test_the_decisive_dry_run_declares_its_primary_contrasts_and_fits_a_command(capsys):
    assert main(["reproduce", "english", "--gpu", "--part", "decisive", "--dry-run", "--out", "/nonexistent/x"]) == 0
    text = capsys.readouterr().out
    assert "dense, smoe_fine, mhmoe_flops; 5 seeds, seed-major" in text
    assert "mhmoe_flops − dense" in text and "mhmoe_flops − smoe_fine" in text
    assert "rates ASSUMED" in text and "not measured" in text
    minutes = float(text.split("estimated time: ")[1].split(" min")[0])
    assert minutes <= 8.0  # --budget-min's default, inside one 10-minute command
    tokens = [float(line.split("|")[5].strip().removesuffix(" M")) for line in text.splitlines() if "| 610 |" in line]
    assert len(tokens) == 3 and min(tokens) >= 8.0  # >= 8 M tokens per model


def test_primary_contrasts_are_declared_in_code():
    spec = PART_SPECS["decisive"]
    assert spec.primary == PRIMARY and [(c.model, c.reference) for c in PRIMARY] == [
        ("mhmoe_flops", "dense"),
        ("mhmoe_flops", "smoe_fine"),
    ]
    assert all(c.model in spec.models and c.reference in spec.models for c in spec.primary)


def _planned(name, steps=100, per_step=1000):
    return PlannedModel(name, 1, 1, steps, steps * per_step, 0)


def test_steps_are_sized_to_the_budget_or_the_part_refused():
    budget = Budget("gpu", steps=100, warmup_steps=1, lr=1e-3, eval_every=10, eval_batches=1, min_tokens=50_000)
    plan = Plan("english", PART_SPECS["decisive"], budget, seeds=2, budget_min=1.0)
    planned = [_planned(n) for n in PART_SPECS["decisive"].models]
    todo = {m.name: 2 for m in planned}
    none = Overheads(per_run_s=0.0, fixed_s=0.0)
    fast = [Rate(m.name, 1e6, measured=True) for m in planned]
    assert size_steps(plan, planned, fast, todo, none) == 100  # fits: the budget's steps, never more
    slow = [Rate(m.name, 6_000, measured=True) for m in planned]  # 60 s = 6 runs × steps × 1000 / 6000
    assert size_steps(plan, planned, slow, todo, none) == 60
    with pytest.raises(PlanError, match="does not fit --budget-min 1: .* 6 runs of 50 steps"):
        size_steps(plan, planned, [Rate(m.name, 4_000, measured=True) for m in planned], todo, none)


def test_gpu_names_are_models():
    assert gpu_model("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_model("NVIDIA H200") == "H200"
    assert gpu_model("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_model("NVIDIA GeForce RTX 4090") == "RTX-4090"


def test_export_stays_within_the_limits(tmp_path):
    out, root = tmp_path / "out", tmp_path / "OUT"
    (out / "runs" / "dense-seed0" / "checkpoints").mkdir(parents=True)
    (out / "runs" / "dense-seed0" / "config.json").write_text("{}")
    (out / "runs" / "dense-seed0" / "checkpoints" / "weights.pt").write_bytes(b"x" * 1000)
    (out / "results.json").write_text("{}")
    (out / "results.md").write_text("table")
    (out / "val_curves.png").write_bytes(b"x" * 3000)
    written = export(out, root, "english-decisive", ExportLimits(files=8, file_bytes=2000, depth=2))
    assert sorted(p.name for p in written) == ["results.json", "results.md", "runs.tar.gz"]  # the png is too big
    with tarfile.open(root / "english-decisive" / "runs.tar.gz") as tar:
        assert tar.getnames() == ["runs/dense-seed0/config.json"]  # no checkpoint
    for i in range(6):
        (root / f"bench-{i}.json").write_text("{}")
    written = export(out, root, "english-decisive", ExportLimits(files=8, file_bytes=2000))
    assert len(written) == 2 and len([p for p in root.rglob("*") if p.is_file()]) <= 8
    with pytest.raises(PlanError, match="folders below"):
        export(out, root, "a/b/c", ExportLimits())


def _per_seed(out):
    results = json.loads((out / "results.json").read_text())
    return results, {
        (name, r["seed"]): (r["val_loss"], r["test_loss"]) for name, m in results["models"].items() for r in m["seeds"]
    }


@pytest.mark.slow  # 12 toy runs and 3 smoke steps: about 80 CPU seconds
def test_a_stopped_decisive_part_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path)
    whole, cut, sent = tmp_path / "whole", tmp_path / "cut", tmp_path / "OUT"
    assert main(_args(whole, corpus)) == 0
    # "== run i of N (...): MODEL (seed S) -> DIR", one line per run
    order = re.findall(r"^== run \d+ of 6 .*?: (\S+) \(seed (\d)\)", capsys.readouterr().out, re.M)
    assert order == [("dense", "0"), ("smoe_fine", "0"), ("mhmoe_flops", "0"), ("dense", "1"), ("smoe_fine", "1"),
                     ("mhmoe_flops", "1")]  # seed-major  # fmt: skip

    real, calls = english.lm_run_seed, []

    def stopped_after_four(*args):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the command limit, in the middle of seed round 2
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(english, "lm_run_seed", stopped_after_four)
    assert main(_args(cut, corpus, "--export", str(sent))) == 128 + 2  # stopped as by Ctrl-C (SIGINT)
    first, _ = _per_seed(cut)
    assert first["seeds_finished"] == 1 and first["primary"]["val_loss"]  # round 1 was written when it finished
    assert (sent / "english-decisive" / "results.json").is_file()  # and exported
    monkeypatch.setattr(english, "lm_run_seed", real)
    assert main(_args(cut, corpus, "--export", str(sent))) == 0
    assert "dense (seed 1) finished before" in capsys.readouterr().out  # reused, not trained again

    resumed, resumed_seeds = _per_seed(cut)
    uninterrupted, whole_seeds = _per_seed(whole)
    assert resumed_seeds.keys() == whole_seeds.keys() and len(whole_seeds) == 6
    for key, values in whole_seeds.items():
        assert resumed_seeds[key] == pytest.approx(values, rel=1e-6), key
    for a, b in zip(resumed["primary"]["val_loss"], uninterrupted["primary"]["val_loss"], strict=True):
        assert a["difference"]["mean"] == pytest.approx(b["difference"]["mean"], rel=1e-5, abs=1e-9)
    assert not list(cut.glob("runs/*/checkpoints"))  # deleted once analysed
    files = [p for p in sent.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["results.json", "results.md", "runs.tar.gz", "val_curves.png"]
    assert all(p.stat().st_size <= 16 * 2**20 and len(p.relative_to(sent).parts) <= 3 for p in files)
    table = (cut / "results.md").read_text()
    assert table.startswith("**Primary contrasts**") and "Exploratory" in table


@pytest.mark.slow  # two toy rounds through the shell script, stopped once: about 60 CPU seconds
def test_the_gpu_script_on_the_cpu_stops_resumes_and_sends_back_little(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    _corpus(tmp_path).rename(data / "english")
    root = Path(__file__).resolve().parents[1]
    extra = " ".join(["--seeds 2 --min-tokens 0", *(f"--set {item}" for item in TINY)])
    env = {**os.environ, "OUT": str(tmp_path / "OUT"), "SCRATCH": str(tmp_path / "scratch"), "DATA": str(data),
           "DEVICE": "cpu", "EXTRA": extra, "MHMOE_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    script = ["bash", str(root / "benchmarks" / "gpu_session.sh"), "decisive"]
    first = subprocess.Popen(script, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # fmt: skip
    for line in first.stdout:  # stopped as a command limit would stop it: after round 1, during round 2
        if line.startswith("== round 1/2"):
            os.killpg(first.pid, signal.SIGINT)
            break
    first.wait(timeout=120)
    sent = tmp_path / "OUT" / "english-decisive"
    assert json.loads((sent / "results.json").read_text())["seeds_finished"] == 1  # round 1 came back
    done = subprocess.run(script, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished before" in done.stdout  # the rerun continued from the finished runs
    results = json.loads((sent / "results.json").read_text())
    assert results["seeds_finished"] == 2 and len(results["primary"]["val_loss"]) == 2
    files = [p for p in (tmp_path / "OUT").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["results.json", "results.md", "runs.tar.gz", "val_curves.png"]
    assert all(p.stat().st_size <= 16 * 2**20 and len(p.relative_to(tmp_path / "OUT").parts) <= 3 for p in files)
    with tarfile.open(sent / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert len([n for n in names if n.endswith("/record.json")]) == 6 and not [n for n in names if "checkpoint" in n]
    assert not list((tmp_path / "scratch").rglob("checkpoints/*"))


def test_a_seed_record_is_typed_and_checked():
    from mhmoe.errors import DataError
    from mhmoe.experiments.english import LMSeed

    record = LMSeed(seed=0, val_ppl=2.0, test_ppl=2.1, val_loss=0.69, test_loss=0.74, val_tokens=10, test_tokens=10,
                    tokens_seen=100, train_seconds=1.0, train_cpu_seconds=1.0, data=None, seconds={}, analysis=None,
                    analysis_ood=None, curves={"val_loss": [[1, 0.7]]})  # fmt: skip
    assert LMSeed.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(DataError, match="lacks val_loss"):
        LMSeed.from_dict({k: v for k, v in record.to_dict().items() if k != "val_loss"})


def test_the_v2_part_is_v2_table_1_at_its_width():
    from mhmoe.errors import ConfigError
    from mhmoe.experiments.common import v2_variants
    from mhmoe.models.cost import presets
    from mhmoe.models.ffn import FFNConfig

    def ffn_of(kind, moe):
        return FFNConfig(kind=kind, hidden=3072, moe=moe)

    at_768 = {name: v.ffn.moe for name, v in v2_variants(768, ffn_of).items()}
    table = presets()
    for name, preset in (("v2_smoe", "v2-smoe"), ("v2_fine", "v2-fine-grained"), ("v2_mhmoe_h2", "v2-mhmoe-h2"),
                         ("v2_mhmoe_h3", "v2-mhmoe-h3")):  # fmt: skip
        want = table[preset].moe
        got = at_768[name]
        assert (got.num_experts, got.expert_hidden, got.top_k) == (want.num_experts, want.expert_hidden, want.top_k)
    gpu = english.base(quick=False, gpu=True, part="v2")
    assert gpu.model.d_model == 384 and [v.name for v in english.models(gpu, "v2")] == list(PART_SPECS["v2"].models)
    with pytest.raises(ConfigError, match="divisible by 3"):
        v2_variants(512, ffn_of)


@pytest.mark.parametrize(
    "args,message",
    [
        (["english", "--quick", "--budget-min", "5"], "--budget-min sizes a --gpu part"),
        (["multilingual", "--gpu", "--export", "x"], "--export applies to `reproduce english` only"),
        (["english", "--gpu", "--measure"], "--measure makes --dry-run's estimate"),
    ],
)
def test_settings_that_cannot_take_effect_are_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        main(["reproduce", *args])


def test_a_reused_run_must_share_the_budget(tmp_path):
    from mhmoe.errors import DataError
    from mhmoe.experiments.common import check_same_budget, seed_config

    cfg = english.base(quick=True, gpu=False)
    variant = english.models(cfg)[0]
    run = tmp_path / "dense-seed0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(seed_config(cfg, variant, 0).to_dict()))
    check_same_budget(run, seed_config(cfg, variant, 0))  # the same budget: reused
    longer = seed_config(cfg, variant, 0)
    longer.train.max_steps += 1
    with pytest.raises(DataError, match="another budget \\(train.max_steps differ"):
        check_same_budget(run, longer)
