"""Every `--gpu` reproduction starts with the smoke and rate step (issue 24, item 2): a few steps of each model on
the device with a finite loss, the measured tokens/s printed, and the part's steps sized to end within
--budget-min or the part refused with the reason; `--dry-run` says whether its figure is measured or assumed.
Here on the CPU (`--device cpu`) with tiny `--gpu`-shaped plans of every task."""

import gzip
import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import TOY_MODEL, pack_sample

from mhmoe.cli import main
from mhmoe.experiments import ablations, english
from mhmoe.experiments.common import Variant
from mhmoe.experiments.multilingual import experiment as multilingual
from mhmoe.experiments.multimodal import experiment as multimodal
from mhmoe.experiments.plan import Options, PlanError, SmokeModel, measure_rates
from mhmoe.models.ffn import FFNConfig
from mhmoe.train.config import TrainConfig

LM_TOY = [*TOY_MODEL, "train.batch_size=2", "train.eval_batches=1", "train.final_eval_batches=1",
          "data.tokenizer=byte"]  # fmt: skip
MASKED_TOY = ["data.tokenizer=byte", "data.fashion_limit=100", "model.d_model=32", "model.n_layers=2",
              "model.n_heads=2", "model.max_text_len=16", "data.caption_len=12", "model.patch_size=8",
              "model.codebook_size=16", "model.ffn.hidden=64", "model.ffn.moe.expert_hidden=64",
              "model.ffn.moe.num_experts=4", "train.batch_size=4", "train.eval_batches=1", "train.final_eval_batches=1",
              "analysis.snapshots=2", "analysis.display_images=2", "analysis.max_batches=1"]  # fmt: skip
TASKS = {  # task: (its arguments, its toy overrides)
    "english": (["--part", "core"], LM_TOY),
    "multilingual": (["--part", "core", "--data", "LANGUAGES"], LM_TOY),  # `languages`, written per module
    "multimodal": (["--part", "core"], MASKED_TOY),
    "ablations": (["--sweeps", "heads"], LM_TOY),
}


@pytest.fixture(scope="module", autouse=True)
def languages(tmp_path_factory):
    """Three languages of the pack sample as <lang>.txt files (split into train / valid / test by fraction)."""
    folder = tmp_path_factory.mktemp("languages")
    for lang in ("en", "de", "es"):
        text = gzip.open(pack_sample("multilingual", f"{lang}.valid.txt.gz"), "rt", encoding="utf-8").read()
        (folder / f"{lang}.txt").write_text(text[:30_000], encoding="utf-8")
    TASKS["multilingual"][0][-1] = str(folder)
    return folder


def _args(task, out, *extra, steps=None):
    choice, toy = TASKS[task]
    args = ["reproduce", task, "--gpu", "--device", "cpu", "--seeds", "1", "--out", str(out), *choice, *extra]
    for item in toy + ([f"train.max_steps={steps}", f"train.eval_every={steps}"] if steps else []):
        args += ["--set", item]
    return args


def _table(text):
    """{model: steps} of a printed plan."""
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {row[1].strip(): int(row[4]) for row in rows if row[1].strip() != "model"}


@pytest.mark.parametrize("task", list(TASKS))
def test_a_gpu_dry_run_measures_every_model_and_sizes_its_steps(task, tmp_path, capsys):
    assert main(_args(task, tmp_path / "out", "--dry-run", "--measure", "--budget-min", "5", steps=10**5)) == 0
    text = capsys.readouterr().out
    steps = _table(text)
    smoked = re.findall(
        r"^smoke (\S+) on cpu: \d+ steps, loss [\d.]+ \(finite\), [\d,]+ tokens/s measured$", text, re.M
    )
    assert smoked == list(steps) and steps  # every model of the part, in its order
    assert "rates MEASURED: the smoke step on cpu" in text
    assert len(set(steps.values())) == 1 and 1 <= next(iter(steps.values())) < 10**5  # sized down, all alike
    assert float(text.split("estimated time: ")[1].split(" min")[0]) <= 5.0
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize("task", list(TASKS))
def test_a_gpu_part_that_cannot_fit_is_refused_with_the_reason(task, tmp_path, capsys):
    # 0.1 min is below the invocation's assumed overhead alone: not even one step per run fits
    assert main(_args(task, tmp_path / "out", "--dry-run", "--budget-min", "0.1")) == 2
    error = capsys.readouterr().err
    assert "does not fit --budget-min 0.1: at the assumed rates" in error and "1 step (the part has no" in error
    assert "pass fewer --seeds or a larger --budget-min" in error


def test_the_dry_run_says_its_rates_are_assumed_without_a_measurement(tmp_path, capsys):
    for task in TASKS:
        assert main(_args(task, tmp_path / "out", "--dry-run")) == 0
        text = capsys.readouterr().out
        assert "rates ASSUMED: 100 TFLOP/s sustained from FLOPs" in text and "not measured" in text, task
        assert "smoke " not in text
    assert main(_args("multimodal", tmp_path / "out", "--dry-run", "--assume-tflops", "20")) == 0
    assert "rates ASSUMED: 20 TFLOP/s" in capsys.readouterr().out


