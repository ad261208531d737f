"""Run configuration: presets, overrides with suggestions, one-line range errors."""

import pytest

from mhmoe.errors import ConfigError
from mhmoe.train.config import PRESETS, RunConfig, apply_overrides, field_names, preset, validate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    cfg = preset(name)
    validate(cfg)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_parse_by_type():
    cfg = apply_overrides(
        preset("cpu"),
        ["model.ffn.num_experts=16", "train.lr=5e-4", "train.compile=true", "model.ffn.router=sigmoid", "data.path=/x"],
    )
    assert (cfg.model.ffn.num_experts, cfg.train.lr, cfg.train.compile) == (16, 5e-4, True)
    assert (cfg.model.ffn.router, cfg.data.path) == ("sigmoid", "/x")


def test_unknown_key_suggests():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model.ffn.num_expert' \(did you mean 'model.ffn.num_experts'\?\)"
    ):
        apply_overrides(preset("cpu"), ["model.ffn.num_expert=4"])


@pytest.mark.parametrize(
    "item,message",
    [
        ("train.lr=fast", r"train.lr='fast': expected a float"),
        ("train.compile=maybe", r"expected a bool"),
        ("model.ffn.top_k=9", r"model.ffn.top_k must be in 1..8, got 9"),
        ("model.ffn.num_heads=3", r"model.d_model \(128\) must be divisible by model.ffn.num_heads \(3\)"),
        ("train.batch_size=0", r"train.batch_size must be >= 1, got 0"),
        ("train.schedule=step", r"train.schedule must be cosine or linear, got 'step'"),
        ("model.ffn.router=hash", r"model.ffn.router must be softmax, switch, xmoe or sigmoid"),
        ("lr", r"override 'lr' is not key=value"),
    ],
)
def test_bad_values_raise_one_line(item, message):
    with pytest.raises(ConfigError, match=message) as info:
        apply_overrides(preset("cpu"), [item])
    assert "\n" not in str(info.value)


def test_unknown_preset_and_foreign_config():
    with pytest.raises(ConfigError, match=r"unknown preset 'cpu-tiyn' \(did you mean 'cpu-tiny'\?\)"):
        preset("cpu-tiyn")
    with pytest.raises(ConfigError, match="not one this version of mhmoe wrote"):
        RunConfig.from_dict({"model": {}, "data": {"nope": 1}, "train": {}})


def test_field_names_cover_the_tree():
    names = field_names(preset("cpu"))
    assert "model.ffn.expert_hidden" in names and "train.grad_accum" in names and "data.tokenizer" in names
