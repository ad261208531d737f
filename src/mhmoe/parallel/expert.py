"""Expert parallelism: each rank of an expert group holds E / P of every MoE layer's experts.

Shape legend: S routed (sub-)tokens on this rank, d their width, E experts of a layer, P ranks in the
expert group, El = E / P experts per rank, R rows this rank sends (K·S), N rows it receives.

Mesh: a 2-D DeviceMesh ("replicate", "expert") over all W ranks, rank = replicate · P + expert. Every
rank has its own slice of the batch (W-way data parallelism). The ranks of one "expert" row form an
expert group: together they hold all E experts, rank p the experts p·El … (p+1)·El − 1. Groups are
replicas of each other (W / P of them), like data-parallel replicas.

One MoE layer, on every rank (SparseMoE's `dispatch_sorted` does 1 and 5, `AllToAllExperts` 2–4):
    1. sort the R = K·S rows by expert (= by destination rank)
    2. exchange the per-expert row counts (all_to_all_single of E ints; a host sync: splits are ints)
    3. all_to_all_single the rows (variable splits); regroup them from (source, expert) to (expert, source)
    4. run the El local experts with the grouped GEMMs of `mhmoe.ops.sorted`; regroup; send back
    5. unsort and combine with the gates, as in one process
Every rank joins both exchanges, also with no rows to send or receive (it sends and gets empty
blocks), so a rank whose experts get no tokens, or that has no tokens, never leaves a peer waiting.

Expert weights are DTensors, Shard(0) over "expert" and Replicate over "replicate": their local
tensor is this rank's El experts, and torch.distributed.checkpoint can reshard them to any P.

Gradients. A rank's expert gradient, after the backward all-to-all, is the sum over the P ranks of
its group of d(loss_r)/dw. With loss_r the mean over rank r's batch (what data parallelism averages),
the single-process gradient of the global mean is (1 / W) Σ_r d(loss_r)/dw: `finish_expert_gradients`
sums over the replicas and divides by W — not by P or W / P (the classic EP scaling bugs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from mhmoe.layers.moe import SparseMoE
from mhmoe.ops.backend import Backend
from mhmoe.ops.reference import ExpertWeights
from mhmoe.ops.sorted import permuted_expert_ffn

EXPERT_WEIGHTS = ("w_in", "w_out")


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (differentiable); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _AllToAll.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's copy is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _exchange(x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def _regroup(counts_PE: Tensor) -> tuple[Tensor, Tensor]:
    """Row permutation from blocks ordered (source p, expert e) to (expert e, source p), and its inverse.

    counts_PE: (P, El) rows in block (p, e), laid out row-major. Returns (perm_N, inverse_N) such that
    rows[perm_N] is grouped by expert, each expert's rows in source order.
    """
    P, El = counts_PE.shape
    block_N = torch.repeat_interleave(torch.arange(P * El, device=counts_PE.device), counts_PE.reshape(-1))
    key_N = (block_N % El) * P + block_N // El
    perm_N = torch.argsort(key_N, stable=True)
    inverse_N = torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(len(perm_N), device=perm_N.device))
    return perm_N, inverse_N


class AllToAllExperts:
    """An `ExpertRunner` (mhmoe.ops.sorted) that runs rows on the rank holding their expert.

    group: the expert group (P ranks); num_experts: the layer's E, a multiple of P.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group, self.num_experts = group, num_experts
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({self.size})")
        self.local_experts = num_experts // self.size

    def __call__(
        self, x_Rd: Tensor, counts_E: Tensor, experts: ExpertWeights, backend: Backend, recompute: bool
    ) -> Tensor:
        P, El = self.size, self.local_experts
        recv_counts_E = torch.empty_like(counts_E)  # block p: rows rank p sends to each of my El experts
        dist.all_to_all_single(recv_counts_E, counts_E, group=self.group)
        send_splits = counts_E.view(P, El).sum(1).tolist()  # host sync: split sizes are Python ints
        recv_counts_PE = recv_counts_E.view(P, El)
        recv_splits = recv_counts_PE.sum(1).tolist()

        x_Nd = _exchange(x_Rd, send_splits, recv_splits, self.group)  # blocks (source, expert)
        perm_N, inverse_N = _regroup(recv_counts_PE)
        w_in, w_out = (local_tensor(w).to(x_Rd.dtype) for w in (experts.w_in, experts.w_out))
        counts_El = recv_counts_PE.sum(0)
        y_Nd = permuted_expert_ffn(  # regrouped by expert inside, results back in blocks (source, expert)
            x_Nd, w_in, w_out, perm_N, inverse_N, counts_El, experts.activation, backend, recompute
        )
        return _exchange(y_Nd, recv_splits, send_splits, self.group)

    def __repr__(self) -> str:
        return f"AllToAllExperts(rank {self.rank} of {self.size}, experts {self.rank * self.local_experts}…)"


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    """Every SparseMoE in model, including the one inside each MHMoE."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(moe.experts, name) for moe in moe_layers(model) for name in EXPERT_WEIGHTS]


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep this rank's share of every MoE layer's experts (as DTensors) and install the all-to-all runner.

    mesh: 2-D ("replicate", "expert"). Every rank must have built the same model (same seed): each keeps
    its slice of the full weights, no communication. In place; returns model.
    """
    for moe in moe_layers(model):
        if moe.experts.bias:  # the all-to-all runner runs bias-free GEMMs
            raise ValueError(
                "expert parallelism does not support expert biases yet (expert_bias=True); use parallel.expert=1"
            )
    group = mesh.get_group("expert")
    for moe in moe_layers(model):
        if moe.dispatch == "reference":
            raise ValueError("expert parallelism needs the sorted dispatch; got a SparseMoE with dispatch='reference'")
        runner = AllToAllExperts(group, moe.num_experts)
        shard_expert_weights(moe, mesh)
        moe.expert_runner = runner
    return model


