"""Models built from the layers. They know nothing about training."""

from mhmoe.models.gpt import GPT, FFNConfig, GPTConfig, GPTOutput, KVCache
from mhmoe.models.multiway import MultiwayConfig, MultiwayOutput, MultiwayTransformer, multiway_cost

__all__ = [
    "GPT",
    "FFNConfig",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "MultiwayConfig",
    "MultiwayOutput",
    "MultiwayTransformer",
    "multiway_cost",
]
