"""Models built from the layers. They know nothing about training."""

from mhmoe.models.gpt import GPT, FFNConfig, GPTConfig, GPTOutput

__all__ = ["GPT", "FFNConfig", "GPTConfig", "GPTOutput"]
