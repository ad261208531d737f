"""The FFNs of a model's blocks: which blocks get an MoE layer, and one description (`LayerSpec`) of each layer
that both the model builder and the cost counter (`mhmoe.models.cost`) read.

`FFNConfig` is the `model.ffn` section of a run: the kind of the MoE blocks (dense, smoe or mhmoe), the dense
FFN's width and activation, and the MoE layer's `MoEConfig` (`model.ffn.moe`). MoE layers replace the FFN of
every `moe_every`-th block (blocks 2, 4, … by default, as in v1; docs/paper-notes.md §2.8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from torch import nn

from mhmoe.layers.config import MoEConfig
from mhmoe.layers.experts import DenseFFN
from mhmoe.layers.moe import SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.ops.activations import Activation

FFNKind = Literal["dense", "smoe", "mhmoe"]
FFN_KINDS: tuple[str, ...] = get_args(FFNKind)


def default_moe() -> MoEConfig:
    return MoEConfig(num_experts=8, top_k=2, expert_hidden=1024, num_heads=4)


@dataclass
class FFNConfig:
    """The FFNs of a `GPT`: dense in every block, or an SMoE / MH-MoE layer (`moe`) in every `moe_every`-th block
    and dense FFNs of width `hidden` in the others."""

    kind: FFNKind = "dense"  # what replaces the FFN of the MoE blocks: "dense", "smoe" or "mhmoe"
    hidden: int = 1024  # hidden width of dense FFNs (the dense model, and the non-MoE blocks)
    activation: Activation = "gelu"  # of dense FFNs; the experts' is moe.activation
    moe_every: int = 2  # MoE in blocks moe_every, 2·moe_every, … (1-based); 1 = every block
    moe: MoEConfig = field(default_factory=default_moe)  # the MoE layer (smoe and mhmoe kinds)

    def __post_init__(self) -> None:
        # an SMoE reads no multi-head field (`MoEConfig.routed_part`): keep them at their defaults, so that the
        # recorded configuration says what was trained (an explicit --set of one is refused by the run config)
        if self.kind == "smoe" and isinstance(self.moe, MoEConfig):
            self.moe = self.moe.routed_part()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FFNConfig:
        data = migrate_ffn(data)
        if "moe" in data:
            try:
                data = {**data, "moe": MoEConfig.from_dict(data["moe"])}
            except ValueError as e:
                raise ValueError(f"ffn.moe: {e}") from None
        return cls(**data)


@dataclass(frozen=True)
class LayerSpec:
    """One FFN layer: its kind, width and configuration; `build()` makes it, `mhmoe.models.cost` counts it."""

    kind: FFNKind
    d_model: int
    moe: MoEConfig | None = None  # smoe and mhmoe
    hidden: int = 0  # dense
    activation: Activation = "gelu"  # dense
    bias: bool = False  # dense

    def build(self) -> nn.Module:
        if self.kind == "dense":
            return DenseFFN(d_model=self.d_model, hidden=self.hidden, activation=self.activation, bias=self.bias)
        if self.moe is None:
            raise ValueError(f"a {self.kind} layer needs a MoEConfig")
        layer = SparseMoE if self.kind == "smoe" else MHMoE
        return layer(self.moe, d_model=self.d_model)


def block_ffns(ffn: FFNConfig, d_model: int, n_layers: int) -> list[LayerSpec]:
    """The FFN of each of n_layers blocks: the MoE layer in every `moe_every`-th block (1-based), dense elsewhere."""
    dense = LayerSpec("dense", d_model, hidden=ffn.hidden, activation=ffn.activation)
    moe = LayerSpec(ffn.kind, d_model, moe=ffn.moe)
    is_moe = [ffn.kind != "dense" and (i + 1) % ffn.moe_every == 0 for i in range(n_layers)]
    return [moe if flag else dense for flag in is_moe]


# The FFN section as mhmoe 0.1 wrote it (flat; `router_form` for X-MoE; capacity 0 = dropless). Run folders and
# exported models of that version keep loading: `FFNConfig.from_dict` rewrites it into today's form.
_V01_MOE_KEYS = (
    "num_experts", "top_k", "expert_hidden", "num_heads", "capacity_factor", "balance_loss_coef", "z_loss_coef",
    "num_shared_experts", "multi_head_layers", "merge_layers", "residual", "recompute",
)  # fmt: skip


V01_RENAMED = {key: f"moe.{key}" for key in _V01_MOE_KEYS} | {
    "router": "moe.router.kind",
    "router_form": "moe.router.form",
}


def migrate_ffn(data: dict) -> dict:
    """An FFN section in today's form (`moe` nested), from today's or mhmoe 0.1's flat form."""
    if "moe" in data or not ({"router", "router_form"} | set(_V01_MOE_KEYS)) & set(data):
        return data
    data = dict(data)
    moe = {key: data.pop(key) for key in _V01_MOE_KEYS if key in data}
    router, form = data.pop("router", "softmax"), data.pop("router_form", "paper")
    moe["router"] = {"kind": router, **({"form": form} if router == "xmoe" else {})}
    moe["capacity_factor"] = moe.get("capacity_factor") or None  # 0 meant dropless
    moe["activation"] = data.get("activation", "gelu")  # one field served dense FFNs and experts
    defaults = asdict(default_moe())
    return {**data, "moe": {**defaults, **moe}}
