"""Routing metrics equal hand-computed values on hand-made routing; plots write readable PNGs.

Hand-made layer used below (E = 4, H = 2, K = 1, T = 3), rows token-major (row i·H + j):
    token 0: sub-tokens -> experts 0, 1     token 1: 0, 0     token 2: 2, 0
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhmoe import MHMoE, SparseMoE
from mhmoe.analysis import (
    DEFAULT_ACTIVATION_THRESHOLD,
    LayerRouting,
    activation_ratio,
    effective_experts,
    effective_fraction,
    expert_shares,
    head_usage,
    mean_divergence,
    selection_ratio,
    subtoken_divergence,
    summarize,
)
from mhmoe.analysis.plots import (
    plot_activation_heatmap,
    plot_curves,
    plot_divergence_histogram,
    plot_head_usage,
    plot_patch_divergence,
)
from mhmoe.analysis.routing import (
    chance_divergence,
    effective_experts_per_head,
    head_selection,
    relative_activation_ratio,
    token_selection_ratio,
    uniform_ratio,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hand_layer(name: str = "hand") -> LayerRouting:
    return LayerRouting(np.array([[0], [1], [0], [0], [2], [0]]), num_heads=2, num_experts=4, name=name)


def one_expert_layer(num_experts: int = 4) -> LayerRouting:
    return LayerRouting(np.zeros((10, 1), dtype=np.int64), num_heads=1, num_experts=num_experts)


# ---- hand-computed values -------------------------------------------------------------------------------------


def test_hand_made_shares_and_selection_ratio():
    layer = hand_layer()
    np.testing.assert_allclose(expert_shares(layer), [4 / 6, 1 / 6, 1 / 6, 0])
    np.testing.assert_allclose(selection_ratio(layer), [4 / 6, 1 / 6, 1 / 6, 0])  # K = 1: the same
    np.testing.assert_allclose(expert_shares(layer, first_choice_only=True), [4 / 6, 1 / 6, 1 / 6, 0])


def test_hand_made_effective_experts_is_exp_entropy():
    p = [4 / 6, 1 / 6, 1 / 6]
    expected = math.exp(-sum(q * math.log(q) for q in p))
    assert effective_experts(hand_layer()) == pytest.approx(expected, rel=1e-12)
    assert effective_fraction(hand_layer()) == pytest.approx(expected / 4, rel=1e-12)


def test_hand_made_head_usage():
    # head 0: rows 0, 2, 4 -> experts 0, 0, 2; head 1: rows 1, 3, 5 -> experts 1, 0, 0
    np.testing.assert_allclose(head_usage(hand_layer()), [[2 / 3, 0, 1 / 3, 0], [2 / 3, 1 / 3, 0, 0]])


def test_hand_made_divergence():
    divergence = subtoken_divergence(hand_layer())
    assert divergence.tolist() == [2, 1, 2]
    assert np.issubdtype(divergence.dtype, np.integer)


def test_hand_made_activation_ratio():
    assert activation_ratio([hand_layer()]) == 3 / 4  # experts 0, 1, 2 exceed 1%; expert 3 is unused
    assert activation_ratio([hand_layer()], threshold=0.5) == 1 / 4


def test_top2_counts_both_choices():
    # E = 4, H = 2, K = 2, T = 2: token 0 reaches {0, 1, 2}, token 1 reaches {0, 3}
    layer = LayerRouting(np.array([[0, 1], [1, 2], [3, 0], [0, 3]]), num_heads=2, num_experts=4)
    assert subtoken_divergence(layer).tolist() == [3, 2]
    np.testing.assert_allclose(selection_ratio(layer), [3 / 4, 2 / 4, 1 / 4, 2 / 4])  # sums to K = 2
    np.testing.assert_allclose(expert_shares(layer), [3 / 8, 2 / 8, 1 / 8, 2 / 8])
    np.testing.assert_allclose(expert_shares(layer, first_choice_only=True), [2 / 4, 1 / 4, 0, 1 / 4])
    np.testing.assert_allclose(head_usage(layer), [[2 / 4, 1 / 4, 0, 1 / 4], [1 / 4, 1 / 4, 1 / 4, 1 / 4]])


def test_uniform_routing_has_all_experts_effective():
    layer = LayerRouting(np.tile(np.arange(8), 5).reshape(-1, 1), num_heads=1, num_experts=8)
    assert effective_experts(layer) == pytest.approx(8, rel=1e-12)
    assert effective_fraction(layer) == pytest.approx(1, rel=1e-12)
    assert activation_ratio([layer]) == 1.0


def test_one_expert_takes_all():
    layer = one_expert_layer(num_experts=4)
    assert effective_experts(layer) == 1.0
    for threshold in (0.0, 0.01, 0.5, 0.999):
        assert activation_ratio([layer], threshold) == 1 / 4
    assert activation_ratio([layer], threshold=1.0) == 0.0  # ratio 1 does not strictly exceed 1


def test_threshold_is_strict_at_the_boundary():
    layer = hand_layer()
    boundary = selection_ratio(layer)[1]  # experts 1 and 2 sit exactly at 1/6
    assert activation_ratio([layer], threshold=boundary) == 1 / 4
    assert activation_ratio([layer], threshold=np.nextafter(boundary, 0)) == 3 / 4


def test_activation_ratio_pools_cells_over_layers():
    assert activation_ratio([hand_layer(), one_expert_layer()]) == (3 + 1) / 8


def test_mean_divergence_averages_layers():
    other = LayerRouting(np.array([[3], [3], [1], [2], [0], [0]]), num_heads=2, num_experts=4)  # 1, 2, 1
    np.testing.assert_allclose(mean_divergence([hand_layer(), other]), [1.5, 1.5, 1.5])


def test_summarize_is_plain_json():
    summary = summarize([hand_layer("a"), hand_layer("b")])
    assert json.loads(json.dumps(summary)) == summary
    assert summary["threshold"] == DEFAULT_ACTIVATION_THRESHOLD
    assert summary["activation_ratio"] == 3 / 4
    assert summary["effective_experts"] == pytest.approx(effective_experts(hand_layer()))
    assert summary["divergence_mean"] == pytest.approx(5 / 3)
    per_head = effective_experts_per_head(hand_layer()).tolist()
    assert summary["per_layer"][1] == dict(
        name="b", effective_experts=effective_experts(hand_layer()), effective_experts_per_head=per_head,
        max_share=4 / 6, min_share=0.0,
    )  # fmt: skip
    scalars = [v for k, v in summary.items() if k != "per_layer"]
    scalars += [
        v for row in summary["per_layer"] for k, v in row.items() if k not in ("name", "effective_experts_per_head")
    ]
    assert all(type(v) is float for v in scalars)
    assert all(type(v) is float for row in summary["per_layer"] for v in row["effective_experts_per_head"])


# ---- metrics that cannot flatter: hand-made routings whose answer is known ----------------------------------------


def disjoint_heads(tokens: int = 40, top_k: int = 1) -> LayerRouting:
    """H = 4 heads, E = 8: head h only ever uses experts 2h and 2h + 1 (alternating over tokens, or both at K = 2)."""
    rows = []
    for t in range(tokens):
        for h in range(4):
            pair = [2 * h, 2 * h + 1]
            rows.append(pair if top_k == 2 else [pair[t % 2]])
    return LayerRouting(np.array(rows), num_heads=4, num_experts=8)


def test_four_heads_on_four_disjoint_expert_sets_look_even_only_when_pooled():
    layer = disjoint_heads()
    assert effective_experts(layer) == pytest.approx(8)  # pooled: every expert takes 1/8 of the assignments
    np.testing.assert_allclose(effective_experts_per_head(layer), [2, 2, 2, 2])  # each head: two experts
    summary = summarize([layer])
    assert summary["effective_fraction"] == pytest.approx(1) and summary["effective_fraction_head"] == pytest.approx(
        0.25
    )


def test_divergence_is_read_against_its_chance_value():
    # disjoint heads: 4 distinct first choices per token, exactly what independent heads at these rates give
    layer = disjoint_heads()
    assert (subtoken_divergence(layer, first_choice_only=True) == 4).all()
    np.testing.assert_allclose(head_selection(layer, True)[0], [0.5, 0.5, 0, 0, 0, 0, 0, 0])
    assert chance_divergence(layer, first_choice_only=True) == pytest.approx(8 * 0.5)
    # all K = 2 choices saturate at min(E, H·K) = 8 whatever the routing; so does the chance value here
    both = disjoint_heads(top_k=2)
    assert (subtoken_divergence(both) == 8).all() and chance_divergence(both) == pytest.approx(8)
    # every sub-token of a token to the same expert: divergence 1, far below chance at uniform rates
    same = LayerRouting(np.repeat(np.arange(40) % 8, 4)[:, None], num_heads=4, num_experts=8)
    assert (subtoken_divergence(same, True) == 1).all()
    assert chance_divergence(same, True) == pytest.approx(8 * (1 - (7 / 8) ** 4))


def test_chance_divergence_matches_independent_uniform_routing():
    """E = 8, H = 4, K = 2 uniform and independent: chance = 8 · (1 − 0.75⁴) ≈ 5.47, and random routing gets it."""
    rng = np.random.default_rng(0)
    rows = np.stack([rng.choice(8, size=2, replace=False) for _ in range(4 * 20_000)])
    layer = LayerRouting(rows, num_heads=4, num_experts=8)
    assert chance_divergence(layer) == pytest.approx(8 * (1 - 0.75**4), abs=0.01)
    assert subtoken_divergence(layer).mean() == pytest.approx(chance_divergence(layer), abs=0.02)


def test_relative_activation_moves_with_the_uniform_rate():
    # E = 8, top-1: expert 7 takes 2% of sub-tokens: over the fixed 1% threshold, under a quarter of uniform (3.1%)
    counts = [14] * 6 + [14, 2]  # of 100 sub-tokens (H = 1)
    layer = LayerRouting(np.repeat(np.arange(8), counts)[:, None], num_heads=1, num_experts=8)
    assert selection_ratio(layer)[7] == pytest.approx(0.02)
    assert activation_ratio([layer]) == 1.0
    assert uniform_ratio(layer) == pytest.approx(1 / 8)
    assert relative_activation_ratio([layer], 0.25) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="per must be 'subtoken' or 'token'"):
        relative_activation_ratio([layer], per="head")


def test_per_token_selection_counts_a_token_once():
    # H = 2, K = 1: token 0 sends both sub-tokens to expert 0; token 1 one to 0 and one to 1
    layer = LayerRouting(np.array([[0], [0], [0], [1]]), num_heads=2, num_experts=2)
    np.testing.assert_allclose(token_selection_ratio(layer), [1.0, 0.5])
    np.testing.assert_allclose(selection_ratio(layer), [0.75, 0.25])
    assert uniform_ratio(layer, "token") == pytest.approx(1 - 0.5**2)


# ---- invariants on random routing -----------------------------------------------------------------------------


@st.composite
def routings(draw, num_heads=None, top_k=None) -> LayerRouting:
    E = draw(st.integers(1, 9))
    K = top_k or draw(st.integers(1, E))
    H = num_heads or draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(E)[:K] for _ in range(T * H)])  # K distinct experts per row
    return LayerRouting(rows, num_heads=H, num_experts=E)


@settings(max_examples=60, deadline=None)
@given(routings())
def test_invariants(layer):
    E, H, K = layer.num_experts, layer.num_heads, layer.top_k
    assert expert_shares(layer).sum() == pytest.approx(1)
    assert selection_ratio(layer).sum() == pytest.approx(K)
    assert 1 - 1e-9 <= effective_experts(layer) <= E + 1e-9
    np.testing.assert_allclose(head_usage(layer).sum(axis=1), 1)
    np.testing.assert_allclose(head_usage(layer).mean(axis=0), expert_shares(layer))  # heads route T·K each
    divergence = subtoken_divergence(layer)
    assert divergence.shape == (layer.num_tokens,)
    assert divergence.min() >= 1 and divergence.max() <= min(E, H * K)


@settings(max_examples=30, deadline=None)
@given(routings(num_heads=1, top_k=1))
def test_single_head_top1_divergence_is_one(layer):
    assert (subtoken_divergence(layer) == 1).all()


# ---- from_stats on real layers --------------------------------------------------------------------------------


def small_mhmoe() -> MHMoE:
    return MHMoE(d_model=8, num_heads=2, num_experts=4, top_k=2, expert_hidden=8)


def test_from_stats_matches_mhmoe_forward():
    layer = small_mhmoe()
    outs = [layer(torch.randn(2, 3, 8)) for _ in range(2)]  # T = 6 tokens, S = 12 sub-tokens per call
    routing = LayerRouting.from_stats([o.stats for o in outs], num_heads=2, num_experts=4, name="moe")
    assert routing.top_experts.shape == (2 * 6 * 2, 2) and routing.num_tokens == 12
    counts = sum(o.stats.tokens_per_expert for o in outs).numpy()
    np.testing.assert_allclose(selection_ratio(routing) * routing.top_experts.shape[0], counts)


def test_from_stats_drops_padding_tokens():
    layer = small_mhmoe()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = layer(torch.randn(2, 3, 8), mask)
    routing = LayerRouting.from_stats([out.stats], num_heads=2, num_experts=4, token_masks=[mask])
    assert routing.top_experts.shape == (3 * 2, 2)
    np.testing.assert_array_equal(routing.top_experts, out.stats.top_experts.numpy()[[0, 1, 2, 3, 6, 7]])
    np.testing.assert_allclose(selection_ratio(routing) * 6, out.stats.tokens_per_expert.numpy())


def test_from_stats_sparse_moe_is_one_head():
    out = SparseMoE(d_model=8, num_experts=4, top_k=1, expert_hidden=8)(torch.randn(5, 8))
    routing = LayerRouting.from_stats([out.stats], num_heads=1, num_experts=4)
    assert (subtoken_divergence(routing) == 1).all()


# ---- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_experts, num_heads, num_experts, error, match",
    [
        (np.zeros((5, 1), dtype=int), 2, 4, ValueError, r"5 rows, not divisible by num_heads \(2\)"),
        (np.array([[0], [4]]), 1, 4, ValueError, r"values must be in 0..3, got range 0..4"),
        (np.array([[-1], [0]]), 1, 4, ValueError, r"got range -1..0"),
        (np.zeros((2, 1)), 1, 4, TypeError, "must hold integers"),
        (np.zeros(4, dtype=int), 1, 4, ValueError, r"shape \(T·H, K\)"),
        (np.zeros((0, 1), dtype=int), 1, 4, ValueError, r"got \(0, 1\)"),
        (np.array([[0, 1, 2]]), 1, 2, ValueError, r"top_k 3 > num_experts \(2\)"),
        (np.array([[1, 1]]), 1, 4, ValueError, "distinct experts"),
        (np.zeros((2, 1), dtype=int), 0, 4, ValueError, "num_heads must be a positive integer, got 0"),
    ],
)
def test_layer_routing_rejects(top_experts, num_heads, num_experts, error, match):
    with pytest.raises(error, match=match):
        LayerRouting(top_experts, num_heads=num_heads, num_experts=num_experts)


def test_from_stats_rejects():
    stats = small_mhmoe()(torch.randn(3, 8)).stats  # S = 6, K = 2
    with pytest.raises(ValueError, match="at least one MoEStats"):
        LayerRouting.from_stats([], num_heads=2, num_experts=4)
    with pytest.raises(ValueError, match=r"rows divisible by num_heads \(4\)"):
        LayerRouting.from_stats([stats], num_heads=4, num_experts=4)
    with pytest.raises(ValueError, match="with 3 tokens .* got dtype bool and 2 tokens"):
        LayerRouting.from_stats([stats], num_heads=2, num_experts=4, token_masks=[torch.ones(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="1 token_masks for 2 stats"):
        LayerRouting.from_stats([stats, stats], num_heads=2, num_experts=4, token_masks=[None])
    top1 = SparseMoE(d_model=4, num_experts=4, top_k=1, expert_hidden=4)(torch.randn(2, 4)).stats
    with pytest.raises(ValueError, match=r"disagree on top_k: \[2, 1\]"):
        LayerRouting.from_stats([stats, top1], num_heads=2, num_experts=4)


def test_metrics_reject():
    with pytest.raises(ValueError, match="at least one LayerRouting"):
        activation_ratio([])
    with pytest.raises(ValueError, match="at least one LayerRouting"):
        summarize([])
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -0.1"):
        activation_ratio([hand_layer()], threshold=-0.1)
    with pytest.raises(ValueError, match=r"different numbers of tokens .*\('hand', 3\), \('', 10\)"):
        mean_divergence([hand_layer(), one_expert_layer()])


def test_core_imports_without_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import mhmoe, mhmoe.analysis, mhmoe.analysis.plots\n"
        "try:\n    mhmoe.analysis.plots.plot_head_usage([[1.0]], 'x.png', 't')\n"
        "except ImportError as e:\n    assert 'pip install matplotlib' in str(e), e\n"
        "else:\n    raise SystemExit('plotting without matplotlib did not fail')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- plots ----------------------------------------------------------------------------------------------------


def assert_png(path, folder):
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000
    assert [p.name for p in folder.iterdir()] == [path.name]  # the temp file was renamed, not left behind


def test_plot_activation_heatmap(tmp_path):
    shares = np.stack([expert_shares(hand_layer()), expert_shares(one_expert_layer())])
    path = plot_activation_heatmap(shares, tmp_path / "new" / "heat.png", "expert shares", ["layer 2", "layer 4"])
    assert_png(path, tmp_path / "new")
    with pytest.raises(ValueError, match="got 1 layer_names for 2 rows"):
        plot_activation_heatmap(shares, tmp_path / "bad.png", "t", ["only one"])


def test_plot_head_usage(tmp_path):
    assert_png(plot_head_usage(head_usage(hand_layer()), tmp_path / "heads.png", "head usage"), tmp_path)


def test_plot_divergence_histogram(tmp_path):
    groups = {"polysemous": np.array([2, 3, 3, 4]), "other": mean_divergence([hand_layer()])}
    assert_png(plot_divergence_histogram(groups, tmp_path / "hist.png", "divergence", max_value=4), tmp_path)
    with pytest.raises(ValueError, match=r"group 'polysemous': values must round into 1..3, got 2..4"):
        plot_divergence_histogram(groups, tmp_path / "bad.png", "t", max_value=3)
    with pytest.raises(ValueError, match="group 'empty' is empty"):
        plot_divergence_histogram({"empty": np.array([])}, tmp_path / "bad.png", "t", max_value=2)


def test_plot_curves(tmp_path):
    curves = {"smoe": [(1e6, 5.0), (2e6, 4.5)], "mhmoe": [(1e6, 4.9), (2e6, 4.3)]}
    bands = {"mhmoe": [(1e6, 4.8, 5.0), (2e6, 4.2, 4.4)]}
    assert_png(plot_curves(curves, tmp_path / "curves.png", "validation", bands=bands), tmp_path)
    with pytest.raises(ValueError, match=r"bands \['dense'\] name no curve"):
        plot_curves(curves, tmp_path / "bad.png", "t", bands={"dense": []})


def test_plot_patch_divergence(tmp_path):
    image = np.linspace(0, 1, 16 * 16 * 3).reshape(16, 16, 3)
    maps = [np.ones((4, 4)), np.arange(16).reshape(4, 4) % 4 + 1]
    path = plot_patch_divergence(image, maps, tmp_path / "patches.png", ["step 0", "step 100"])
    assert_png(path, tmp_path)
    with pytest.raises(ValueError, match="1 titles"):
        plot_patch_divergence(image, maps, tmp_path / "bad.png", ["step 0"])


LONG = "mhmoe_flops-seed0 (mhmoe, 12 experts, top-2, H=4): distinct experts per token's sub-tokens, validation split"
COLUMN = "step 1000 of 3000 (the last checkpoint)"
RNG = np.random.default_rng(0)
PLOTS = {  # name: (draw it with a long title, the title to find drawn whole)
    "heatmap 4 experts": (lambda p, path: p.plot_activation_heatmap(RNG.random((4, 4)), path, LONG), LONG),
    "heatmap 64 experts": (lambda p, path: p.plot_activation_heatmap(RNG.random((6, 64)), path, LONG), LONG),
    "head usage": (lambda p, path: p.plot_head_usage(RNG.random((4, 12)), path, LONG), LONG),
    "language usage": (lambda p, path: p.plot_language_usage(RNG.random((2, 2)), path, LONG, ["en", "de"]), LONG),
    "divergence": (lambda p, path: p.plot_divergence_histogram({"a": np.array([1, 2])}, path, LONG), LONG),
    "curves": (lambda p, path: p.plot_curves({"dense": [(0, 5.0), (1e5, 4.0)]}, path, LONG), LONG),
    "patches": (lambda p, path: p.plot_patch_divergence(RNG.random((8, 8)), [np.ones((2, 2))], path, [LONG]), LONG),
    "patch grid": (
        lambda p, path: p.plot_patch_divergence_grid([RNG.random((8, 8))], [[np.ones((2, 2))] * 2], path, [COLUMN] * 2),
        COLUMN,
    ),
}


@pytest.mark.parametrize("name", PLOTS)
def test_no_plot_cuts_off_its_title_or_any_text(name, tmp_path, monkeypatch):
    """Everything a figure draws (the long titles runs give them, labels, ticks, legends) lies inside it."""
    from mhmoe.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    draw, title = PLOTS[name]
    draw(plots, tmp_path / "figure.png")
    (figure,) = figures
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text")) if t.get_visible()]
    assert any(title in " ".join(text.split()) for text in texts), "the title is drawn, whole"
    drawn = figure.get_tightbbox(renderer)  # inches, over every artist drawn
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, drawn
    assert drawn.x1 <= figure.get_figwidth() + 0.01 and drawn.y1 <= figure.get_figheight() + 0.01, drawn


def test_relative_activation_per_head_sees_what_pooling_hides():
    from mhmoe.analysis.routing import relative_activation_ratio, relative_activation_ratio_per_head

    # 2 heads, 4 experts, top-1: head 0 always expert 0 or 1, head 1 always 2 or 3 (token-major sub-tokens)
    layer = LayerRouting(np.array([[0], [2], [1], [3], [0], [3], [1], [2]]), num_heads=2, num_experts=4)
    assert relative_activation_ratio([layer]) == 1.0  # pooled: every expert well used
    assert relative_activation_ratio_per_head([layer]) == 0.5  # per head: half of each head's experts
    single = LayerRouting(np.array([[0], [1], [1], [1], [0], [0], [1], [2]]), num_heads=1, num_experts=4)
    assert relative_activation_ratio_per_head([single]) == relative_activation_ratio([single]) == 0.75  # H = 1
