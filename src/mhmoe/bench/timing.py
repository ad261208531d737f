"""What every benchmark here shares: interleaved timing, correctness of paired tensors, memory, environment.

Benchmarks check every implementation against a reference before timing anything (`max_rel_difference`),
and time all implementations round-robin (`time_interleaved`) so that a noisy machine slows each alike.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mhmoe.train import allocator, threads


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin so that a noisy machine slows all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def saved_activation_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes autograd keeps from one forward of `layer` for its backward: the activation memory.

    Counts each storage once (views share one), and neither the layer's parameters nor the input `x`
    (the caller holds those anyway). Device-independent, so it is measured on the CPU too.
    """
    held = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    xi = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(xi)
    del out
    return sum(seen.values())


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak device memory of one call (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    fn()  # warm: later calls reuse the caching allocator's blocks
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def max_rel_difference(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """Largest difference between paired tensors, each relative to the largest magnitude of its `want`."""
    err = 0.0
    for u, v in zip(got, want, strict=True):
        u, v = u.detach().float(), v.detach().float()
        err = max(err, float((u - v).abs().max() / v.abs().max().clamp_min(1e-6)))
    return err


def failure(impl: str, error: Exception, where: str | None = None) -> dict:
    """The record of an implementation that could not be checked (it raised, or differs from the reference),
    which is then not timed. Only the Triton kernels, still to be proven on a GPU, may fail so: for any other
    implementation the error is raised again."""
    if not impl.startswith("triton"):
        raise error
    return dict(impl=impl if where is None else f"{where}/{impl}", error=f"{type(error).__name__}: {error}"[:2000])


def failures(report: dict) -> list[str]:
    """'where/impl: error' for every implementation a benchmark report could not check."""
    groups = report.get("benchmarks", [report])
    return [f"{g.get('name', 'train')}/{f['impl']}: {f['error']}" for g in groups for f in g.get("failed", [])]


def environment(device: torch.device) -> dict:
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d"),
        allocator=allocator.state or dict(tuned=False, reason="not tuned by this process"),
        openmp_wait=threads.state or dict(set=False, reason="not set by this process", environment=threads.chosen()),
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
