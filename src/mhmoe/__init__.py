"""mhmoe: Multi-Head Mixture-of-Experts and sparse-MoE layers for PyTorch.

The public API: the layers and their one configuration (`MoEConfig`, `RouterConfig`), the routers, and the
GPT decoder built from them; and `load_run(run_dir)`, a trained run's model and tokenizer (imported on first use,
so that `import mhmoe` needs only torch and numpy). Training, data, analysis and the paper's experiments live in
subpackages (`mhmoe.train`, `mhmoe.data`, `mhmoe.analysis`, `mhmoe.experiments`) and are imported from there.
"""

from typing import Any

from mhmoe.layers.config import MoEConfig
from mhmoe.layers.experts import DenseFFN, Experts
from mhmoe.layers.moe import MoELayer, MoEOutput, MoEStats, SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.layers.routers import (
    ROUTERS,
    Router,
    RouterConfig,
    RouterOutput,
    SigmoidRouter,
    SoftmaxRouter,
    SwitchRouter,
    XMoERouter,
)
from mhmoe.models.gpt import GPT, FFNConfig, GPTConfig
from mhmoe.version import __version__

__all__ = [
    "DenseFFN",
    "Experts",
    "FFNConfig",
    "GPT",
    "GPTConfig",
    "MHMoE",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEStats",
    "ROUTERS",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "SigmoidRouter",
    "SoftmaxRouter",
    "SparseMoE",
    "SwitchRouter",
    "XMoERouter",
    "__version__",
    "load_run",
]


def __getattr__(name: str) -> Any:
    """`mhmoe.load_run` (`mhmoe.analysis.runs.load_run`), imported when first used: it needs the `train` extra."""
    if name == "load_run":
        from mhmoe.analysis.runs import load_run

        return load_run
    raise AttributeError(f"module 'mhmoe' has no attribute {name!r}")
