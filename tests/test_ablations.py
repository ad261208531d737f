"""`mhmoe reproduce ablations` (heads, head/merge layers, their depth, expert count) and the reproductions' plans
(`--dry-run`): the models are what the sweeps say, at the FLOPs of their X-MoE, and the toy run writes every file."""

import dataclasses
import json

import pytest
from conftest import TOY_MODEL, data_pack, pack_sample

from mhmoe import cli
from mhmoe.cli import main
from mhmoe.experiments import ablations, common, english
from mhmoe.experiments import multilingual as multilingual_experiment
from mhmoe.experiments import multimodal as multimodal_experiment
from mhmoe.experiments.plan import Budget, Overheads, Plan, assumed_rates, plan_markdown
from mhmoe.models.gpt import gpt_cost

SHARED = pack_sample()


def _costs(only=None):
    cfg = ablations.base(quick=True, gpu=False)
    return {v.name: (v, gpt_cost(dataclasses.replace(cfg.model, ffn=v.ffn))) for v in ablations.models(cfg, only)}


def test_every_sweep_model_is_what_its_name_says_at_the_flops_of_its_xmoe():
    costs = _costs()
    assert len(costs) == 19  # shared models (H = 4 with both layers, no layers = depth 0) trained once
    for name, (variant, cost) in costs.items():
        moe = variant.ffn.moe
        assert moe.router.kind == "xmoe", name
        experts = int(name.split("-")[1][1:])
        reference = costs[f"xmoe-e{experts}"][1]
        assert abs(cost.flops_per_token / reference.flops_per_token - 1) < 0.01, name
        if name.startswith("mhmoe"):
            heads, layers = name.split("-")[2:]
            assert variant.ffn.kind == "mhmoe" and moe.num_heads == int(heads[1:])
            assert (moe.multi_head_layers, moe.merge_layers) == (int(layers[2]), int(layers[3]))
            assert moe.num_experts >= experts  # raised for about equal parameters
        else:
            assert variant.ffn.kind == "smoe" and moe.num_experts == experts
    quick = ablations.base(quick=True, gpu=False)
    sweeps = ablations.sweeps(quick.model.d_model)  # the quick D = 192: every head count of v1 and v2
    assert quick.model.d_model == 192 and [label for label, _ in sweeps["heads"]] == [
        f"H = {h}" for h in (1, 2, 3, 4, 6, 8, 12)
    ]
    assert [label for label, _ in ablations.sweeps(128)["heads"]] == ["H = 1", "H = 2", "H = 4", "H = 8"]
    gpu = ablations.base(quick=False, gpu=True)
    assert gpu.model.d_model == 384 and ablations.heads_for(384) == (1, 2, 3, 4, 6, 8, 12)  # v1's and v2's counts
    for variant in ablations.models(gpu, ["heads"]):
        cost = gpt_cost(dataclasses.replace(gpu.model, ffn=variant.ffn))
        xmoe = gpt_cost(dataclasses.replace(gpu.model, ffn=ablations.models(gpu, ["heads"])[0].ffn))
        assert abs(cost.flops_per_token / xmoe.flops_per_token - 1) < 0.01, variant.name  # each at X-MoE's FLOPs
    assert sweeps["depth"][0][1] == sweeps["head_merge"][3][1]  # depth 0 is "neither"
    assert set(_costs(["heads"])) == {"xmoe-e8"} | {name for _, name in sweeps["heads"]}


def test_the_cli_lists_agree_with_the_experiments():
    assert cli.PARTS == common.PARTS
    assert cli.SWEEPS == tuple(ablations.sweeps())
    assert cli.PART_MODELS == {name: spec.models for name, spec in common.PART_SPECS.items()}  # --part's help
    assert set(cli.PART_NOTES) == set(cli.PART_MODELS)
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["reproduce"].format_help().split())
    for part, spec in common.PART_SPECS.items():
        assert f"{part}: {', '.join(spec.models)} (" in help_text, part


