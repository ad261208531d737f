"""Models built from the layers, and their exact cost. They know nothing about training."""

from mhmoe.models.cost import Cost, cost_of, layer_cost
from mhmoe.models.ffn import FFNConfig, LayerSpec
from mhmoe.models.gpt import GPT, GPTConfig, GPTOutput, KVCache, gpt_cost
from mhmoe.models.multiway import MultiwayConfig, MultiwayOutput, MultiwayTransformer, multiway_cost

__all__ = [
    "Cost",
    "FFNConfig",
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "LayerSpec",
    "MultiwayConfig",
    "MultiwayOutput",
    "MultiwayTransformer",
    "cost_of",
    "gpt_cost",
    "layer_cost",
    "multiway_cost",
]
