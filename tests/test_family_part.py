"""The family at equal FLOPs (issue 26): the `reproduce english --part family` models matched by the solvers, one
router kind, their place in the family recorded; the part's plan, primary contrasts and attribution pairs; its dry
run; a tiny plan end to end; presets matched on communication and `mhmoe sizes` printing the family."""

import dataclasses
import json

import pytest
from conftest import pack_sample

from mhmoe.cli import main
from mhmoe.errors import ConfigError
from mhmoe.experiments import english
from mhmoe.experiments.common import (
    ATTRIBUTION,
    FAMILY,
    FAMILY_PRIMARY,
    PART_SPECS,
    family_fields,
    family_variants,
    variants,
)
from mhmoe.layers.config import MoEConfig
from mhmoe.models.cost import (
    V2_SMOE,
    SizeMatchError,
    all_to_all_values_per_token,
    communication_matched,
    flops_matched_latent_moe,
    flops_matched_mhmoe,
    layer_all_to_all_values,
    layer_cost,
    mhmoe_cost,
    presets,
    sparse_moe_cost,
)
from mhmoe.models.ffn import FFNConfig
from mhmoe.models.gpt import gpt_cost

TOLERANCE = 0.05  # the solvers' default


@pytest.mark.parametrize("quick,gpu", [(True, False), (False, True)])
def test_the_family_part_is_matched_on_flops_and_parameters_with_one_router(quick, gpu):
    cfg = english.base(quick, gpu, "family")
    D = cfg.model.d_model
    assert D == (128 if quick else 384)  # --gpu: DECISIVE_SHAPE
    models = {v.name: v for v in english.models(cfg, "family")}
    assert tuple(models) == FAMILY == PART_SPECS["family"].models

    def layer(name):  # the one MoE layer's cost and the whole model's
        v = models[name]
        count = sparse_moe_cost if v.ffn.kind == "smoe" else mhmoe_cost
        return count(v.ffn.moe, d_model=D), gpt_cost(dataclasses.replace(cfg.model, ffn=v.ffn))

    base_layer, base_model = layer("smoe")
    for name in FAMILY:
        cost, model = layer(name)
        assert abs(cost.flops_per_token / base_layer.flops_per_token - 1) <= TOLERANCE, name
        assert abs(cost.params_total / base_layer.params_total - 1) <= TOLERANCE, name
        assert abs(model.flops_per_token / base_model.flops_per_token - 1) <= 0.01, name  # the whole model closer
        assert models[name].ffn.moe.router.kind == "softmax", name  # one router kind across the family
    latent, mh_latent = models["latent_moe"].ffn.moe, models["mh_latent_moe"].ffn.moe
    smoe = models["smoe"].ffn.moe
    assert latent.latent_dim == D // 2 and latent.top_k == 2 * smoe.top_k and models["latent_moe"].ffn.kind == "smoe"
    assert mh_latent.latent_dim == D // 2 and mh_latent.num_heads == 4 and mh_latent.per_head_experts
    mh = models["mhmoe_flops_softmax"].ffn.moe
    assert mh.num_heads == 4 and mh.latent_dim is None and not mh.per_head_experts


