"""`MHMoEModel` (the decoder) and `MHMoEForCausalLM` (the decoder plus the output layer): `mhmoe.models.gpt.GPT` as
transformers models, built from the GPT's own modules (`Block`, `Attention`, the MoE layers), not copies of them.

Shape legend: B batch, L new tokens, P cached positions, S = P + L keys, D model dim, V vocabulary, H MH-MoE heads,
E experts.

One implementation: `MHMoEModel` holds a GPT's `embed`, `blocks` and `norm`, `MHMoEForCausalLM` adds its
`lm_head`; `from_gpt` wraps an existing GPT (weights shared) and `to_gpt` gives one back, so a train run's
weights load unchanged (`mhmoe.hf.runs`). What differs from `GPT.forward` is what transformers expects of a model:
- attention goes through transformers' attention interface: the mask comes from `masking_utils.create_causal_mask`
  and the mixing function from `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` ("eager" is
  `mhmoe.models.gpt.eager_attention`), called by the GPT's `Attention` with extra keyword arguments passed through;
  `_supports_attention_backend`, so a serving stack can register its own function (vLLM's Transformers backend);
- `inputs_embeds`, `position_ids` (default: counting real tokens, as `GPT`), `output_hidden_states` (the
  embeddings, each block's output, the last after the final norm: n_layers + 1), `output_attentions` (eager
  only), `output_router_logits` (each MoE layer's router logits (T, E), T = B·L tokens; (B·L·H, E) sub-tokens for
  MH-MoE), `gradient_checkpointing_enable()`; `cache` (`past_key_values` before transformers 5.2x) a `DynamicCache`.

Losses: with `labels` (B, L) (shifted inside, -100 = ignore), `loss` = `lm_loss` (mean next-token cross-entropy, or
its sum over `num_items_in_batch` when Trainer passes it) + `aux_loss`, the MoE layers' weighted router loss
(balance · coefficient + z · coefficient, `mhmoe.layers.moe`), so `loss.backward()` trains the routers as `mhmoe
train` does. `config.router_aux_loss_coef` (transformers' name) is the balance-loss coefficient of every MoE layer.
`aux_loss` and `router_stats` (each MoE layer's `MoEStats`) are returned with or without labels.

Folders exported before this structure kept the output layer at `model.lm_head.weight`; `from_pretrained` renames it.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mhmoe.hf.configuration_mhmoe import MHMoEConfig
from mhmoe.hf.files import check_model_folder, load_checked
from mhmoe.layers.moe import MoELayer, MoEStats
from mhmoe.models.gpt import GPT, AttentionFunction, eager_attention, rotary_inputs, rotary_tables

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5.2x renamed `past_key_values` to `cache` (inputs and outputs).
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_PARAMETERS = set(inspect.signature(create_causal_mask).parameters)
LEGACY_LM_HEAD = "model.lm_head.weight"  # where folders exported before MHMoEModel kept an untied output layer


@dataclass
class MHMoEModelOutput(MoeModelOutputWithPast):
    """MoeModelOutputWithPast plus the MoE layers' summed weighted router loss and their statistics."""

    aux_loss: Tensor | None = None
    router_stats: tuple | None = None


@dataclass
class MHMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """MoeCausalLMOutputWithPast plus `lm_loss` and `router_stats`; loss = lm_loss + aux_loss when labels are given."""

    lm_loss: Tensor | None = None
    router_stats: tuple | None = None


class MHMoEPreTrainedModel(PreTrainedModel):
    """transformers' base of the MH-MoE models: the config class, weight loading and what generation supports."""

    config_class = MHMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True
    _supports_cache_class = True  # transformers 4.x: takes Cache objects
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # any function registered in transformers' AttentionInterface

    def _init_weights(self, module: nn.Module) -> None:
        """GPT's modules initialise themselves; only the rotary tables (non-persistent buffers, absent from
        checkpoints) are recomputed here, in case the model was built on the meta device."""
        if isinstance(module, MHMoEModel):
            cfg = module.config
            cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
            with torch.no_grad():
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' from_pretrained, safetensors only: a folder holding only pickle weights (*.bin) is refused
        before anything is unpickled, and so is a local folder whose index or *.safetensors files are not
        safetensors; weights missing, unexpected or of another shape are refused (`mhmoe.hf.files.load_checked`). A
        folder exported before `MHMoEModel` existed has its output layer renamed into place."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls.__name__} loads safetensors weights only; use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        legacy = False
        if args and isinstance(args[0], (str, os.PathLike)) and Path(args[0]).is_dir():
            check_model_folder(Path(args[0]))  # before reading any header (load_checked checks it again, cheaply)
            legacy = "key_mapping" not in kwargs and LEGACY_LM_HEAD in _safetensors_keys(Path(args[0]))
        if legacy:
            kwargs["key_mapping"] = {r"^model\.lm_head\.": "lm_head."}
        loaded = load_checked(super().from_pretrained, cls, *args, **kwargs)
        if legacy:  # transformers 5 would save with the loading renames reversed: save in today's layout instead
            model = loaded[0] if isinstance(loaded, tuple) else loaded
            model._weight_conversions = None  # a plain attribute transformers sets
        return loaded

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' save_pretrained, safetensors only."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError(
                f"{type(self).__name__} saves safetensors weights only; safe_serialization=False is refused"
            )
        return super().save_pretrained(*args, **kwargs)


