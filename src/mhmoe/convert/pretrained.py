"""Saved transformers folders in, converted folders out: `mhmoe moeify` and `load_moeified`.

A dense model (GPT-2, Llama, Qwen, …) has its FFNs MoE-ified (`mhmoe.convert.dense.moeify`); a MoE model
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, Switch Transformers, or this library's own with SMoE layers) has
its MoE blocks swapped for this library's layers with the same weights (`--kind smoe`), then turned into
MH-MoE (`--kind mhmoe`, `mhmoe.convert.heads`). The folder records the conversion (`mhmoe_moeify.json`) and
every weight (`moeified.safetensors`); `load_moeified` rebuilds the model from its config, replays the
conversion and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from mhmoe.convert.dense import Kind, moeify
from mhmoe.convert.heads import find_smoe_layers, moe_to_mhmoe
from mhmoe.convert.peers import find_moe_blocks, swap_moe_blocks

RECIPE_FILE = "mhmoe_moeify.json"
WEIGHTS_FILE = "moeified.safetensors"  # not model.safetensors: plain from_pretrained must not load it half-dense
DENSE_ONLY = ("every", "router", "router_kwargs")  # moeify options with no meaning for a model that has experts


def has_moe_layers(model: nn.Module) -> bool:
    """Whether `model` has MoE blocks of transformers' MoE models or this library's SMoE layers."""
    return bool(find_moe_blocks(model) or find_smoe_layers(model))


def convert(model: nn.Module, recipe: dict[str, Any], init: str = "upcycle") -> list[str]:
    """Apply a recorded conversion in place; return the replaced names. recipe: kind ("smoe" | "mhmoe"), source
    ("dense", the default, or "moe") and the options (moeify's for dense models; num_heads, num_experts,
    top_k and MoEConfig fields for MoE models)."""
    options = dict(recipe)
    kind, source = options.pop("kind", "smoe"), options.pop("source", "dense")
    if source == "dense":
        return moeify(model, kind, init=init, **options)  # type: ignore[arg-type]
    if source != "moe":
        raise ValueError(f"unknown conversion source {source!r}; choose 'dense' or 'moe'")
    given = sorted(set(options) & set(DENSE_ONLY))
    if given:
        raise ValueError(f"{given} apply to dense models only; this model has MoE layers (their experts are kept)")
    if kind == "mhmoe":
        return moe_to_mhmoe(model, init=init, **options)  # type: ignore[arg-type]
    if kind != "smoe":
        raise ValueError(f"unknown MoE kind {kind!r}; choose 'smoe' or 'mhmoe'")
    sizes = sorted(k for k in ("num_heads", "num_experts", "top_k") if options.get(k) is not None)
    if sizes:
        raise ValueError(f"{sizes} cannot change a MoE model's layers with --kind smoe (an exact swap); use mhmoe")
    return swap_moe_blocks(
        model, **{k: v for k, v in options.items() if k not in ("num_heads", "num_experts", "top_k")}
    )


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def moeify_pretrained(hf_dir: str | Path, out_dir: str | Path, kind: Kind = "smoe", **recipe: Any) -> list[str]:
    """Convert a saved transformers model folder (a causal LM, dense or MoE, or a Switch Transformers
    encoder-decoder) into out_dir: its config and tokenizer files, `moeified.safetensors` (all weights) and
    `mhmoe_moeify.json` (the conversion). Load it with `load_moeified(out_dir)`. Weights are read from
    safetensors only. recipe: `convert`'s options (JSON-serialisable values). Returns the replaced names."""
    from safetensors.torch import save_model
    from transformers import AutoConfig

    from mhmoe.hf.files import folder_file
    from mhmoe.hf.runs import load_pretrained
    from mhmoe.io import atomic_write, staged_dir, write_json

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(str(hf_dir)) if (hf_dir / "config.json").is_file() else None
    model = load_pretrained(_auto_class(config), hf_dir)
    recipe = {"kind": kind, "source": "moe" if has_moe_layers(model) else "dense", **recipe}
    json.dumps(recipe)  # fail before writing anything if the recipe cannot be recorded
    replaced = convert(model, recipe)
    with staged_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        for file in sorted(hf_dir.iterdir()):
            if file.name not in ("config.json", RECIPE_FILE) and _is_tokenizer_file(file.name) and not file.is_dir():
                with atomic_write(tmp / file.name, "wb") as f:  # a link out of hf_dir is refused, never followed
                    f.write(folder_file(file, hf_dir).read_bytes())
        save_model(model, str(tmp / WEIGHTS_FILE))
        write_json(tmp / RECIPE_FILE, {"recipe": recipe, "replaced": replaced})
    return replaced


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "generation_config"))


def load_moeified(path: str | Path) -> nn.Module:
    """A model written by `moeify_pretrained`: the architecture from config.json, the recorded conversion,
    then every weight from moeified.safetensors (strict: a missing or extra key is an error)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig

    import mhmoe.hf  # noqa: F401  (registers model_type "mhmoe" with AutoConfig)
    from mhmoe.errors import CheckpointError
    from mhmoe.hf.files import check_model_folder, check_weights_fit, read_json_file

    path = Path(path)
    if not (path / RECIPE_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} is not a folder written by `mhmoe moeify` (no {RECIPE_FILE} / {WEIGHTS_FILE})")
    shapes = check_model_folder(path)  # links, JSON files and safetensors headers, before anything is read
    try:
        recipe = read_json_file(path / RECIPE_FILE, path)["recipe"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path / RECIPE_FILE} records no conversion recipe; run `mhmoe moeify` again") from None
    config = AutoConfig.from_pretrained(str(path))
    model = _auto_class(config).from_config(config)
    convert(model, recipe, init="random")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mismatched = {n: (shapes[n], expected[n]) for n in set(shapes) & set(expected) if shapes[n] != expected[n]}
    check_weights_fit(str(path), (), (), mismatched)
    missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
    check_weights_fit(str(path), missing, unexpected, {})
    return model.eval()
