"""Where a run executes: one process (`SingleProcess`) or one rank of W under torchrun (`DistributedRun`), behind
the same methods, so the training loop has no distributed branches.

Rank 0 alone prepares the data first (tokenizer training, token cache), writes run files, logs and
publishes checkpoints; every rank joins every collective (forward, evaluation, checkpoint) in the same order.
Data: every rank draws the same global batch of batch_size · W rows from one sampler (same seed) and
keeps its contiguous slice, so the batches, and a resumed run, are exactly those of one process with
batch_size · W, whatever W is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mhmoe.errors import ConfigError
from mhmoe.layers.routers import SigmoidRouter
from mhmoe.parallel import runtime
from mhmoe.train import dcp
from mhmoe.train.checkpoint import load_checkpoint, save_checkpoint
from mhmoe.train.config import ParallelConfig

T = TypeVar("T")


class Session(Protocol):
    """What the training loop asks of where it runs."""

    rank: int
    world: int
    is_main: bool
    device: torch.device

    def first_on_main(self, fn: Callable[[], T]) -> T: ...
    def wrap(self, model: nn.Module, seed: int, partial_forwards: bool = False) -> nn.Module: ...
    def shard(self, batch: Tensor) -> Tensor: ...
    def finish_gradients(self, model: nn.Module, grad_clip: float) -> Tensor: ...
    def mean(self, values: list[float]) -> list[float]: ...
    def update_router_biases(self, model: nn.Module) -> None: ...
    def save(
        self, directory: Path, step: int, model: nn.Module, optimizer: Any, state: dict, keep: int, run_files: tuple
    ) -> None: ...
    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict: ...
    def close(self) -> None: ...


def update_router_biases(model: nn.Module) -> None:
    """One auxiliary-loss-free balancing step of every sigmoid router, on this process's loads."""
    for module in model.modules():
        if isinstance(module, SigmoidRouter):
            module.update_bias()


class SingleProcess:
    """The one-process side of what `DistributedRun` does on W ranks (same methods)."""

    rank, world, is_main = 0, 1, True

    def __init__(self, device: torch.device):
        self.device = device

    def first_on_main(self, fn: Callable[[], T]) -> T:
        return fn()

    def wrap(self, model: nn.Module, seed: int, partial_forwards: bool = False) -> nn.Module:
        return model

    def shard(self, batch: Tensor) -> Tensor:
        return batch

    def finish_gradients(self, model: nn.Module, grad_clip: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))

    def mean(self, values: list[float]) -> list[float]:
        return values

    def update_router_biases(self, model: nn.Module) -> None:
        update_router_biases(model)

    def save(
        self, directory: Path, step: int, model: nn.Module, optimizer: Any, state: dict, keep: int, run_files: tuple
    ) -> None:
        save_checkpoint(directory, step, model, optimizer, state, keep=keep, run_files=run_files)

    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict:
        return load_checkpoint(path, model, optimizer)

    def close(self) -> None:
        pass


def is_main_process() -> bool:
    """Whether this process is (or will be) rank 0: the one that writes run files. Known before the session
    starts, from an existing process group or torchrun's RANK."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def start_session(parallel: ParallelConfig, device: torch.device) -> Session:
    """DistributedRun under torchrun (or inside an existing process group), else SingleProcess."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group or "WORLD_SIZE" in os.environ:
        return DistributedRun(parallel, device)
    sizes = {key: size for key, size in (("expert", parallel.expert), ("head", parallel.head)) if size > 1}
    if sizes:
        needed = math.prod(sizes.values())
        raise ConfigError(
            f"{' with '.join(f'parallel.{key}={size}' for key, size in sizes.items())} needs {needed} or more "
            f"processes: torchrun --nproc-per-node {needed} -m mhmoe train ..."
        )
    return SingleProcess(device)


class DistributedRun:
    """One rank of a torchrun job, laid out as its ParallelConfig says."""

    def __init__(self, p: ParallelConfig, device: torch.device):
        self.owns_group = not dist.is_initialized()
        self.device = runtime.init_distributed(device, p.backend, p.timeout_s)
        self.layout = runtime.make_layout(p.expert, self.device.type, p.data, p.head)
        self.balance = p.balance
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def first_on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, then on the others (which then find its files: tokenizer, token cache)."""
        if self.is_main:
            result = fn()
        dist.barrier()
        if not self.is_main:
            result = fn()
        return result

    def wrap(self, model: nn.Module, seed: int, partial_forwards: bool = False) -> nn.Module:
        forward = runtime.parallelize(model, self.layout, self.balance, partial_forwards)
        torch.manual_seed(seed + self.rank)  # same weights everywhere, but each rank its own dropout/jitter
        return forward

    def shard(self, batch: Tensor) -> Tensor:
        return runtime.shard_rows(batch, self.rank, self.world)

    def finish_gradients(self, model: nn.Module, grad_clip: float) -> Tensor:
        runtime.finish_gradients(model, self.layout)
        return runtime.clip_grad_norm(model, grad_clip if grad_clip else float("inf"), self.layout)

    def mean(self, values: list[float]) -> list[float]:
        return runtime.all_mean(values, self.device)

    def update_router_biases(self, model: nn.Module) -> None:
        runtime.update_router_biases(model)

    def save(
        self, directory: Path, step: int, model: nn.Module, optimizer: Any, state: dict, keep: int, run_files: tuple
    ) -> None:
        dcp.save_distributed(directory, step, model, optimizer, state, keep, run_files)

    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict:
        return dcp.load_distributed(path, model, optimizer)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
