"""Process group, device mesh and data parallelism for the non-expert parameters.

W ranks, expert-parallel size Q and head-parallel size P (P·Q divides W). Every rank trains on its own slice of the
global batch. Non-expert parameters (attention, norms, routers, embeddings, shared experts)
are data-parallel over all W ranks: replicated with DDP, or sharded with FSDP2 `fully_shard`; both average their
gradients over W. Expert weights are sharded over the Q ranks of an expert group (`mhmoe.parallel.expert`) and, for
per-head pools, the P ranks of a head group (`mhmoe.parallel.head`), and left out of DDP/FSDP, as are the routers of
head-parallel layers (each computed on its head's ranks only); `finish_gradients` reduces them. Gradient clipping
and the sigmoid router's bias update need the whole picture, so they live here too.

Failure behaviour: the process group is created with a timeout; a collective that waits longer (a peer
died, hung or diverged) raises on every rank that waits, so the job ends with an error instead of hanging.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from mhmoe.errors import ConfigError
from mhmoe.layers.routers import SigmoidRouter
from mhmoe.parallel.expert import (
    expert_parameters,
    finish_expert_gradients,
    local_tensor,
    shard_experts,
    use_global_balance,
)
from mhmoe.parallel.head import finish_router_gradients, head_replicas, router_parameters, shard_heads

DataParallel = Literal["ddp", "fsdp"]
Balance = Literal["local", "global"]


def launched_distributed() -> bool:
    """True under torchrun (it sets WORLD_SIZE) or when a process group already exists."""
    return (dist.is_available() and dist.is_initialized()) or "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device, backend: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Join the process group torchrun describes (env:// rendezvous), unless one exists already.

    device: "cuda" picks cuda:LOCAL_RANK. backend "auto" is NCCL on CUDA, gloo on CPU. Returns this rank's device.
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("distributed training needs torchrun: torchrun --nproc-per-node N -m mhmoe train ...")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


@dataclass
class Layout:
    """Where this rank sits: a 2-D mesh ("replicate", "expert") of W ranks — 3-D ("replicate", "head", "expert")
    under head parallelism — and a 1-D ("data",) mesh of all W."""

    mesh: DeviceMesh
    data_mesh: DeviceMesh
    data_parallel: DataParallel = "ddp"

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return self.mesh.size()

    @property
    def expert_size(self) -> int:
        return self._size("expert")

    @property
    def head_size(self) -> int:
        return self._size("head")

    def _size(self, dim: str) -> int:
        names = self.mesh.mesh_dim_names or ()
        return self.mesh.size(names.index(dim)) if dim in names else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_layout(expert: int, device_type: str, data_parallel: DataParallel = "ddp", head: int = 1) -> Layout:
    """Meshes for expert-parallel size `expert` and head-parallel size `head` over the current process group (W must
    be a multiple of their product)."""
    world = dist.get_world_size()
    for key, size in (("expert", expert), ("head", head)):
        if size < 1 or world % size:
            raise ConfigError(
                f"parallel.{key} ({size}) must divide the number of processes ({world}); "
                f"run torchrun --nproc-per-node with a multiple of {size}"
            )
    if world % (head * expert):
        raise ConfigError(
            f"parallel.head × parallel.expert ({head} × {expert}) must divide the number of processes ({world})"
        )
    if data_parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel.data must be ddp or fsdp, got {data_parallel!r}")
    if head > 1:
        mesh = init_device_mesh(
            device_type, (world // (head * expert), head, expert), mesh_dim_names=("replicate", "head", "expert")
        )
    else:
        mesh = init_device_mesh(device_type, (world // expert, expert), mesh_dim_names=("replicate", "expert"))
    data_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("data",))
    return Layout(mesh, data_mesh, data_parallel)


def parallelize(
    model: nn.Module, layout: Layout, balance: Balance = "local", partial_forwards: bool = False
) -> nn.Module:
    """Shard the experts (or, with a head layout, the per-head layers' heads), choose the balance statistics, wrap the
    rest for data parallelism.

    `model` is changed in place (keep it: its state dict, modules and parameters are the ones to save,
    clip and update); the returned module is the one to call in training (a DDP wrapper, or model itself
    under FSDP2). balance: "local" — router losses over each rank's micro-batch (a head group's, under head
    parallelism); "global" — over all ranks'.
    partial_forwards: a forward may use only part of the parameters (e.g. a multiway model's text-only forward
    leaves the vision FFNs unused); DDP then looks for the unused ones after each forward.
    """
    if layout.head_size > 1:
        try:
            shard_heads(model, layout.mesh)
        except ValueError as e:
            raise ConfigError(f"parallel.head={layout.head_size}: {e}") from None
    else:
        shard_experts(model, layout.mesh)
    if balance == "global":  # under head parallelism a head group's batch is already a rank's: add the replicas'
        group = head_replicas(layout.mesh) if layout.head_size > 1 else layout.data_mesh.get_group()
        use_global_balance(model, group)
    elif balance != "local":
        raise ConfigError(f"parallel.balance must be local or global, got {balance!r}")
    # left to finish_gradients (Tensor hashes are ids: membership is identity)
    own = set(expert_parameters(model)) | set(router_parameters(model))
    if layout.data_parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=layout.data_mesh, ignored_params=own)
        fully_shard(model, mesh=layout.data_mesh, ignored_params=own)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in model.named_parameters() if p in own]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [torch.cuda.current_device()] if layout.mesh.device_type == "cuda" else None
    # No buffer sync in forward: the sigmoid router's load counter differs per rank until `update_router_biases`
    # (torch >= 2.13 names the option forward_sync_buffers; older versions broadcast_buffers).
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    options: dict[str, Any] = {"device_ids": device_ids, "find_unused_parameters": partial_forwards, **no_sync}
    return DistributedDataParallel(model, **options)


def finish_gradients(model: nn.Module, layout: Layout) -> None:
    """After the step's backward passes: expert gradients (and head-parallel routers') → the single-process gradient
    (DDP/FSDP did the rest)."""
    finish_expert_gradients(model, layout.mesh)
    finish_router_gradients(model)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, layout: Layout) -> Tensor:
    """Global gradient norm over every parameter, as one process would compute it; clip when max_norm is finite.

    Replicated (DDP) gradients count once; FSDP shards and expert shards are summed over their ranks
    (experts once per replica group). One all-reduce.
    """
    experts = set(expert_parameters(model))
    grads = [(p, local_tensor(p.grad)) for p in model.parameters() if p.grad is not None]
    device = grads[0][1].device if grads else torch.device("cpu")
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # [replicated, FSDP shards, expert shards]
    for p, g in grads:
        kind = 2 if p in experts else 1 if isinstance(p.grad, DTensor) else 0
        sums[kind] += g.double().square().sum()
    spread = sums[1:].clone()
    dist.all_reduce(spread)  # shards summed over all ranks; experts counted once per replica group
    total = (sums[0] + spread[0] + spread[1] / layout.mesh.size(0)).sqrt().float()
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def update_router_biases(model: nn.Module) -> None:
    """DeepSeek-V3 bias step of every sigmoid router on loads summed over all ranks (one all-reduce),
    so the biases stay identical on every rank and equal those of one process on the global batch."""
    routers = [m for m in model.modules() if isinstance(m, SigmoidRouter)]
    if not routers:
        return
    loads = torch.cat([r.load for r in routers])
    dist.all_reduce(loads)
    for router, load in zip(routers, loads.split([r.num_experts for r in routers])):
        router.update_bias(load)


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over all ranks (for logging)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def shard_rows(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rank's contiguous slice of a global batch's rows (B·W, ...) -> (B, ...)."""
    if batch.shape[0] % world:
        raise ValueError(f"a global batch of {batch.shape[0]} rows cannot be split over {world} ranks")
    return batch.chunk(world)[rank]
