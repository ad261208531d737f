"""mhmoe: Multi-Head Mixture-of-Experts and sparse-MoE layers for PyTorch."""

from mhmoe.layers.experts import DenseFFN, Experts
from mhmoe.layers.moe import MoEOutput, MoEStats, SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.layers.routers import ROUTERS, Router, RouterOutput, SigmoidRouter, SoftmaxRouter, SwitchRouter, XMoERouter

__version__ = "0.1.0"

__all__ = [
    "DenseFFN",
    "Experts",
    "MHMoE",
    "MoEOutput",
    "MoEStats",
    "ROUTERS",
    "Router",
    "RouterOutput",
    "SigmoidRouter",
    "SoftmaxRouter",
    "SparseMoE",
    "SwitchRouter",
    "XMoERouter",
    "__version__",
]
