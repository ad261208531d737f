"""Head parallelism (Multi-Head LatentMoE, arXiv 2602.04870): each rank of a head group holds H / P heads' experts of
every MH-MoE layer that has a router and a pool of experts per head (`per_head_experts`), and every rank's sub-tokens
of those heads come to it.

Shape legend: T tokens on a rank (the same on every rank), H heads, P ranks in the head group, Hl = H / P heads per
rank, E experts per head, d sub-token width, S = P·T·Hl sub-tokens a rank routes.

Mesh: a 3-D DeviceMesh ("replicate", "head", "expert") over all W ranks, of sizes (W / (P·Q), P, Q), rank =
(replicate · P + head) · Q + expert, like expert parallelism's ("replicate", "expert") (`mhmoe.parallel.expert`):
every rank has its own slice of the batch; the P ranks along "head" form a head group and together hold all H heads,
rank p the heads p·Hl … (p+1)·Hl − 1. With expert parallelism composed (Q > 1), the Q ranks along "expert" hold the
same heads and split their Hl·E experts between them, as expert parallelism splits a layer's: after step 2 the
rows go to the rank of their expert by `AllToAllExperts` over that expert group (variable splits). Q = 1 without.

One layer, on every rank (`HeadParallelRunner`, called by MHMoE in place of its inner SparseMoE):
    1. the multi-head layer (a dense weight, replicated like any other) and the split into H sub-tokens, as in one
       process: (T, H, d) viewed as (T, P, Hl, d)
    2. all_to_all with equal splits T·Hl·d: block p of what a rank sends is its sub-tokens of rank p's heads; it
       receives every rank's sub-tokens of its own Hl heads, (P, T, Hl, d). The splits are known before the step
       (no size exchange, no host sync for sizes) and do not depend on the routing or on top-k.
    3. its Hl routers and Hl·E experts route and run those S sub-tokens (`_local_layer`: a SparseMoE over the
       layer's own router and expert modules, seeing only this rank's heads)
    4. all_to_all back with the same splits; the merge layer as in one process
Per token, each direction moves H·d = L values (the latent width), whatever K and the routing.

What is sharded. The expert weights of the H·E experts: DTensors, Shard(0) over "head" and "expert" and Replicate
over "replicate", as expert parallelism shards an MoE layer's experts (with Q = 1 rank p's local tensor is experts
p·Hl·E … (p+1)·Hl·E − 1, its heads' pools), so the state dict, the distributed checkpoints (resharded to any P, or
to one process) and the consolidated weights are the single-process ones. The routers (L·E values a layer) stay
replicated on every rank, each rank running only its heads'; so a sigmoid router's bias step and the checkpoints
need nothing new.

Losses and gradients. A rank's auxiliary loss is the mean of its heads' balance losses over its head group's batch
(all P ranks' tokens; with a global balance, `use_global_balance` over the ranks holding the same heads,
`head_replicas`, the global batch), so the mean over ranks is one process's loss. A rank's experts get, through the backward all-to-all, the sum over ranks of
d(loss_r)/dw; `finish_expert_gradients` divides it by the world size W and sums over the replicas — the rule of
expert parallelism. A router's gradient is only computed on the ranks holding its head: `finish_router_gradients`
sums it over all W ranks and divides by W (the data-parallel average, with zeros from the other ranks). With the
data-parallel average of every other weight this is the single-process gradient of the global mean loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from mhmoe.layers.experts import Experts
from mhmoe.layers.moe import MoEOutput, SparseMoE
from mhmoe.layers.multihead import MHMoE
from mhmoe.layers.routers import HeadRouters
from mhmoe.parallel.expert import AllToAllExperts, local_tensor, moe_layers, shard_expert_weights


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


class _LocalExperts(nn.Module):
    """This rank's Hl·E experts of a head-sharded `Experts`, as plain tensors (differentiable views of the DTensor
    weights' local parts): what the local layer's dispatch reads, fused paths included."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.source = experts

    @property
    def w_in(self) -> Tensor:
        return local_tensor(self.source.w_in)

    @property
    def w_out(self) -> Tensor:
        return local_tensor(self.source.w_out)

    @property
    def activation(self) -> str:
        return self.source.activation

    def forward(self, compute: Callable[[_LocalExperts], Tensor]) -> Tensor:
        return compute(self)


def _local_layer(moe: SparseMoE, rank: int, local_heads: int) -> SparseMoE:
    """A SparseMoE over this rank's heads of `moe`: their routers (the same modules) and their pools (the local part
    of the same weights), Hl·E experts (their share of them under expert parallelism). Not a submodule of the model:
    it owns no parameter or state of its own."""
    router = moe.router
    assert isinstance(router, HeadRouters)
    first = rank * local_heads
    config = dataclasses.replace(moe.config, num_experts=local_heads * router.pool_size)
    with torch.device("meta"):  # its own experts are replaced below; nothing is allocated
        local = SparseMoE(
            config, d_model=moe.d_model, router=HeadRouters([router.head(first + j) for j in range(local_heads)])
        )
    local.experts = _LocalExperts(moe.experts)  # type: ignore[assignment]  # an ExpertWeights, as the dispatch needs
    return local