def test_the_results_record_each_members_place_in_the_family():
    cfg = english.base(True, False, "family")
    D = cfg.model.d_model
    fields = {v.name: family_fields(v, D) for v in english.models(cfg, "family")}
    smoe_ep = fields["smoe"]["all_to_all_values_ep"]
    assert smoe_ep == all_to_all_values_per_token(MoEConfig(num_experts=8, top_k=2, expert_hidden=512), d_model=D,
                                                  layer="smoe", parallel="expert", size=4)  # fmt: skip
    assert fields["latent_moe"]["all_to_all_values_ep"] == smoe_ep  # the paper's rule: K·α rows of L = D/α
    assert fields["smoe_fine"]["all_to_all_values_ep"] == 4 * smoe_ep  # K·4 rows of D
    mh = fields["mh_latent_moe"]
    assert (mh["latent_dim"], mh["num_heads"], mh["pools"], mh["expert_width"]) == (D // 2, 4, 4, D // 8)
    assert mh["all_to_all_values_hp"] == 2 * (D // 2) * 3 / 4  # exact, whatever K
    assert mh["all_to_all_values_ep"] == 2 * mh["top_k"] * mh["all_to_all_values_hp"] / 2
    assert all(f["all_to_all_values_hp"] is None for name, f in fields.items() if name != "mh_latent_moe")
    assert {f["router"] for f in fields.values()} == {"softmax"}


def test_the_family_declares_its_primary_contrasts_and_attributes_every_pair():
    spec = PART_SPECS["family"]
    assert spec.primary == FAMILY_PRIMARY
    assert [(c.model, c.reference) for c in spec.primary] == [
        ("mh_latent_moe", "latent_moe"),
        ("mhmoe_flops_softmax", "smoe_fine"),
    ]
    pairs = {(model, control) for model, control, _, _ in ATTRIBUTION}
    assert {("latent_moe", "smoe"), ("mh_latent_moe", "latent_moe"), ("mh_latent_moe", "mhmoe_flops_softmax"),
            ("mhmoe_flops_softmax", "smoe"), ("mhmoe_flops_softmax", "smoe_fine")} <= pairs  # fmt: skip
    assert all(m in spec.models and c in spec.models for m, c in pairs if {m, c} <= set(FAMILY))


def test_the_family_refuses_a_width_it_cannot_split():
    ffn = FFNConfig(kind="smoe", hidden=512, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=512))
    with pytest.raises(ConfigError, match="divisible by 8"):
        variants(100, ffn, "family")
    with pytest.raises(ConfigError, match="got 100"):
        family_variants(100, ffn.moe, lambda kind, moe: ffn)


def test_the_family_gpu_dry_run_fits_one_command(capsys):
    assert main(["reproduce", "english", "--gpu", "--part", "family", "--dry-run", "--out", "/nonexistent/x"]) == 0
    text = capsys.readouterr().out
    assert "part family: smoe, smoe_fine, latent_moe, mhmoe_flops_softmax, mh_latent_moe; 5 seeds" in text
    assert "mh_latent_moe − latent_moe" in text and "mhmoe_flops_softmax − smoe_fine" in text
    assert "rates ASSUMED" in text and "not measured" in text
    minutes = float(text.split("estimated time: ")[1].split(" min")[0])
    assert minutes <= 8.0  # --budget-min's default, inside one 10-minute command
    rows = [line for line in text.splitlines() if line.startswith("| ") and "MFLOPs" not in line]
    flops = [float(row.split("|")[3]) for row in rows]
    assert len(rows) == 5 and max(flops) / min(flops) < 1.01


def test_latent_moe_follows_the_papers_rule_and_refuses_what_it_cannot_match():
    smoe = MoEConfig(num_experts=8, top_k=2, expert_hidden=512)
    latent = flops_matched_latent_moe(128, smoe, latent_dim=32, hidden_multiple=32, experts_multiple=2)
    assert (latent.top_k, latent.latent_dim) == (8, 32)  # α = 4
    base, got = sparse_moe_cost(smoe, d_model=128), sparse_moe_cost(latent, d_model=128)
    assert abs(got.flops_per_token / base.flops_per_token - 1) <= TOLERANCE
    assert abs(got.params_total / base.params_total - 1) <= TOLERANCE
    with pytest.raises(SizeMatchError, match=r"latent_dim \(48\) must divide d_model \(128\)"):
        flops_matched_latent_moe(128, smoe, latent_dim=48)
    tiny = MoEConfig(num_experts=2, top_k=1, expert_hidden=4)  # the projections alone outcost the SMoE
    with pytest.raises(SizeMatchError, match="down and up projections alone cost"):
        flops_matched_latent_moe(128, tiny, latent_dim=64)


def test_multi_head_latent_moe_is_sized_by_the_mhmoe_solver():
    config = flops_matched_mhmoe(768, V2_SMOE, num_heads=4, top_k=2, latent_dim=384, per_head_experts=True,
                                 experts_multiple=2)  # fmt: skip
    assert config.per_head_experts and config.latent_dim == 384
    base, got = sparse_moe_cost(V2_SMOE, d_model=768), mhmoe_cost(config, d_model=768)
    assert abs(got.flops_per_token / base.flops_per_token - 1) <= TOLERANCE
    assert abs(got.params_total / base.params_total - 1) <= TOLERANCE
    with pytest.raises(SizeMatchError, match="params_total"):  # 8 experts per pool where 18 are needed
        flops_matched_mhmoe(768, V2_SMOE, num_heads=4, top_k=2, latent_dim=384, per_head_experts=True)


def test_communication_matching_solves_the_latent_width():
    smoe = MoEConfig(num_experts=8, top_k=2, expert_hidden=3072)
    member = dataclasses.replace(smoe, num_heads=4, per_head_experts=True)
    config = communication_matched(768, smoe, member, layer="mhmoe", parallel="head", size=4, experts_multiple=2)
    assert config.latent_dim == 2 * 768  # HP moves 2·L·(P−1)/P, SMoE's EP 2·K·D·(P−1)/P: L = K·D
    target = all_to_all_values_per_token(smoe, d_model=768, layer="smoe", parallel="expert", size=4)
    assert all_to_all_values_per_token(config, d_model=768, layer="mhmoe", parallel="head", size=4) == target
    base, got = sparse_moe_cost(smoe, d_model=768), mhmoe_cost(config, d_model=768)
    assert abs(got.flops_per_token / base.flops_per_token - 1) <= TOLERANCE
    assert abs(got.params_total / base.params_total - 1) <= TOLERANCE
    # under EP the same member moves K·L: L = D at equal top-k
    ep = communication_matched(768, smoe, member, layer="mhmoe", parallel="expert", size=4, experts_multiple=1)
    assert ep.latent_dim == 768
    # LatentMoE with 4× the top-k: L = D/4
    latent = dataclasses.replace(smoe, top_k=8, num_experts=32)
    lat = communication_matched(768, smoe, latent, layer="smoe", parallel="expert", size=4, experts_multiple=2)
    assert lat.latent_dim == 192


def test_communication_matching_refuses_what_no_size_meets():
    smoe = MoEConfig(num_experts=8, top_k=2, expert_hidden=64)
    member = dataclasses.replace(smoe, num_heads=4, per_head_experts=True)
    with pytest.raises(SizeMatchError, match="send nothing"):
        communication_matched(768, smoe, member, layer="mhmoe", parallel="head", size=1)
    with pytest.raises(SizeMatchError, match="exact latent width is ≈ 20"):  # L = K·D = 20 is no multiple of 32
        communication_matched(10, smoe, member, layer="mhmoe", parallel="head", size=4, latent_multiple=32)
    with pytest.raises(SizeMatchError, match="costs .* beside the experts"):  # L = 2·D: the head layer outcosts
        communication_matched(768, smoe, member, layer="mhmoe", parallel="head", size=4)


def test_the_family_presets_are_matched_and_their_traffic_is_the_counters():
    table = presets()
    base = layer_cost(table["v2-smoe"])
    for name in ("latent-moe", "mh-latent-moe-h4", "mh-latent-moe-h4-hp-comm"):
        cost = layer_cost(table[name])
        assert abs(cost.flops_per_token / base.flops_per_token - 1) <= TOLERANCE, name
        assert abs(cost.params_total / base.params_total - 1) <= TOLERANCE, name
    smoe_ep = layer_all_to_all_values(table["v2-smoe"], "expert", 4)
    assert layer_all_to_all_values(table["mh-latent-moe-h4-hp-comm"], "head", 4) == smoe_ep
    assert layer_all_to_all_values(table["v2-smoe"], "head", 4) is None  # no pools to place
    assert layer_all_to_all_values(table["mh-latent-moe-h4"], "head", 8) is None  # 8 ranks, 4 heads
    assert layer_all_to_all_values(table["v1-dense"], "expert", 4) is None


def test_sizes_prints_the_family_with_its_all_to_all_bytes(capsys):
    assert main(["sizes"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| mh-latent-moe-h4-hp-comm |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    spec = presets()["mh-latent-moe-h4-hp-comm"]
    assert cells[6:8] == ["768", "4"]  # latent, pools
    assert float(cells[-1]) == pytest.approx(layer_all_to_all_values(spec, "head", 4) * 2 / 1024, abs=0.005)
    v2 = next(line for line in out.splitlines() if line.startswith("| v2-smoe |"))
    assert v2.split("|")[-2].strip() == "-" and cells[-1] == v2.split("|")[-3].strip()  # HP = SMoE's EP


def test_sizes_refuses_one_rank():
    with pytest.raises(SystemExit, match="--ranks must be at least 2"):
        main(["sizes", "--ranks", "1"])


TINY = [
    "model.d_model=64",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.seq_len=32",
    "model.ffn.hidden=128",
    "model.ffn.moe.expert_hidden=128",
    "model.ffn.moe.num_experts=8",
    "train.max_steps=3",
    "train.batch_size=2",
    "train.final_eval_batches=2",
    "data.tokenizer=byte",
]


@pytest.mark.slow  # 10 toy runs with their routing analyses: about 25 CPU seconds
def test_a_tiny_family_part_runs_end_to_end(tmp_path, monkeypatch, capsys):
    import gzip

    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = gzip.open(pack_sample() / "english" / "valid.txt.gz", "rt").read()[:40_000]
    for i in range(8):
        (corpus / f"{i}.txt").write_text(text[i * 5000 : (i + 1) * 5000])
    out = tmp_path / "out"
    args = ["reproduce", "english", "--part", "family", "--seeds", "2", "--out", str(out), "--data", str(corpus),
            "--no-progress"]  # fmt: skip
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["part"] == "family" and results["seeds_finished"] == 2 and tuple(results["models"]) == FAMILY
    for name, model in results["models"].items():  # the sizes of the models as trained (vocabulary: bytes, 257)
        summary = json.loads((out / "runs" / f"{name}-seed0" / "summary.json").read_text())
        assert (model["params_total"], model["flops_per_token"]) == (
            summary["params_total"],
            summary["flops_per_token"],
        )
    mh = results["models"]["mh_latent_moe"]
    assert (mh["latent_dim"], mh["num_heads"], mh["pools"], mh["router"]) == (32, 4, 4, "softmax")
    assert mh["all_to_all_values_hp"] == 2 * 32 * 3 / 4 and results["models"]["smoe"]["all_to_all_values_hp"] is None
    assert [(r["model"], r["reference"]) for r in results["primary"]["val_loss"]] == [
        (c.model, c.reference) for c in FAMILY_PRIMARY
    ]
    attributed = {(r["model"], r["control"]) for r in results["attribution"]["val_loss"]}
    assert ("latent_moe", "smoe") in attributed and ("mh_latent_moe", "mhmoe_flops_softmax") in attributed
    table = (out / "results.md").read_text()
    assert table.startswith("**Primary contrasts**") and "**The family's layers**" in table
    assert results["holm_family"]["val_loss"] >= 5


def test_a_tiny_family_plan_prints_its_models_at_equal_flops(capsys, tmp_path):
    args = ["reproduce", "english", "--part", "family", "--seeds", "2", "--dry-run", "--out", str(tmp_path / "x")]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    assert set(FAMILY) <= set(rows)
    flops = [float(rows[name][3]) for name in FAMILY]
    assert max(flops) / min(flops) < 1.05 and all(rows[name][4].strip() == "3" for name in FAMILY)  # steps
    assert (
        "rates ASSUMED" in text and "primary contrasts (declared before any run, not adjusted): mh_latent_moe" in text
    )


def test_a_family_member_that_cannot_be_sized_is_one_line(capsys, tmp_path):
    args = ["reproduce", "english", "--part", "family", "--dry-run", "--out", str(tmp_path / "x"),
            "--set", "model.d_model=64", "--set", "model.ffn.moe.num_experts=4", "--set", "model.ffn.moe.expert_hidden=64"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhmoe: error: ") and "SMoE's" in err and "Traceback" not in err
