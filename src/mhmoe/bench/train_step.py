"""Training-step benchmark: full steps (forward, backward, AdamW) of a preset's LM with the English comparison's
SMoE and FLOPs-matched MH-MoE, this library's fast path against the per-expert loop and dense-eq."""

from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, cast

import torch
from torch import Tensor, nn

from mhmoe.bench.layer import dense_equivalent
from mhmoe.bench.timing import failure, max_rel_difference, time_calls, time_interleaved
from mhmoe.experiments.english import base, models
from mhmoe.layers.moe import MoELayer, SparseMoE
from mhmoe.models.gpt import GPT, gpt_cost
from mhmoe.ops.backend import DispatchName
from mhmoe.train.config import preset

TRAIN_VARIANTS = ("smoe", "mhmoe_flops")  # names from mhmoe.experiments.common.variants


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured throughput of one large square matmul here: the denominator of the model FLOP utilisation."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(time_calls(lambda: a @ b, device, repeats))
    return 2 * n**3 / seconds / 1e12


# More ways to run the fast path's MoE layers in `bench_train`: name -> (dispatch, recompute)
TRAIN_EXTRAS: dict[str, tuple[DispatchName, bool]] = {
    "recompute": ("auto", True),
    "triton": ("triton", False),
    "triton-recompute": ("triton", True),
}


def _with_dispatch(model: nn.Module, dispatch: DispatchName, recompute: bool = False) -> nn.Module:
    """A copy of the model whose MoE layers use another dispatch (same weights, same routing)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, SparseMoE):
            module.dispatch, module.recompute = dispatch, recompute
    return twin


def _dense_twin(model: nn.Module) -> nn.Module:
    """The model with each MoE layer replaced by the DenseFFN of equal forward FLOPs per token (dense-eq)."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:  # type: ignore[union-attr]  # a GPT's ModuleList
        if isinstance(block.ffn, MoELayer):
            dense = dense_equivalent(block.ffn, block.ffn.d_model, block.ffn.config.activation)
            block.ffn = dense.to(next(model.parameters()).device)
    return twin


def _compiled(model: nn.Module) -> nn.Module:
    """torch.compile of a module: an `OptimizedModule`, itself a module (the stubs say only Callable)."""
    return cast(nn.Module, torch.compile(model))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, idx: Tensor, autocast: Any) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = model(idx[:, :-1], idx[:, 1:])
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    return out.loss


def lm_step(
    variant: str, quick: bool = True, seed: int = 0
) -> tuple[Callable[[], Tensor], Callable[[], list[nn.Parameter]]]:
    """One full training step (forward, backward, AdamW) of a model of `mhmoe reproduce english` on the CPU (`variant`
    a name of its `models`, `quick` its `--quick` budget), on a fixed batch of random token ids: (the step, which
    returns the loss; the model's parameters)."""
    cfg = base(quick, gpu=False)
    found = {v.name: v for v in models(cfg, "all")}
    if variant not in found:
        raise ValueError(f"unknown model {variant!r}; choose one of {sorted(found)}")
    model_cfg = dataclasses.replace(cfg.model, ffn=found[variant].ffn)
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model_cfg.vocab_size, (cfg.train.batch_size, model_cfg.seq_len + 1), generator=generator)
    return functools.partial(_train_step, model, optimizer, idx, nullcontext()), lambda: list(model.parameters())


def _grads_error(a: nn.Module, b: nn.Module, idx: Tensor, autocast: Any) -> float:
    """Largest relative difference of loss and every parameter gradient between two models on one batch."""
    results = []
    for model in (a, b):
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        results.append([out.loss.detach()] + [p.grad for p in model.parameters()])
    err = max_rel_difference(*results)
    a.zero_grad(set_to_none=True)
    b.zero_grad(set_to_none=True)
    return err