def shard_expert_weights(moe: SparseMoE, mesh: DeviceMesh) -> None:
    """Replace moe's expert weights by DTensors, Replicate over the mesh's first dim ("replicate") and Shard(0) over
    each of the others in turn: with sizes P1, P2, … this rank keeps slice p1·P2·… + p2·… + … of the full weights
    (its row-major position among the sharding dims). In place."""
    sizes = mesh.shape[1:]
    index = 0
    for dim, size in enumerate(sizes, start=1):
        index = index * size + mesh.get_local_rank(dim)
    parts = math.prod(sizes)
    for name in EXPERT_WEIGHTS:
        full = getattr(moe.experts, name)
        if isinstance(full, DTensor):
            raise ValueError("the experts of this model were already sharded")
        part = full.detach().chunk(parts, dim=0)[index].clone()
        sharded = DTensor.from_local(part, mesh, [Replicate(), *[Shard(0)] * len(sizes)], run_check=False)
        setattr(moe.experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))


@torch.no_grad()
def finish_expert_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make expert gradients equal to the single-process gradient of the global mean loss.

    Call once after the backward passes of a step, before clipping. Sums each expert gradient over the
    replicas holding the same experts and divides by the world size W (module doc).
    """
    world = mesh.size()
    replicas = mesh.get_group("replicate") if mesh.size(0) > 1 else None
    for p in expert_parameters(model):
        if p.grad is None:
            continue
        g = local_tensor(p.grad)
        g.div_(world)
        if replicas is not None:
            dist.all_reduce(g, group=replicas)


def all_reduce_sum(group: dist.ProcessGroup):
    """A `mhmoe.layers.losses.Reduce` over group: a differentiable all-reduce (its backward sums too)."""

    def reduce(t: Tensor) -> Tensor:
        return _AllReduceSum.apply(t, group)

    return reduce


def use_global_balance(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Balance and z-losses over the global batch: their statistics are all-reduced over group.

    Each rank then holds the same loss value (the single-process value on the global batch). Its gradient
    reaches each rank's router summed over the group's ranks — W times the share of that rank's batch —
    which the data-parallel average (÷ W) turns into the single-process gradient.
    """
    for moe in moe_layers(model):
        moe.loss_reduce = all_reduce_sum(group)