def _safetensors_keys(folder: Path) -> set[str]:
    """The tensor names of a (checked) folder's safetensors files, read from their headers."""
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        keys.update(header)
    return keys


class MHMoEModel(MHMoEPreTrainedModel):
    """The decoder: token embeddings, the blocks and the final norm of a `GPT`; returns hidden states (B, L, D)."""

    # a causal LM's folder holds the output layer too: the decoder leaves it (load_checked reads this as well)
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^model\.lm_head\."]

    rope_cos: Tensor  # (seq_len, hs/2) rotary tables, buffers
    rope_sin: Tensor

    def __init__(self, config: MHMoEConfig, gpt: GPT | None = None):
        super().__init__(config)
        gpt = gpt if gpt is not None else GPT(config.to_gpt_config())
        self.embed, self.blocks, self.norm = gpt.embed, gpt.blocks, gpt.norm
        self.register_buffer("rope_cos", gpt.rope_cos, persistent=False)
        self.register_buffer("rope_sin", gpt.rope_sin, persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value  # type: ignore[assignment]  # transformers' signature; an embedding in practice

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> MHMoEModelOutput | tuple:
        """input_ids: (B, L) or inputs_embeds: (B, L, D); attention_mask: (B, P + L) 1 = token, 0 = padding (or a
        ready 4D mask); position_ids: (B, L). Other keyword arguments go to the attention function."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MHMoEModel takes exactly one of input_ids and inputs_embeds")
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        cache = cache if cache is not None else past_key_values
        use_cache = self._use_cache(use_cache, cache)
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, D)
        L, P = x.shape[1], (cache.get_seq_length() if cache is not None else 0)
        if P + L > cfg.seq_len:
            raise ValueError(
                f"MHMoEModel takes at most {cfg.seq_len} positions (max_position_embeddings) including {P} cached, "
                f"got {L} new tokens"
            )
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
            attention_mask = None  # no padding: SDPA's own causal path, and nothing to mask in the MoE layers
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        token_mask = padding_mask[:, P:].bool() if padding_mask is not None else None
        cos, sin, position_ids = rotary_inputs(self.rope_cos, self.rope_sin, P, L, padding_mask, position_ids)
        if position_ids is None:
            position_ids = torch.arange(P, P + L, device=x.device).unsqueeze(0)
        mask = self._causal_mask(x, attention_mask, cache, position_ids)
        attention = self._attention_function(output_attentions)
        recording = _Recording(attention) if output_attentions else None
        attention = recording or attention
        hidden: list[Tensor] = []
        aux_loss = x.new_zeros((), dtype=torch.float32)
        routing: list[MoEStats] = []
        with _recorded_router_logits(self.moe_layers() if output_router_logits else []) as router_logits:
            for block in self.blocks:
                hidden.append(x)
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    run = self._gradient_checkpointing_func
                    x, aux, stats = run(block.__call__, x, cos, sin, mask, None, token_mask, attention, **kwargs)
                else:
                    x, aux, stats = block(x, cos, sin, mask, cache, token_mask, attention, **kwargs)
                if stats is not None:
                    aux_loss = aux_loss + aux
                    routing.append(stats)
        x = self.norm(x)
        hidden.append(x)
        result = MHMoEModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(recording.weights) if recording is not None else None,  # type: ignore[arg-type]
            router_logits=tuple(router_logits) if output_router_logits else None,  # type: ignore[arg-type]
            aux_loss=aux_loss,
            router_stats=tuple(routing),
            **{CACHE_FIELD: cache},
        )
        return result if return_dict is not False else result.to_tuple()

    def _use_cache(self, use_cache: bool | None, cache: Any) -> bool:
        """Whether to keep a KV cache: asked for, or the config's default; never while gradient checkpointing
        recomputes blocks (the recompute would append to the cache again), where asking for one is an error."""
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and (use_cache or cache is not None):
            raise ValueError(
                "a KV cache cannot be used while gradient checkpointing trains the model; pass use_cache=False "
                "(or call model.eval() / torch.no_grad() to decode)"
            )
        if checkpointing:
            return False
        return bool(self.config.use_cache if use_cache is None else use_cache)

    def _causal_mask(self, x: Tensor, attention_mask: Tensor | None, cache: Any, position_ids: Tensor) -> Any:
        """transformers' mask for the configured attention implementation (None, a bool or additive tensor, a flex
        BlockMask): create_causal_mask's arguments by the names the installed version gives them."""
        kwargs: dict[str, Any] = {"config": self.config, "attention_mask": attention_mask, "position_ids": position_ids}
        kwargs["inputs_embeds" if "inputs_embeds" in _MASK_PARAMETERS else "input_embeds"] = x
        kwargs["cache" if "cache" in _MASK_PARAMETERS else "past_key_values"] = cache
        if "cache_position" in _MASK_PARAMETERS:  # transformers before 5.2x
            P = cache.get_seq_length() if cache is not None else 0
            kwargs["cache_position"] = torch.arange(P, P + x.shape[1], device=x.device)
        return create_causal_mask(**kwargs)

    def _attention_function(self, output_attentions: bool) -> AttentionFunction:
        """The function of config._attn_implementation (eager: `mhmoe.models.gpt.eager_attention`)."""
        implementation = self.config._attn_implementation or "eager"
        if output_attentions and implementation != "eager":
            raise ValueError(
                f"output_attentions needs attn_implementation='eager' (this model uses {implementation!r}): load it "
                "with attn_implementation='eager' or call model.set_attn_implementation('eager')"
            )
        function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        return function


