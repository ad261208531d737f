"""Build the Triton kernels for an NVIDIA GPU on a machine without one, and say how each was built.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic but compiles nothing, and cannot
multiply bf16 at all: a kernel the GPU compiler rejects, a tile that does not fit in shared memory, a GEMM
whose loads are not pipelined or that misses the tensor cores, spilled registers — all of that shows only
on a GPU. Triton compiles for a named target without the device (with its own ptxas), so `compile_ahead`
builds what one layer step launches (recorded from `dispatch_sorted` and the expert-parallel step, forward
and backward, with and without recompute), at every tile the autotuner may pick, specialised exactly as
Triton's JIT specialises a launch on that GPU (integers equal to 1, 16-divisible integers and pointers),
and reports for each build:

- shared memory per block, against the architecture's limit (a tile over it is skipped by the autotuner);
- whether the main loop's loads are asynchronous (cp.async or TMA: software-pipelined), and the widest of
  those copies (16 bytes: the operand tiles load as vectors);
- the matrix instructions: "wgmma" (Hopper tensor cores), "mma" (mma.sync, Ampere tensor cores) or "fma";
- registers, stack and local memory per thread (stack or local bytes: values spilled out of registers), read
  from the cubin by the cuobjdump Triton ships.

    python -m mhmoe.ops.triton_ahead --arch 90 --dtype bf16      # the table; --json FILE for the records

Uses Triton's JIT binder and compiler entry points (`create_function_from_signature`, `_pack_args`,
`compile`): internals, checked against the Triton version the tests install.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mhmoe.io import write_json
from mhmoe.ops import triton_experts
from mhmoe.ops.activations import glu_factor

# Shared memory one block may use (opt-in maximum), bytes, by compute capability
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Build:
    """One kernel, at one tile, for one launch signature, compiled for one GPU architecture."""

    kernel: str  # "rows_mm" or "weight_grad"
    arch: int  # compute capability, e.g. 90
    operands: str  # the pointer arguments' element types, e.g. "a=bf16 w=bf16 out=fp32"
    flags: str  # the launch's HAS_* flags that are set, e.g. "HAS_A_INDEX"
    tile: str  # the autotuner config, e.g. "BLOCK_N=128 BLOCK_K=64 warps=4 stages=3"
    shared_bytes: int
    shared_limit: int | None  # None: architecture not in SHARED_MEMORY_LIMIT
    pipelined: bool  # asynchronous global -> shared copies (cp.async / TMA) in the PTX
    widest_copy_bytes: int  # the largest cp.async in the PTX (16 = vectorised operand loads); 0 without any
    matrix_instruction: str  # "wgmma", "mma" or "fma"
    registers: int | None  # per thread; None without cuobjdump
    spilled_bytes: int | None  # stack + local memory per thread (registers spilled); None without cuobjdump

    @property
    def fits(self) -> bool:
        return self.shared_limit is None or self.shared_bytes <= self.shared_limit


def step_launches(
    dtype: torch.dtype,
    d_model: int = 128,
    hidden: int = 256,
    num_experts: int = 8,
    tokens: int = 256,
    top_k: int = 2,
    activation: str = "gelu",
) -> list[tuple[Any, tuple, dict]]:
    """The kernel launches of one layer step on `dtype` operands (gates in fp32), nothing run: forward and
    backward through `dispatch_sorted` with and without recompute, and the expert-parallel local step (no
    gates). As (autotuned kernel, arguments, keyword arguments), repeats included."""
    from mhmoe.ops.sorted import dispatch_sorted, permuted_expert_ffn

    if triton_experts.interpreting():
        raise RuntimeError("compile_ahead builds GPU code: unset TRITON_INTERPRET (it is '1')")
    generator = torch.Generator().manual_seed(0)
    width = glu_factor(activation) * hidden
    experts = SimpleNamespace(  # an `ExpertWeights`; the values do not matter, nothing runs
        w_in=torch.randn(num_experts, d_model, width, generator=generator).to(dtype).requires_grad_(),
        w_out=torch.randn(num_experts, hidden, d_model, generator=generator).to(dtype).requires_grad_(),
        activation=activation,
    )
    x = torch.randn(tokens, d_model, generator=generator).to(dtype).requires_grad_()
    top = torch.randint(num_experts, (tokens, top_k), generator=generator)
    gates = torch.rand(tokens, top_k, generator=generator).requires_grad_()
    order = torch.argsort(top[:, 0], stable=True)
    counts = torch.bincount(top[:, 0], minlength=num_experts)
    with triton_experts.recorded_launches() as launches:
        for recompute in (False, True):
            y = dispatch_sorted(x, experts, top, gates, "triton", recompute=recompute)
            y.float().sum().backward()
        y = permuted_expert_ffn(
            x, experts.w_in, experts.w_out, order, torch.argsort(order), counts, activation, "triton"
        )
        y.float().sum().backward()
    return launches


def compile_ahead(arch: int = 90, dtype: torch.dtype = torch.bfloat16, **shape: Any) -> list[Build]:
    """Every distinct launch of `step_launches(dtype, **shape)` compiled at every tile of its kernel's
    autotuner, for compute capability `arch` (80: A100, 90: H100/H200, ...), as Triton's JIT would there."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    builds, seen = [], set()
    for autotuned, args, meta in step_launches(dtype, **shape):
        jit = autotuned.fn
        if not isinstance(jit, JITFunction):
            raise RuntimeError(f"the kernels were built for the interpreter ({type(jit).__name__}); rebuild them")
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        for config in autotuned.configs:
            kwargs = dict(meta, **config.all_kwargs())
            bound, specialization, options = binder(*args, **kwargs)
            key = (jit.__name__, str(specialization), str(options))
            if key in seen:
                continue
            seen.add(key)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
            compiled = compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
            builds.append(_describe(jit.__name__, arch, signature, bound, meta, config, compiled))
    return builds


