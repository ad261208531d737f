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
        [
            "model.ffn.moe.num_experts=16",
            "train.lr=5e-4",
            "train.compile=true",
            "model.ffn.moe.router.kind=sigmoid",
            "data.path=/x",
            "model.ffn.moe.capacity_factor=1.25",
        ],
    )
    assert (cfg.model.ffn.moe.num_experts, cfg.train.lr, cfg.train.compile) == (16, 5e-4, True)
    assert (cfg.model.ffn.moe.router.kind, cfg.data.path, cfg.model.ffn.moe.capacity_factor) == ("sigmoid", "/x", 1.25)
    assert apply_overrides(cfg, ["model.ffn.moe.capacity_factor=none"]).model.ffn.moe.capacity_factor is None


def test_every_layer_option_is_settable():
    """Each MoEConfig and RouterConfig field is a key of `--set` (the layer's options are written once)."""
    import dataclasses

    from mhmoe import MoEConfig, RouterConfig

    names = field_names(preset("cpu"))
    for f in dataclasses.fields(MoEConfig):
        if f.name != "router":
            assert f"model.ffn.moe.{f.name}" in names
    for f in dataclasses.fields(RouterConfig):
        assert f"model.ffn.moe.router.{f.name}" in names
    cfg = apply_overrides(
        preset("cpu"),
        [
            "model.ffn.moe.dispatch=slices",
            "model.ffn.moe.router.jitter=0.01",
            "model.ffn.moe.num_shared_experts=1",
            "model.ffn.moe.shared_expert_hidden=64",
        ],
    )
    moe = cfg.model.ffn.moe
    assert (moe.dispatch, moe.router.jitter, moe.num_shared_experts, moe.shared_expert_hidden) == (
        "slices",
        0.01,
        1,
        64,
    )


def test_overrides_are_checked_together_whatever_their_order():
    cfg = apply_overrides(preset("cpu"), ["model.ffn.moe.top_k=4", "model.ffn.moe.num_experts=4"])
    assert (cfg.model.ffn.moe.num_experts, cfg.model.ffn.moe.top_k) == (4, 4)


def test_keys_of_mhmoe_0_1_name_their_new_place():
    with pytest.raises(ConfigError, match=r"config key 'model.ffn.num_experts' is now 'model.ffn.moe.num_experts'"):
        apply_overrides(preset("cpu"), ["model.ffn.num_experts=4"])
    with pytest.raises(ConfigError, match=r"'model.ffn.router_form' is now 'model.ffn.moe.router.form'"):
        apply_overrides(preset("cpu"), ["model.ffn.router_form=code"])


def test_unknown_key_suggests():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'model.ffn.moe.num_expert' \(did you mean 'model.ffn.moe.num_experts'\?\)",
    ):
        apply_overrides(preset("cpu"), ["model.ffn.moe.num_expert=4"])


@pytest.mark.parametrize(
    "item,message",
    [
        ("train.lr=fast", r"train.lr='fast': expected a float"),
        ("train.compile=maybe", r"expected a bool"),
        ("model.ffn.moe.top_k=9", r"model.ffn.moe: top_k must be an integer in 1..num_experts \(8\), got 9"),
        ("model.ffn.moe.num_heads=3", r"model.d_model \(128\) must be divisible by model.ffn.moe.num_heads \(3\)"),
        ("train.batch_size=0", r"train.batch_size must be >= 1, got 0"),
        ("train.schedule=step", r"train.schedule='step': choose one of cosine, linear"),
        (
            "model.ffn.moe.router.kind=hash",
            r"model.ffn.moe.router.kind='hash': choose one of softmax, switch, xmoe, sigmoid",
        ),
        ("model.ffn.moe.router.jitter=1.5", r"model.ffn.moe: jitter must be in \[0, 1\), got 1.5"),
        ("model.ffn.moe.router.bias_update_rate=0.1", r"router option bias_update_rate=0.1 does not apply to the xmoe"),
        ("model.ffn.moe.capacity_factor=inf", r"capacity_factor must be finite \(None is dropless\), got inf"),
        ("model.ffn.moe_every=5", r"model.ffn.moe_every \(5\) is larger than model.n_layers \(4\)"),
        ("lr", r"override 'lr' is not key=value"),
        # values that reached torch unchecked (issue 16, item 8)
        ("model.ffn.moe.balance_loss_coef=nan", r"model.ffn.moe: balance_loss_coef must be >= 0, got nan"),
        ("model.ffn.moe.num_shared_experts=-1", r"model.ffn.moe: num_shared_experts must be >= 0, got -1"),
        ("model.ffn.moe.residual=inner", r"model.ffn.moe.residual='inner': choose one of outer, subtoken"),
        ("model.ffn.moe.router.form=both", r"model.ffn.moe.router.form='both': choose one of paper, code"),
        ("train.beta1=2", r"train.beta1 must be in \[0, 1\), got 2.0"),
        ("train.beta2=-0.5", r"train.beta2 must be in \[0, 1\), got -0.5"),
        ("train.eps=-1e-8", r"train.eps must be >= 0, got -1e-08"),
        ("train.eps=nan", r"train.eps must be a finite number, got nan"),
        ("train.lr=inf", r"train.lr must be a finite number, got inf"),
        ("train.weight_decay=inf", r"train.weight_decay must be a finite number, got inf"),
        ("train.device=foo", r"train.device='foo': use auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:x", r"train.device='cuda:x': use auto, cpu, cuda or cuda:N"),
        ("train.threads=-1", r"train.threads must be >= 0 \(0 = torch's default\), got -1"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*63\), got -1"),
        ("train.batch_size=1000000000", r"train.batch_size × model.seq_len = 128,000,000,000 tokens per micro-batch"),
        ("parallel.timeout_s=inf", r"parallel.timeout_s must be a number of seconds > 0, got inf"),
        ("data.vocab_size=100", r"data.vocab_size must be at least 257 for data.tokenizer=bpe"),
        ("model.vocab_size=-3", r"model.vocab_size must be >= 1, got -3"),
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
    assert "model.ffn.moe.expert_hidden" in names and "train.grad_accum" in names and "data.tokenizer" in names
