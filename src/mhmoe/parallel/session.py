"""What the trainer does differently on W ranks, behind the same methods as its one-process `SingleProcess`.

Rank 0 alone prepares the data first (tokenizer training, token cache), writes run files, logs and
publishes checkpoints; every rank joins every collective (forward, evaluation, checkpoint) in the same order.
Data: every rank draws the same global batch of batch_size · W rows from one sampler (same seed) and
keeps its contiguous slice, so the batches, and a resumed run, are exactly those of one process with
batch_size · W, whatever W is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mhmoe.parallel.checkpoint import load_distributed, save_distributed
from mhmoe.parallel.runtime import (
    all_mean,
    clip_grad_norm,
    finish_gradients,
    init_distributed,
    make_layout,
    parallelize,
    shard_rows,
    update_router_biases,
)

T = TypeVar("T")


class DistributedRun:
    """One rank of a torchrun job; `cfg` is the RunConfig (its `parallel` section)."""

    def __init__(self, cfg: Any, device: torch.device):
        self.owns_group = not dist.is_initialized()
        p = cfg.parallel
        self.device = init_distributed(device, p.backend, p.timeout_s)
        self.layout = make_layout(p.expert, self.device.type, p.data)  # type: ignore[arg-type]
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

    def wrap(self, model: nn.Module, seed: int) -> nn.Module:
        forward = parallelize(model, self.layout, self.balance)  # type: ignore[arg-type]
        torch.manual_seed(seed + self.rank)  # same weights everywhere, but each rank its own dropout/jitter
        return forward

    def shard(self, batch: Tensor) -> Tensor:
        return shard_rows(batch, self.rank, self.world)

    def finish_gradients(self, model: nn.Module, grad_clip: float) -> Tensor:
        finish_gradients(model, self.layout)
        return clip_grad_norm(model, grad_clip if grad_clip else float("inf"), self.layout)

    def mean(self, values: list[float]) -> list[float]:
        return all_mean(values, self.device)

    def update_router_biases(self, model: nn.Module) -> None:
        update_router_biases(model)

    def save(self, directory: Path, step: int, model: nn.Module, optimizer: Any, state: dict, keep: int) -> None:
        save_distributed(directory, step, model, optimizer, state, keep)

    def load(self, path: Path, model: nn.Module, optimizer: Any) -> dict:
        return load_distributed(path, model, optimizer)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