class _Recording:
    """An attention function that keeps the attention weights each call returns (output_attentions)."""

    def __init__(self, function: AttentionFunction):
        self.function = function
        self.weights: list[Tensor | None] = []

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        out, weights = self.function(*args, **kwargs)
        self.weights.append(weights)
        return out, weights


@contextmanager
def _recorded_router_logits(layers: list[MoELayer]) -> Iterator[list[Tensor]]:
    """The router logits (S, E) of each layer's calls within the block, in call order, from forward hooks that
    live only as long as the block (a gradient-checkpointing recompute in backward records nothing)."""
    logits: list[Tensor] = []
    hooks = [layer.routed.router.register_forward_hook(lambda m, a, out: logits.append(out.logits)) for layer in layers]
    try:
        yield logits
    finally:
        for hook in hooks:
            hook.remove()


class MHMoEForCausalLM(MHMoEPreTrainedModel, GenerationMixin):
    """`MHMoEModel` and the output layer: from_pretrained, generate, Trainer, PEFT."""

    # 5.x maps each tied parameter to its source; 4.x lists the tied parameters.
    _tied_weights_keys: Any = (
        {"lm_head.weight": "model.embed.weight"} if TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config: MHMoEConfig, model: GPT | None = None):
        super().__init__(config)
        gpt = model if model is not None else GPT(config.to_gpt_config())
        self.model = MHMoEModel(config, gpt)
        self.lm_head = gpt.lm_head
        self.post_init()

    @classmethod
    def from_gpt(cls, model: GPT, **config_kwargs: Any) -> MHMoEForCausalLM:
        """Wrap an existing GPT (weights shared, not copied); config_kwargs go to `MHMoEConfig`."""
        return cls(MHMoEConfig.from_gpt_config(model.cfg, **config_kwargs), model)

    def to_gpt(self) -> GPT:
        """The `GPT` of these modules (weights shared, not copied): `mhmoe` train runs, eval and analysis read it."""
        with torch.device("meta"):
            gpt = GPT(self.config.to_gpt_config())
        gpt.embed, gpt.blocks, gpt.norm, gpt.lm_head = (
            self.model.embed,
            self.model.blocks,
            self.model.norm,
            self.lm_head,
        )
        gpt.register_buffer("rope_cos", self.model.rope_cos, persistent=False)
        gpt.register_buffer("rope_sin", self.model.rope_sin, persistent=False)
        return gpt.train(self.training)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: Any = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> MHMoECausalLMOutput | tuple:
        """input_ids: (B, L) (or inputs_embeds (B, L, D)); attention_mask: (B, P + L) 1 = token, 0 = padding;
        labels: (B, L), -100 = ignore; logits_to_keep: the last n positions' logits only (0 = all), or the
        positions of a 1D tensor. Other keyword arguments go to the attention function."""
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            cache if cache is not None else past_key_values,
            inputs_embeds,
            use_cache,
            output_attentions,
            output_hidden_states,
            output_router_logits,
            **kwargs,
        )
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep])  # (B, L or kept, V)
        lm_loss = loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(f"labels need the logits of every position; got logits_to_keep={logits_to_keep}")
            lm_loss = next_token_loss(logits, labels, num_items_in_batch)
            loss = lm_loss + out.aux_loss
        result = MHMoECausalLMOutput(
            loss=loss,
            aux_loss=out.aux_loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=out.router_logits,
            lm_loss=lm_loss,
            router_stats=out.router_stats,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()


def next_token_loss(logits_BLV: Tensor, labels_BL: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Cross-entropy of position t's logits against labels[t + 1] (-100 = ignore), in float32 or wider: the mean,
    or the sum divided by num_items_in_batch (Trainer's count of label tokens over accumulated micro-batches)."""
    logits = logits_BLV[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    targets = labels_BL[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
