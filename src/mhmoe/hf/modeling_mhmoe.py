"""`MHMoEForCausalLM`: `mhmoe.models.gpt.GPT` as a transformers `PreTrainedModel` with generation.

One implementation: the model *is* a `GPT` (attribute `model`), so its state-dict keys are the GPT's with the
prefix `model.` and a train run's weights load unchanged (`mhmoe.hf.runs`). Decoding uses transformers'
`DynamicCache` through the same two methods as `mhmoe.models.gpt.KVCache`.

Losses: with `labels` (B, L) (shifted inside, -100 = ignore, as every transformers causal LM), `loss` is the
mean next-token cross-entropy **plus** the MoE layers' weighted auxiliary loss (balance + z), so
`outputs.loss.backward()` trains the router as the mhmoe trainer does; `lm_loss` and `aux_loss` are also
returned separately, and `aux_loss` is returned without labels too. `router_stats` holds each MoE layer's
`MoEStats`.

Works with transformers 4.56+ and 5.x: the cache argument is accepted as `cache` (5.x) or `past_key_values`
(4.x), and returned under the output field name the installed version uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mhmoe.hf.configuration_mhmoe import MHMoEConfig
from mhmoe.hf.files import load_checked
from mhmoe.models.gpt import GPT, rotary_tables

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5 renamed `past_key_values` to `cache` (inputs and outputs).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MHMoECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the MoE parts: loss = lm_loss + aux_loss when labels are given."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_stats: tuple | None = None


class MHMoEPreTrainedModel(PreTrainedModel):
    """transformers' base of the MH-MoE models: the config class, weight loading and what generation supports."""

    config_class = MHMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: takes Cache objects
    _supports_sdpa = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        """GPT and the layers initialise themselves; only the rotary tables (non-persistent buffers, absent
        from checkpoints) are recomputed here, in case the model was built on the meta device."""
        if isinstance(module, GPT):
            cfg = module.cfg
            cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
            with torch.no_grad():
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)


class MHMoEForCausalLM(MHMoEPreTrainedModel, GenerationMixin):
    """A `GPT` decoder (dense, SparseMoE or MHMoE FFNs) for transformers: from_pretrained, generate, Trainer."""

    # 5.x maps each tied parameter to its source; 4.x lists the tied parameters.
    _tied_weights_keys: Any = (
        {"model.lm_head.weight": "model.embed.weight"} if TRANSFORMERS_MAJOR >= 5 else ["model.lm_head.weight"]
    )

    def __init__(self, config: MHMoEConfig, model: GPT | None = None):
        super().__init__(config)
        self.model = model if model is not None else GPT(config.to_gpt_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' from_pretrained, safetensors only: a folder holding only pickle weights (*.bin) is refused
        before anything is unpickled, and so is a local folder whose index or *.safetensors files are not
        safetensors; weights missing, unexpected or of another shape are refused (`mhmoe.hf.files.load_checked`)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("MHMoEForCausalLM loads safetensors weights only; use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        return load_checked(super().from_pretrained, cls, *args, **kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' save_pretrained, safetensors only."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("MHMoEForCausalLM saves safetensors weights only; safe_serialization=False is refused")
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_gpt(cls, model: GPT, **config_kwargs: Any) -> MHMoEForCausalLM:
        """Wrap an existing GPT (weights shared, not copied); config_kwargs go to `MHMoEConfig`."""
        return cls(MHMoEConfig.from_gpt_config(model.cfg, **config_kwargs), model)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Any = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MHMoECausalLMOutput | tuple:
        """input_ids: (B, L); attention_mask: (B, P + L) 1 = token, 0 = padding; labels: (B, L), -100 = ignore.
        Other transformers keywords (cache_position, output_attentions, …) are accepted and ignored."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MHMoEForCausalLM takes input_ids; inputs_embeds is not supported")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: SDPA's own causal path, no mask tensor
        out = self.model(
            input_ids, cache=cache if use_cache else None, attention_mask=attention_mask, position_ids=position_ids
        )
        lm_loss = loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device))
            loss = lm_loss + out.aux_loss
        result = MHMoECausalLMOutput(
            loss=loss,
            logits=out.logits,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            router_stats=tuple(out.routing),
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return result if return_dict is not False else result.to_tuple()
