"""Head parallelism (Multi-Head LatentMoE, arXiv 2602.04870): each rank of a head group holds H / P heads of every
MH-MoE layer that has a router and a pool of experts per head (`per_head_experts`), and every rank's sub-tokens of
those heads come to it.

Shape legend: T tokens on a rank (the same on every rank), H heads, P ranks in the head group, Hl = H / P heads per
rank, d sub-token width, S = P·T·Hl sub-tokens a rank routes.

One layer, on every rank (`HeadParallelRunner`, called by MHMoE in place of its inner SparseMoE):
    1. the multi-head layer (a dense weight, replicated like any other) and the split into H sub-tokens, as in one
       process: (T, H, d) viewed as (T, P, Hl, d)
    2. all_to_all with equal splits T·Hl·d: block p of what a rank sends is its sub-tokens of rank p's heads; it
       receives every rank's sub-tokens of its own Hl heads, (P, T, Hl, d). The splits are known before the step
       (no size exchange, no host sync for sizes) and do not depend on the routing or on top-k.
    3. its Hl routers and Hl·E experts route and run those S sub-tokens (a SparseMoE with a HeadRouters of Hl)
    4. all_to_all back with the same splits; the merge layer as in one process
Per token, each direction moves H·d = L values (the latent width), whatever K and the routing.

Losses and gradients. A rank's auxiliary loss is the mean of its heads' balance losses over the global batch (all P
ranks' tokens), so the mean over ranks is one process's loss on the global batch. A rank's routers and experts get,
through the backward all-to-all, the sum over ranks of d(loss_r)/dw; `finish_head_gradients` divides it by the world
size W (and sums over replicas of the same heads), which with the data-parallel average of every other weight gives
the single-process gradient of the global mean loss — the same rule as expert parallelism (`mhmoe.parallel.expert`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mhmoe.layers.moe import MoEOutput, SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.layers.routers import HeadRouters


class _EqualAllToAll(torch.autograd.Function):
    """all_to_all_single of P equal blocks along dim 0; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _EqualAllToAll.apply(grad, ctx.group), None


class HeadParallelRunner:
    """Runs an MHMoE's sub-tokens on the ranks holding their heads (module doc). group: the head group (P ranks)."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        if num_heads % self.size:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by the head-parallel size ({self.size}): each rank "
                "holds num_heads / size heads"
            )
        self.num_heads, self.local_heads = num_heads, num_heads // self.size

    def __call__(self, moe: SparseMoE, h_Sd: Tensor, valid_S: Tensor | None, sequence_length: int) -> MoEOutput:
        """h_Sd: (T·H, d) this rank's sub-tokens, row i·H + j; valid_S: (T·H,) or None; sequence_length: the tokens
        per sequence (for token_group="sequence"). Returns the inner layer's output for this rank's sub-tokens."""
        P, Hl, d = self.size, self.local_heads, h_Sd.shape[-1]
        x_PTHd = h_Sd.view(-1, P, Hl, d).transpose(0, 1).contiguous()  # block p: the heads of rank p
        mine_PTHd = _EqualAllToAll.apply(x_PTHd, self.group)  # block p: rank p's tokens, my heads
        valid = None
        if valid_S is not None:
            valid_PTH = valid_S.view(-1, P, Hl).transpose(0, 1).contiguous().to(torch.uint8)
            valid = _EqualAllToAll.apply(valid_PTH, self.group).bool()
        T = mine_PTHd.shape[1]
        shape = (P * (T // sequence_length), sequence_length * Hl, d)  # whole sequences, each rank's in turn
        routed = moe(mine_PTHd.view(shape), None if valid is None else valid.view(shape[:-1]))
        y_PTHd = _EqualAllToAll.apply(routed.y.reshape(P, T, Hl, d), self.group)  # back to the tokens' ranks
        return MoEOutput(y_PTHd.transpose(0, 1).reshape(h_Sd.shape), routed.aux_loss, routed.stats)

    def __repr__(self) -> str:
        first = self.rank * self.local_heads
        return f"HeadParallelRunner(rank {self.rank} of {self.size}, heads {first}…{first + self.local_heads - 1})"


def head_parallel_layers(model: nn.Module) -> list[MHMoE]:
    return [m for m in model.modules() if isinstance(m, MHMoE) and m.head_runner is not None]


def check_head_layout(model: nn.Module, size: int) -> list[MHMoE]:
    """The layers head parallelism of `size` ranks places, or one line saying why it cannot."""
    layers = [m for m in model.modules() if isinstance(m, MHMoE)]
    if not layers:
        raise ValueError("head parallelism needs MHMoE layers; the model has none")
    for layer in layers:
        if not layer.config.per_head_experts:
            raise ValueError(
                "head parallelism needs a router and a pool of experts per head (per_head_experts=True): with one "
                "router and pool shared by the heads every rank would need every expert"
            )
        if layer.num_heads % size:
            raise ValueError(
                f"num_heads ({layer.num_heads}) must be divisible by the head-parallel size ({size}): each rank "
                "holds num_heads / size heads"
            )
        if layer.moe.shared_experts is not None:
            raise ValueError("head parallelism does not place shared experts; use num_shared_experts=0")
        if layer.moe.expert_runner is not None or layer.head_runner is not None:
            raise ValueError("the layers are already parallel (experts or heads); head parallelism is applied once")
    return layers


def shard_heads(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Keep this rank's H / P heads of every per-head MHMoE layer (their routers and expert pools) and install the
    all-to-all runner. Every rank must have built the same model (same seed); no communication. In place."""
    for layer in check_head_layout(model, dist.get_world_size(group)):
        runner = HeadParallelRunner(group, layer.num_heads)
        layer.moe = _local_part(layer.moe, runner.rank, runner.local_heads)
        layer.head_runner = runner
    return model


def _local_part(moe: SparseMoE, rank: int, local_heads: int) -> SparseMoE:
    """A SparseMoE of this rank's heads: their routers and their pools (experts rank·Hl·E … (rank+1)·Hl·E − 1)."""
    router = moe.router
    assert isinstance(router, HeadRouters)
    E, first = router.pool_size, rank * local_heads
    config = dataclasses.replace(moe.config, num_experts=local_heads * E)
    local = SparseMoE(
        config, d_model=moe.d_model, router=HeadRouters([router.head(first + j) for j in range(local_heads)])
    )
    local.to(moe.experts.w_in.device, moe.experts.w_in.dtype)
    with torch.no_grad():
        for name in ("w_in", "w_out", "b_in", "b_out"):
            full = getattr(moe.experts, name)
            if full is not None:
                getattr(local.experts, name).copy_(full[first * E : (first + local_heads) * E])
    return local


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters head parallelism shards: the routers and experts of every head-parallel layer."""
    return [p for layer in head_parallel_layers(model) for p in layer.moe.parameters()]


@torch.no_grad()
def finish_head_gradients(model: nn.Module, world: int, replicas: dist.ProcessGroup | None = None) -> None:
    """Make the sharded routers' and experts' gradients the single-process gradient of the global mean loss: divide
    by the world size W and sum over the replicas that hold the same heads (module doc). Once per step, after the
    backward passes, before clipping."""
    for p in head_parameters(model):
        if p.grad is not None:
            p.grad.div_(world)
            if replicas is not None:
                dist.all_reduce(p.grad, group=replicas)