def bench_train(
    preset_name: str,
    device: torch.device,
    repeats: int,
    seed: int = 0,
    loop: bool = True,
    compile: bool = False,
    extras: Sequence[str] = (),
) -> dict:
    """Time full training steps (forward, backward, AdamW) of the preset's LM with each MoE variant.

    For each variant: this library's fast path, the per-expert loop (if `loop`) and dense-eq (every MoE
    layer replaced by a DenseFFN of equal FLOPs per token). The fast path is checked against the loop
    (loss and all gradients) before anything is timed. Inputs are random token ids: timing does not
    depend on the text, and routing of an untrained router is what a run starts with.
    compile: time `torch.compile`d fast and dense-eq models instead (the loop, with its data-dependent
    shapes, stays eager); the compiled fast path is checked against the eager loop as well.
    extras: names from `TRAIN_EXTRAS`, more fast-path rows (recompute, the Triton kernels), each checked
    like the fast path (against the loop, or against the fast path with `loop=False`).
    """
    unknown = [name for name in extras if name not in TRAIN_EXTRAS]
    if unknown:
        raise ValueError(f"unknown extra implementations {unknown}; choose from {sorted(TRAIN_EXTRAS)}")
    base = preset(preset_name)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    peak = matmul_peak_tflops(device, torch.bfloat16 if cuda else torch.float32)
    B, L = base.train.batch_size, base.model.seq_len
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, base.model.vocab_size, (B, L + 1), generator=generator).to(device)
    tolerance = 3e-2 if cuda else 1e-4
    rows: list[dict[str, Any]] = []
    failed: list[dict] = []
    for variant in (v for v in models(base) if v.name in TRAIN_VARIANTS):
        cfg = dataclasses.replace(base.model, ffn=variant.ffn)
        torch.manual_seed(seed)
        fast = GPT(cfg).to(device)
        reference, eager, impls = _implementations(fast, loop, compile, extras)
        error_of = functools.partial(_grads_error, b=reference, idx=idx, autocast=autocast)
        message = f"{variant.name}: %s differs from the {'loop' if loop else 'fast path'}"
        errors = _check(eager, impls, reference, error_of, tolerance, message, failed, variant.name)
        steps = {
            impl: functools.partial(_train_step, model, torch.optim.AdamW(model.parameters(), lr=1e-4), idx, autocast)
            for impl, model in impls.items()
        }
        flops = 3 * gpt_cost(cfg).flops_per_token * B * L  # dense-eq has the same FLOPs by construction
        rows += _time_rows(variant.name, steps, errors, device, repeats, B * L, flops, peak)
    precision = "bf16" if cuda else "fp32"
    return dict(
        preset=preset_name,
        batch=[B, L],
        matmul_peak_tflops=peak,
        precision=precision,
        compiled=compile,
        results=rows,
        failed=failed,
    )


def _implementations(
    fast: nn.Module, loop: bool, compile: bool, extras: Sequence[str]
) -> tuple[nn.Module, dict[str, nn.Module], dict[str, nn.Module]]:
    """(the reference, the eager fast-path models, every model to time) for one variant."""
    reference = _with_dispatch(fast, "reference") if loop else fast
    eager = {"fast": fast, **{name: _with_dispatch(fast, *TRAIN_EXTRAS[name]) for name in extras}}
    impls: dict[str, nn.Module] = {**eager, "dense-eq": _dense_twin(fast)}
    if loop:
        impls["loop"] = reference
    if compile:
        impls = {impl: model if impl == "loop" else _compiled(model) for impl, model in impls.items()}
    return reference, eager, impls


def _check(
    eager: dict[str, nn.Module],
    impls: dict[str, nn.Module],
    reference: nn.Module,
    error_of: Callable[[nn.Module], float],
    tolerance: float,
    message: str,
    failed: list[dict],
    where: str,
) -> dict[str, float]:
    """Each implementation's largest error against the reference (its eager model, and its compiled one if it
    differs), before anything is timed; one that fails is recorded in `failed` and removed from `impls`."""
    errors: dict[str, float] = {}
    for impl, model in eager.items():
        try:
            for candidate in {id(m): m for m in (model, impls[impl])}.values():
                if candidate is reference:
                    continue
                errors[impl] = max(errors.get(impl, 0.0), error_of(candidate))
                if errors[impl] > tolerance:
                    raise RuntimeError(f"{message % impl} by {errors[impl]:.2e} (> {tolerance:.0e})")
        except Exception as e:
            failed.append(failure(impl, e, where=where))
            del impls[impl]
    return errors


def _time_rows(
    variant: str,
    steps: Mapping[str, Callable[[], Any]],
    errors: dict[str, float],
    device: torch.device,
    repeats: int,
    tokens: int,
    flops: float,
    peak: float,
) -> list[dict[str, Any]]:
    """One row per implementation: median step time, throughput, MFU and the ratio to dense-eq."""
    rows: list[dict[str, Any]] = []
    for impl, times in time_interleaved(steps, device, repeats).items():
        seconds = statistics.median(times)
        rows.append(
            dict(
                variant=variant,
                impl=impl,
                ms=1e3 * seconds,
                tokens_per_s=tokens / seconds,
                tflops=flops / seconds / 1e12,
                mfu=flops / seconds / 1e12 / peak,
                max_rel_error=errors.get(impl),
            )
        )
    dense_ms = next(r["ms"] for r in rows if r["impl"] == "dense-eq")
    for r in rows:
        r["vs_dense"] = r["ms"] / dense_ms
    return rows


def format_train_table(report: dict) -> str:
    lines = [
        "| variant | impl | ms/step | tokens/s | TFLOP/s | MFU | × dense-eq | max rel. error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        error = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        lines.append(
            f"| {r['variant']} | {r['impl']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | "
            f"{100 * r['mfu']:.1f}% | {r['vs_dense']:.2f} | {error} |"
        )
    return "\n".join(lines)