def _setups(languages):
    options = Options(device="cpu")
    overrides = TASKS["english"][1]
    plan, cfg = english.make_plan(False, True, "core", 1, overrides, options)
    yield english.lm_setup(plan, cfg, english.models(cfg, "core"), 0, True)
    yield multilingual.setup(False, True, 1, overrides, "core", 0, str(languages), options)[0]
    yield ablations.setup(False, True, 1, overrides, ["heads"], options)[0]
    yield multimodal.setup(False, True, 1, MASKED_TOY, "core", options)[0]


def test_the_smoke_step_trains_the_tokens_of_a_planned_step(languages):
    """The measured rate is in the plan's units: a smoke step holds exactly the training tokens of one planned
    step (text windows, images and pairs for multimodal), so time = tokens / rate."""
    for setup in _setups(languages):
        for variant, planned in zip(setup.variants, setup.planned(), strict=True):
            built = setup.smoke(variant, torch.device("cpu"))
            assert built.tokens * planned.steps == planned.train_tokens, (setup.plan.task, variant.name)
            assert sum(p.numel() for p in built.model.parameters()) == planned.params_total, variant.name


def test_a_non_finite_smoke_loss_names_the_model():
    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return SimpleNamespace(loss=self.w * x.sum() * float("inf"), aux_loss=self.w * 0)

    def smoke(variant, device):
        return SmokeModel(Diverged(), [dict(x=torch.ones(2))], tokens=2)

    variant = Variant("broken", "baseline", FFNConfig(kind="dense"))
    with pytest.raises(PlanError, match="smoke step 0 of broken on cpu gave a non-finite loss"):
        measure_rates([variant], smoke, TrainConfig(device="cpu"))


@pytest.mark.slow  # the smoke step and 5 toy runs: about 20 CPU seconds
def test_a_gpu_ablations_part_runs_at_its_sized_steps_and_records_its_rates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    data = ["--data", str(pack_sample("english", "valid.txt.gz")), "--no-progress"]
    assert main(_args("ablations", out, *data, "--budget-min", "5", steps=4)) == 0
    printed = capsys.readouterr().out
    assert printed.count("tokens/s measured") == 5 and "rates MEASURED" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["budget"]["steps"] == 4 and results["plan"]["budget_min"] == 5.0
    assert all(rate["measured"] and rate["tokens_per_s"] > 0 for rate in results["rates"])
    assert {m["tokens_seen"] for m in results["models"].values()} == {4 * 2 * 32}  # 4 steps of 2 × 32 tokens
    assert json.loads((out / "plan-heads.json").read_text())["budget"]["steps"] == 4  # a rerun continues with it
    assert not list(out.rglob("checkpoints/*"))  # deleted after analysis (no --keep-checkpoints)


@pytest.mark.slow  # the smoke step and 4 toy multiway runs: about 30 CPU seconds
def test_a_gpu_multimodal_part_runs_after_its_smoke_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    text = tmp_path / "text"
    text.mkdir()
    (text / "0.txt").write_text(gzip.open(pack_sample("english", "valid.txt.gz"), "rt").read()[:20_000])
    extra = ["--data", str(pack_sample()), "--no-progress", "--set", f"data.text={text}", "--set", "train.eval_every=2"]
    assert main(_args("multimodal", out, *extra, steps=2)) == 0
    assert capsys.readouterr().out.count("tokens/s measured") == 4
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["task"] == "multimodal" and results["plan"]["budget"]["steps"] == 2
    assert [r["model"] for r in results["rates"]] == ["dense", "smoe", "xmoe", "mhmoe_flops"]
    assert all(m["seeds"][0]["val_ppl"] > 1 for m in results["models"].values())


@pytest.mark.slow  # the script's ablations part on the CPU: the smoke step and 5 toy runs, about 25 CPU seconds
def test_the_gpu_script_runs_a_sized_ablations_part_on_the_cpu(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    (data / "english").mkdir(parents=True)
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt").read()[:40_000]
    for i in range(8):
        (data / "english" / f"{i}.txt").write_text(text[i * 5000 : (i + 1) * 5000])
    toy = [*LM_TOY, "train.max_steps=3", "train.eval_every=3"]
    extra = " ".join(["--seeds 1 --budget-min 5", *(f"--set {item}" for item in toy)])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "OUT"), "SCRATCH": str(tmp_path / "scratch"), "DATA": str(data),
           "DEVICE": "cpu", "EXTRA": extra, "MHMOE_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), "ablations"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("tokens/s measured") == 5 and "rates MEASURED: the smoke step on cpu" in done.stdout
    files = sorted(p.relative_to(tmp_path / "OUT").as_posix() for p in (tmp_path / "OUT").rglob("*") if p.is_file())
    assert files == ["ablations/results.json", "ablations/results.md"]
    results = json.loads((tmp_path / "OUT" / "ablations" / "results.json").read_text())
    assert results["plan"]["budget"]["steps"] == 3 and all(rate["measured"] for rate in results["rates"])
    assert not list((tmp_path / "scratch").rglob("checkpoints/*"))
