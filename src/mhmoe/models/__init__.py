"""Models built from the layers. They know nothing about training."""

from mhmoe.models.gpt import GPT, FFNConfig, GPTConfig, GPTOutput, KVCache

__all__ = ["GPT", "FFNConfig", "GPTConfig", "GPTOutput", "KVCache"]