class HeadParallelRunner:
    """Runs an MHMoE's sub-tokens on the ranks holding their heads (module doc). group: the head group (P ranks);
    experts: the expert group (Q ranks) among which the heads' experts are split, or None (Q = 1)."""

    def __init__(
        self, group: dist.ProcessGroup, moe: SparseMoE, num_heads: int, experts: dist.ProcessGroup | None = None
    ):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        if num_heads % self.size:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by the head-parallel size ({self.size}): each rank "
                "holds num_heads / size heads"
            )
        self.num_heads, self.local_heads = num_heads, num_heads // self.size
        self.moe, self.local = moe, _local_layer(moe, self.rank, self.local_heads)
        if experts is not None:  # expert parallelism inside the heads
            self.local.expert_runner = AllToAllExperts(experts, self.local.num_experts)

    def __call__(self, moe: SparseMoE, h_Sd: Tensor, valid_S: Tensor | None, sequence_length: int) -> MoEOutput:
        """h_Sd: (T·H, d) this rank's sub-tokens, row i·H + j; valid_S: (T·H,) or None; sequence_length: the tokens
        per sequence (for token_group="sequence"). Returns the inner layer's output for this rank's sub-tokens."""
        assert moe is self.moe, "a HeadParallelRunner serves the layer it was made for"
        local = self.local  # the layer's current settings: train/eval, dispatch, recompute, the loss reduction
        local.training, local.loss_reduce = moe.training, moe.loss_reduce
        local.config = dataclasses.replace(moe.config, num_experts=local.config.num_experts)
        P, Hl, d = self.size, self.local_heads, h_Sd.shape[-1]
        x_PTHd = h_Sd.view(-1, P, Hl, d).transpose(0, 1).contiguous()  # block p: the heads of rank p
        mine_PTHd = _EqualAllToAll.apply(x_PTHd, self.group)  # block p: rank p's tokens, my heads
        valid = None
        if valid_S is not None:
            valid_PTH = valid_S.view(-1, P, Hl).transpose(0, 1).contiguous().to(torch.uint8)
            valid = _EqualAllToAll.apply(valid_PTH, self.group).bool()
        T = mine_PTHd.shape[1]
        shape = (P * (T // sequence_length), sequence_length * Hl, d)  # whole sequences, each rank's in turn
        routed = local(mine_PTHd.view(shape), None if valid is None else valid.view(shape[:-1]))
        y_PTHd = _EqualAllToAll.apply(routed.y.reshape(P, T, Hl, d), self.group)  # back to the tokens' ranks
        return MoEOutput(y_PTHd.transpose(0, 1).reshape(h_Sd.shape), routed.aux_loss, routed.stats)

    def __repr__(self) -> str:
        first = self.rank * self.local_heads
        return f"HeadParallelRunner(rank {self.rank} of {self.size}, heads {first}…{first + self.local_heads - 1})"


def head_parallel_layers(model: nn.Module) -> list[MHMoE]:
    return [m for m in model.modules() if isinstance(m, MHMoE) and m.head_runner is not None]


def check_head_layout(model: nn.Module, size: int, expert_size: int = 1) -> list[MHMoE]:
    """The layers head parallelism of `size` ranks (each head's experts split over `expert_size` ranks) places, or one
    line saying why it cannot."""
    layers = [m for m in model.modules() if isinstance(m, MHMoE)]
    if not layers:
        raise ValueError("head parallelism needs MHMoE layers; the model has none")
    inner = {id(layer.moe) for layer in layers}
    if any(id(moe) not in inner for moe in moe_layers(model)):
        raise ValueError("head parallelism places MH-MoE layers only; the model has a SparseMoE outside them")
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
        if layer.moe.experts.bias:
            raise ValueError("head parallelism does not shard expert biases yet; use expert_bias=False")
        local_experts = layer.num_heads // size * layer.num_experts
        if local_experts % expert_size:
            raise ValueError(
                f"the {local_experts} experts of a rank's heads (num_heads / {size} × num_experts) must be divisible "
                f"by the expert-parallel size ({expert_size})"
            )
        if expert_size > 1 and layer.moe.dispatch == "reference":
            raise ValueError("expert parallelism needs the sorted dispatch; got dispatch='reference'")
        if layer.moe.expert_runner is not None or layer.head_runner is not None:
            raise ValueError("the layers are already parallel (experts or heads); head parallelism is applied once")
    return layers


def shard_heads(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep this rank's H / P heads' experts of every per-head MHMoE layer (as DTensors; their 1 / Q share under
    expert parallelism) and install the all-to-all runner. mesh: 3-D ("replicate", "head", "expert"). Every rank
    must have built the same model (same seed); no communication. In place; returns model."""
    group, experts = mesh.get_group("head"), mesh.get_group("expert") if mesh.size(2) > 1 else None
    for layer in check_head_layout(model, mesh.size(1), mesh.size(2)):
        shard_expert_weights(layer.moe, mesh)
        layer.head_runner = HeadParallelRunner(group, layer.moe, layer.num_heads, experts)
    return model


def head_replicas(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The group of the ranks holding this rank's heads (its replicas and, under expert parallelism, its expert
    group): a global balance loss sums its statistics over them. Every rank makes every such group (a collective)."""
    ranks_P_ = mesh.mesh.transpose(0, 1).reshape(mesh.size(1), -1)  # head position p: the ranks (r, p, q)
    groups = [dist.new_group(ranks.tolist()) for ranks in ranks_P_]
    return groups[mesh.get_local_rank("head")]


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers of every head-parallel layer: replicated, but each computed on the ranks holding its head."""
    return [p for layer in head_parallel_layers(model) for p in layer.moe.router.parameters()]


@torch.no_grad()
def finish_router_gradients(model: nn.Module) -> None:
    """Make the head-parallel routers' gradients the single-process gradient of the global mean loss: the sum over
    all W ranks (zero where a rank does not hold the head) divided by W, in one all-reduce (module doc). Once per
    step, after the backward passes, before clipping."""
    params = router_parameters(model)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad = part.view_as(p).clone()
