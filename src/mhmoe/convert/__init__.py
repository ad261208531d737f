"""Convert existing models to this library's layers.

dense       dense FFNs -> SparseMoE / MH-MoE (upcycling): `moeify`
peers       transformers' MoE blocks (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, Switch) -> SparseMoE with the
            same weights and routing: `swap_moe_blocks`
heads       SparseMoE -> MH-MoE (sub-token experts from the experts' head slices): `moe_to_mhmoe`
calibrate   fit each converted layer to the module it replaced: `capture_ffn_io`, then `calibrate`
pretrained  saved transformers folders: `moeify_pretrained` (`mhmoe moeify`), `load_moeified`
wrap        `MoEFFN`, the stand-in module, and `moe_aux_loss` / `moe_outputs`
"""

from mhmoe.convert.calibrate import calibrate, capture_ffn_io, relative_error
from mhmoe.convert.dense import DenseWeights, ExpertExtras, dense_weights, find_dense_ffns, moeify
from mhmoe.convert.heads import find_smoe_layers, mhmoe_from_smoe, moe_to_mhmoe
from mhmoe.convert.peers import PeerBlock, find_moe_blocks, layer_from_block, read_moe_block, swap_moe_blocks
from mhmoe.convert.pretrained import RECIPE_FILE, WEIGHTS_FILE, convert, load_moeified, moeify_pretrained
from mhmoe.convert.wrap import MoEFFN, moe_aux_loss, moe_outputs

__all__ = [
    "RECIPE_FILE",
    "WEIGHTS_FILE",
    "DenseWeights",
    "ExpertExtras",
    "MoEFFN",
    "PeerBlock",
    "calibrate",
    "capture_ffn_io",
    "convert",
    "dense_weights",
    "find_dense_ffns",
    "find_moe_blocks",
    "find_smoe_layers",
    "layer_from_block",
    "load_moeified",
    "mhmoe_from_smoe",
    "moe_aux_loss",
    "moe_outputs",
    "moe_to_mhmoe",
    "moeify",
    "moeify_pretrained",
    "read_moe_block",
    "relative_error",
    "swap_moe_blocks",
]
