"""Paired statistics over seeds: Student's t from its own CDF, intervals, resolution, and seeds to resolve."""

import math

import pytest

from mhmoe.analysis.stats import paired_difference, seeds_to_resolve, t_cdf, t_quantile
from mhmoe.experiments.common import paired_markdown, paired_table

# two-sided 95% critical values of Student's t (statistical tables)
T975 = {1: 12.7062047, 2: 4.30265273, 4: 2.77644511, 9: 2.26215716, 30: 2.04227246, 1000: 1.96233908}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_match_the_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], rel=1e-7)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], rel=1e-7)
    assert t_cdf(T975[df], df) == pytest.approx(0.975, abs=1e-9)


def test_paired_difference_by_hand():
    d = paired_difference([1.0, 2.0, 3.0], [0.5, 1.6, 2.4])  # differences 0.5, 0.4, 0.6
    sd = math.sqrt(((0.0) ** 2 + 0.1**2 + 0.1**2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    assert d.mean == pytest.approx(0.5) and d.low == pytest.approx(0.5 - half) and d.high == pytest.approx(0.5 + half)
    assert d.seeds == 3 and d.sign_holds == 3 and d.resolved
    assert d.to_dict()["mean_pct"] == pytest.approx(100 * (math.exp(0.5) - 1))


def test_unresolved_and_single_seed():
    mixed = paired_difference([1.0, 1.0, 1.0, 1.0], [0.9, 1.1, 0.95, 1.08])  # signs disagree
    assert not mixed.resolved and mixed.low < 0 < mixed.high and mixed.sign_holds == 2
    one = paired_difference([2.0], [1.0])
    assert one.low is None and not one.resolved and one.sign_holds == 1
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_seeds_to_resolve():
    assert seeds_to_resolve(0.0, 0.03) == 2
    n = seeds_to_resolve(0.02, math.log(1.03))  # a 3% perplexity difference at a per-seed spread of 0.02 nats
    assert (
        t_quantile(0.975, n - 1) * 0.02 / math.sqrt(n)
        < math.log(1.03)
        <= t_quantile(0.975, n - 2) * 0.02 / math.sqrt(n - 1)
    )


def test_paired_table_compares_with_dense_and_the_best_baseline():
    def model(losses):
        return {"seeds": [{"seed": s, "val_loss": v} for s, v in enumerate(losses)]}

    models = {"dense": model([5.0, 5.1, 5.2]), "smoe": model([4.9, 5.0, 5.1]), "xmoe": model([4.8, 4.95, 5.0]),
              "mhmoe_flops": model([4.7, 4.85, 4.9])}  # fmt: skip
    table = paired_table(models, "val_loss")
    assert table["mhmoe_flops"]["baseline"] == "xmoe"  # the lower mean of the sparse baselines
    assert table["mhmoe_flops"]["vs_baseline"]["mean"] == pytest.approx(-0.1)
    assert table["mhmoe_flops"]["vs_dense"]["sign_holds"] == 3 and table["mhmoe_flops"]["vs_dense"]["resolved"]
    assert "vs_dense" not in table["dense"] and "vs_baseline" not in table["xmoe"]


def test_seeds_for_plans_the_next_run_from_the_observed_spread():
    d = paired_difference([5.00, 5.05, 4.98, 5.10], [5.02, 5.00, 5.01, 5.04])
    sd = math.sqrt(sum((v - d.mean) ** 2 for v in (-0.02, 0.05, -0.03, 0.06)) / 3)
    assert d.sd == pytest.approx(sd)
    assert d.seeds_for(3.0) == seeds_to_resolve(sd, math.log(1.03)) == d.to_dict()["seeds_for_3pct"]
    assert paired_difference([1.0], [2.0]).seeds_for(3.0) is None  # one seed: the spread is unknown


def test_paired_markdown_states_the_interval_sign_count_and_seeds_needed():
    def model(losses):
        return {"seeds": [{"seed": s, "val_loss": v} for s, v in enumerate(losses)]}

    table = paired_table({"dense": model([5.0, 5.1, 5.2]), "xmoe": model([4.8, 4.9, 5.05])}, "val_loss")
    text = paired_markdown(table, "val ppl")
    row = next(line for line in text.splitlines() if line.startswith("| xmoe |"))
    expected = table["xmoe"]["vs_dense"]
    assert f"{expected['mean_pct']:+.1f}%" in row and "signs 3/3 (p = 0.25)" in row and "**resolved**" in row
    assert row.endswith(f"| {expected['seeds_80']}, - |")  # no baseline other than itself


def test_attribution_pairs_list_what_they_change():
    from mhmoe.experiments.common import attribution_markdown, attribution_table

    def model(losses):
        return {"seeds": [{"seed": s, "val_loss": v} for s, v in enumerate(losses)]}

    models = {"smoe": model([5.0, 5.1, 5.0]), "mhmoe_flops_softmax": model([4.9, 5.0, 4.92]),
              "mhmoe_h1": model([4.95, 5.02, 4.97]), "dense": model([5.2, 5.2, 5.2])}  # fmt: skip
    rows = attribution_table(models, "val_loss")
    assert [(r["model"], r["control"]) for r in rows] == [
        ("mhmoe_flops_softmax", "smoe"),
        ("mhmoe_flops_softmax", "mhmoe_h1"),
    ]  # pairs with a model that did not run (smoe_fine, mhmoe_nohm, mhmoe_flops, xmoe) are left out
    assert rows[1]["difference"]["mean"] == pytest.approx((-0.05 - 0.02 - 0.05) / 3)
    text = attribution_markdown(rows, "val ppl")
    assert "| mhmoe_flops_softmax − mhmoe_h1 | 4 heads against 1, given the head and merge layers | the split" in text
    sized = {name: {**m, "num_experts": e, "expert_hidden": 448} for (name, m), e in zip(models.items(), (8, 36, 9, 0))}
    changes = attribution_table(sized, "val_loss")[1]["changes"]
    assert changes.startswith("36 × 448 against 9 × 448; the split (expert input D/4 against D")
    assert attribution_markdown([], "val ppl") == ""


def test_t_test_power_matches_published_values():
    from mhmoe.analysis.stats import t_test_power

    # two-sided 5% paired t-test, effect size d = effect / sd (G*Power's exact noncentral-t values)
    assert t_test_power(10, 1.0, 1.0) == pytest.approx(0.8031, abs=2e-4)
    assert t_test_power(34, 1.0, 0.5) == pytest.approx(0.8078, abs=2e-4)
    assert t_test_power(5, 1.0, 0.0) == pytest.approx(0.05, abs=1e-4)  # no effect: the test's level


def test_seeds_for_power_is_the_first_n_reaching_it():
    from mhmoe.analysis.stats import seeds_for_power, t_test_power

    sd, effect = 0.0354, math.log(1.03)  # the quick English spread of mhmoe_flops − dense
    n = seeds_for_power(sd, effect)
    assert t_test_power(n, sd, effect) >= 0.8 > t_test_power(n - 1, sd, effect)
    assert n > seeds_to_resolve(sd, effect)  # the interval-width figure is a ~50%-power figure
    assert seeds_for_power(1.0, 0.5) == 34


def test_sign_test_and_holm():
    from mhmoe.analysis.stats import holm, sign_test

    assert sign_test(5, 0) == sign_test(0, 5) == pytest.approx(0.0625)  # 5 of 5 seeds alone is not p < 0.05
    assert sign_test(4, 1) == pytest.approx(0.375) and sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # ×3, ×1 made monotone, ×2
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_paired_difference_has_its_p_values():
    d = paired_difference([1.0, 2.0, 3.0], [0.5, 1.6, 2.4])  # differences 0.5, 0.4, 0.6
    t = 0.5 / (0.1 / math.sqrt(3))
    assert d.p == pytest.approx(2 * (1 - t_cdf(t, 2))) and d.p < 0.05
    assert d.sign_p == pytest.approx(0.25)  # 3 of 3
    assert d.to_dict()["seeds_80"] == d.seeds_for_power(3.0)