def test_reproduce_ablations_toy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    toy = [*TOY_MODEL, "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1", "train.batch_size=2"]
    toy += ["train.final_eval_batches=1", "data.tokenizer=byte"]
    out = tmp_path / "out"
    args = ["reproduce", "ablations", "--quick", "--seeds", "2", "--sweeps", "heads", "--out", str(out)]
    args += ["--data", str(SHARED / "english" / "valid.txt.gz"), "--no-progress"]
    for item in toy:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["sweeps"]) == {"heads"}
    assert set(results["models"]) == {"xmoe-e8"} | {name for _, name in results["sweeps"]["heads"]}
    paired = results["paired"]["val_loss"]
    assert paired["mhmoe-e8-h2-hm11"]["baseline"] == "xmoe-e8"
    assert paired["mhmoe-e8-h2-hm11"]["vs_baseline"]["seeds"] == 2
    assert (out / "sweep-heads.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "results.md").read_text()
    assert "**heads**" in table and "| H = 8 | mhmoe-e8-h8-hm11 |" in table and "vs xmoe-e8" in table
    assert "mhmoe-e8-h8-hm11" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_counts_finished_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reproduce", "english", "--gpu", "--dry-run", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "4 models × 5 seeds" in first and "| mhmoe_flops |" in first and "| 200 | 3.28 M |" in first
    (out / "runs" / "dense-seed0").mkdir(parents=True)
    (out / "runs" / "dense-seed0" / "summary.json").write_text("{}")
    assert main(["reproduce", "english", "--gpu", "--dry-run", "--out", str(out), "--assume-tflops", "50"]) == 0
    second = capsys.readouterr().out
    assert "| dense | 23.1 M | 52.4 | 200 | 3.28 M |" in second and "| 4 |" in second  # 4 seeds left for dense
    assert "rates ASSUMED: 50 TFLOP/s sustained" in second
    assert not out.joinpath("results.json").exists()  # nothing trained


def test_dry_run_without_gpu_estimates_at_the_measured_cpu_rate(tmp_path, capsys):
    assert main(["reproduce", "english", "--quick", "--dry-run", "--out", str(tmp_path / "q")]) == 0
    assert "rates ASSUMED: 0.075 TFLOP/s" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--assume-tflops must be a positive rate.*got 0.0"):
        main(["reproduce", "english", "--quick", "--dry-run", "--assume-tflops", "0"])


def test_plan_estimate_is_the_flops_at_the_stated_rate(tmp_path):
    model = common.PlannedModel("m", 10, flops_per_token=10**6, steps=1, train_tokens=10**9, eval_tokens=10**9)
    budget = Budget("cpu", steps=1, warmup_steps=0, lr=1e-3, eval_every=1, eval_batches=1)
    plan = Plan("x", common.PartSpec("p", ("m",)), budget, seeds=3)
    rates, overheads = assumed_rates([model], 1.0), Overheads(per_run_s=2.0, fixed_s=5.0)
    run = (3e15 + 1e15) / 1e12 + 2.0  # training 3× the forward FLOPs, evaluation 1×, at 1 TFLOP/s; the overhead
    assert rates[0].run_seconds(model, overheads.per_run_s) == pytest.approx(run)
    text = plan_markdown(plan, [model], rates, tmp_path, overheads, "1 TFLOP/s assumed")
    assert f"({5 + 3 * run:.0f} s)" in text and "rates ASSUMED: 1 TFLOP/s assumed" in text


def _minutes_and_steps(text):
    minutes = float(text.split("estimated time: ")[1].split(" min")[0])
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return minutes, {int(row[4]) for row in rows[1:]}


@pytest.mark.parametrize(
    "task,choices",
    [
        ("english", [dict(part=p) for p in ("core", "params", "controls", "heads")]),
        ("multimodal", [dict(part=p) for p in ("core", "params", "controls", "heads")]),
        ("ablations", [dict(only=[s]) for s in ("heads", "head_merge", "depth", "experts")]),
    ],
)
def test_each_gpu_part_fits_its_budget_at_the_assumed_rate(task, choices, tmp_path):
    """At the assumed 100 TFLOP/s no --gpu part is sized down: each ends within --budget-min's default 8 minutes
    at its preset's steps (on the device the smoke step's measured rate decides, `test_gpu_parts`)."""
    experiment = {"english": english, "multimodal": multimodal_experiment, "ablations": ablations}[task]
    seeds = cli.GPU_SEEDS.get(task, 5)
    for choice in choices:
        text = experiment.dry_run(tmp_path / "out", gpu=True, seeds=seeds, **choice)
        minutes, steps = _minutes_and_steps(text)
        assert minutes <= 8.0 and "rates ASSUMED: 100 TFLOP/s" in text, (task, choice, minutes)
        assert len(steps) == 1 and min(steps) >= 200, (task, choice, steps)


@pytest.mark.data_pack
def test_each_multilingual_gpu_part_fits_its_budget_on_the_pack(tmp_path):
    """Multilingual evaluates and analyses every language of the data on its own: its plan needs the corpus."""
    data = str(data_pack("multilingual"))
    for part in ("core", "params", "controls", "heads"):
        text = multilingual_experiment.dry_run(tmp_path / "out", gpu=True, seeds=5, part=part, data=data)
        minutes, steps = _minutes_and_steps(text)
        assert minutes <= 8.0 and steps == {200}, (part, minutes, steps)


def test_reproduce_refuses_options_of_other_tasks():
    with pytest.raises(SystemExit, match="--sweeps applies to `reproduce ablations` only"):
        main(["reproduce", "english", "--sweeps", "heads"])
    with pytest.raises(SystemExit, match="takes --sweeps, not --part"):
        main(["reproduce", "ablations", "--part", "core"])
    with pytest.raises(SystemExit, match="unknown sweep 'width'"):
        main(["reproduce", "ablations", "--sweeps", "heads,width", "--dry-run"])
