"""`MHMoEConfig`: the Hugging Face configuration of `mhmoe.models.gpt.GPT`.

It holds `GPTConfig`'s fields under their own names (`d_model`, `n_layers`, …; the FFN settings as the
`ffn` dict of `FFNConfig`, mhmoe 0.1's flat form included), and answers the standard names transformers utilities read (`hidden_size`,
`num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`) through `attribute_map`.
Weight tying is `tie_word_embeddings`, the standard key, which `GPTConfig.tie_embeddings` maps to.
The MoE names transformers' Mixtral and Qwen-MoE configurations use: `output_router_logits` (return each MoE layer's
router logits) and `router_aux_loss_coef`, the balance-loss coefficient of every MoE layer (it reads and writes
`ffn["moe"]["balance_loss_coef"]`: one value, stored once).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from mhmoe.models.ffn import FFNConfig, migrate_ffn
from mhmoe.models.gpt import GPTConfig


class MHMoEConfig(PretrainedConfig):
    """Args: the fields of `GPTConfig` (vocab_size, seq_len, d_model, n_layers, n_heads, dropout, rope_base,
    ffn: a dict of `FFNConfig` fields), tie_word_embeddings, use_cache and output_router_logits (defaults of
    `forward`), router_aux_loss_coef (None: the ffn's balance_loss_coef), and PretrainedConfig's (eos_token_id, …).
    `mhmoe_run` (optional) records the mhmoe train run this model was exported from (`mhmoe.hf.runs`)."""

    model_type = "mhmoe"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 256,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        ffn: dict | None = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        output_router_logits: bool = False,
        router_aux_loss_coef: float | None = None,
        mhmoe_run: dict | None = None,
        **kwargs: Any,
    ):
        self.vocab_size, self.seq_len, self.d_model = vocab_size, seq_len, d_model
        self.n_layers, self.n_heads, self.dropout, self.rope_base = n_layers, n_heads, dropout, rope_base
        ffn = migrate_ffn(dict(ffn or {}))  # models exported by mhmoe 0.1 keep loading
        known = {f.name for f in fields(FFNConfig)}
        unknown = sorted(set(ffn) - known)
        if unknown:
            raise ValueError(f"unknown ffn key(s) {unknown}; FFNConfig has {sorted(known)}")
        self.ffn = FFNConfig.from_dict(ffn).to_dict()
        self.use_cache, self.output_router_logits, self.mhmoe_run = use_cache, output_router_logits, mhmoe_run
        super().__init__(**kwargs)
        self.tie_word_embeddings = tie_word_embeddings  # a constructor argument in transformers 4, a field in 5
        if router_aux_loss_coef is not None:
            self.router_aux_loss_coef = router_aux_loss_coef

    @property
    def router_aux_loss_coef(self) -> float | None:
        """transformers' name for the MoE layers' balance-loss coefficient (None for a dense model)."""
        return None if self.ffn["kind"] == "dense" else float(self.ffn["moe"]["balance_loss_coef"])

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, value: float) -> None:
        if self.ffn["kind"] == "dense":
            raise ValueError(f"router_aux_loss_coef={value} cannot take effect: this model has no MoE layers")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"router_aux_loss_coef must be a number >= 0, got {value!r}")
        self.ffn = {**self.ffn, "moe": {**self.ffn["moe"], "balance_loss_coef": float(value)}}

    def to_gpt_config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
            tie_embeddings=self.tie_word_embeddings,
            rope_base=self.rope_base,
            ffn=FFNConfig.from_dict(self.ffn),
        )

    @classmethod
    def from_gpt_config(cls, cfg: GPTConfig, **kwargs: Any) -> MHMoEConfig:
        data = cfg.to_dict()
        data["tie_word_embeddings"] = data.pop("tie_embeddings")
        return cls(**data, **kwargs)