def _describe(name: str, arch: int, signature: dict, bound: dict, meta: dict, config: Any, compiled: Any) -> Build:
    ptx = compiled.asm["ptx"]
    operands = " ".join(f"{k[:-4]}={v.lstrip('*')}" for k, v in signature.items() if k in _OPERANDS)
    if name == "rows_mm" and bound["stride_wn"] != 1:  # the weights read transposed (the backward's wᵀ)
        operands = operands.replace(" w=", " wᵀ=")
    tile = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    registers, spilled_bytes = _resource_usage(compiled.asm["cubin"])
    return Build(
        kernel=name,
        arch=arch,
        operands=operands,
        flags=",".join(k for k, v in meta.items() if k.startswith("HAS_") and v) or "-",
        tile=f"{tile} warps={config.num_warps} stages={config.num_stages}",
        shared_bytes=compiled.metadata.shared,
        shared_limit=SHARED_MEMORY_LIMIT.get(arch),
        pipelined="cp.async" in ptx,
        widest_copy_bytes=max((int(size, 0) for size in _ASYNC_COPY.findall(ptx)), default=0),
        matrix_instruction="wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "fma",
        registers=registers,
        spilled_bytes=spilled_bytes,
    )


_OPERANDS = ("a_ptr", "w_ptr", "g_ptr", "out_ptr", "dw_ptr")
_ASYNC_COPY = re.compile(r"cp\.async\.c[ag]\.shared\.global\S* \[[^\]]+\], \[[^\]]+\], (\w+)")  # its bytes


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack + local bytes) per thread of the cubin's kernel, by `cuobjdump -res-usage`; (None,
    None) when Triton's cuobjdump cannot be found or run."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None, None
    found = [re.search(rf"\b{field}:(\d+)", usage) for field in ("REG", "STACK", "LOCAL")]
    numbers = [int(m.group(1)) for m in found if m is not None]
    if len(numbers) < 3:
        return None, None
    registers, stack, local = numbers
    return registers, stack + local


def table(builds: list[Build]) -> str:
    lines = [
        "| kernel | operands | flags | tile | shared KiB (limit) | pipelined (widest copy B) | matrix | registers "
        "| spilled B |",
        "|---|---|---|---|---:|---|---|---:|---:|",
    ]
    for b in builds:
        limit = "?" if b.shared_limit is None else f"{b.shared_limit / 1024:.0f}"
        pipelined = f"{'yes' if b.pipelined else 'NO'} ({b.widest_copy_bytes})"
        lines.append(
            f"| {b.kernel} | {b.operands} | {b.flags} | {b.tile} | {b.shared_bytes / 1024:.0f} ({limit}) | "
            f"{pipelined} | {b.matrix_instruction} | {_or_dash(b.registers)} | {_or_dash(b.spilled_bytes)} |"
        )
    return "\n".join(lines)


def summary(builds: list[Build]) -> str:
    """One line: how many builds fit, load asynchronously and spill, on which matrix instructions."""
    spilled = [b for b in builds if b.spilled_bytes]
    registers = [b.registers for b in builds if b.registers is not None]
    shared = [b.shared_bytes / 1024 for b in builds]
    return (
        f"{len(builds)} builds: {sum(b.fits for b in builds)} fit in shared memory ({min(shared):.0f}-"
        f"{max(shared):.0f} KiB), {sum(b.pipelined for b in builds)} pipelined "
        f"({sum(b.widest_copy_bytes == 16 for b in builds)} with 16-byte copies), matrix instructions "
        f"{'/'.join(sorted({b.matrix_instruction for b in builds}))}, {len(spilled)} spill"
        + (f", registers {min(registers)}-{max(registers)}" if registers else "")
    )


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mhmoe.ops.triton_ahead",
        description="Compile the Triton expert kernels for an NVIDIA GPU without one and report each build.",
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 80 A100, 90 H100/H200 (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the GEMM operands' dtype")
    parser.add_argument("--d-model", type=int, default=128, help="the experts' input width (MH-MoE: D / H)")
    parser.add_argument("--hidden", type=int, default=256, help="the experts' hidden width")
    parser.add_argument("--json", help="also write the builds to this JSON file")
    args = parser.parse_args(argv)
    for name in ("arch", "d_model", "hidden"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    builds = compile_ahead(args.arch, DTYPES[args.dtype], d_model=args.d_model, hidden=args.hidden)
    print(table(builds))
    print(summary(builds))
    if args.json:
        record = dict(
            arch=args.arch, dtype=args.dtype, d_model=args.d_model, hidden=args.hidden,
            triton=_triton_version(), builds=[dataclasses.asdict(b) for b in builds],
        )  # fmt: skip
        write_json(Path(args.json), record)
    if not all(b.fits for b in builds):
        print("some tiles do not fit in shared memory: the autotuner will skip them", file=sys.stderr)


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
