"""`MHMoEConfig`: the Hugging Face configuration of `mhmoe.models.gpt.GPT`.

It holds `GPTConfig`'s fields under their own names (`d_model`, `n_layers`, …; the FFN settings as the
`ffn` dict of `FFNConfig`, mhmoe 0.1's flat form included), and answers the standard names transformers utilities read (`hidden_size`,
`num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`) through `attribute_map`.
Weight tying is `tie_word_embeddings`, the standard key, which `GPTConfig.tie_embeddings` maps to.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PretrainedConfig

from mhmoe.models.ffn import FFNConfig, migrate_ffn
from mhmoe.models.gpt import GPTConfig


class MHMoEConfig(PretrainedConfig):
    """Args: the fields of `GPTConfig` (vocab_size, seq_len, d_model, n_layers, n_heads, dropout, rope_base,
    ffn: a dict of `FFNConfig` fields), tie_word_embeddings, use_cache (default of `forward`), and
    PretrainedConfig's (eos_token_id, …).
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
        self.use_cache, self.mhmoe_run = use_cache, mhmoe_run
        super().__init__(**kwargs)
        self.tie_word_embeddings = tie_word_embeddings  # a constructor argument in transformers 4, a field in 5

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
