"""mhmoe: Multi-Head Mixture-of-Experts and sparse-MoE layers for PyTorch.

The public API: the layers and their one configuration (`MoEConfig`, `RouterConfig`), the routers, and the
GPT decoder built from them; and `load_run(run_dir)`, a trained run's model and tokenizer (it needs the `train`
extra). Each is imported when first used, so that `import mhmoe` itself loads nothing, torch included. Training,
data, analysis and the paper's experiments live in subpackages (`mhmoe.train`, `mhmoe.data`, `mhmoe.analysis`, `mhmoe.experiments`) and are imported from there.
"""

import importlib
from typing import TYPE_CHECKING, Any

from mhmoe.version import __version__

if TYPE_CHECKING:
    from mhmoe.analysis.runs import load_run
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

# Where each public name comes from: imported when first used, so that `import mhmoe` loads no torch and the command
# line can make the settings torch reads only as it loads (mhmoe.train.threads) before anything loads it.
_MODULES = {
    "mhmoe.layers.config": ("MoEConfig",),
    "mhmoe.layers.experts": ("DenseFFN", "Experts"),
    "mhmoe.layers.moe": ("MoELayer", "MoEOutput", "MoEStats", "SparseMoE"),
    "mhmoe.layers.multihead": ("MHMoE",),
    "mhmoe.layers.routers": ("ROUTERS", "Router", "RouterConfig", "RouterOutput", "SigmoidRouter", "SoftmaxRouter",
                             "SwitchRouter", "XMoERouter"),
    "mhmoe.models.gpt": ("GPT", "FFNConfig", "GPTConfig"),
    "mhmoe.analysis.runs": ("load_run",),  # needs the `train` extra
}  # fmt: skip
_SOURCES = {name: module for module, names in _MODULES.items() for name in names}

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
    """A public name, imported from its module when first used (and kept)."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'mhmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
