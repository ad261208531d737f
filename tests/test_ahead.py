"""The Triton kernels built for NVIDIA GPUs on this CPU-only machine (`mhmoe.ops.triton_ahead`): what the GPU
compiler makes of every launch of a layer step, at every tile the autotuner may pick."""

import json

import pytest
import torch

pytest.importorskip("triton")

from mhmoe.ops import triton_ahead as ahead  # noqa: E402
from mhmoe.ops import triton_experts as tk  # noqa: E402


@pytest.fixture
def triton_compiler(monkeypatch):
    """The kernels built for the GPU compiler (not the interpreter), rebuilt before and after."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tk._kernels.cache_clear()
    yield
    tk._kernels.cache_clear()


def _variants(launches) -> set[tuple[str, frozenset[str]]]:
    return {
        (k.fn.__name__, frozenset(f for f, on in meta.items() if f.startswith("HAS_") and on))
        for k, _, meta in launches
    }


def test_a_layer_step_is_recorded_not_run(triton_compiler):
    launches = ahead.step_launches(torch.bfloat16, d_model=16, hidden=32, num_experts=4, tokens=40)
    assert _variants(launches) == {
        ("rows_mm", frozenset({"HAS_A_INDEX"})),  # first GEMM (gathers x); the backward's grad @ w_outᵀ
        ("rows_mm", frozenset({"HAS_OUT_INDEX", "HAS_SCALE"})),  # second GEMM: gated, written choice-major
        ("rows_mm", frozenset({"HAS_OUT_INDEX"})),  # the input gradient; the ungated expert-parallel step
        ("weight_grad", frozenset({"HAS_G_INDEX", "HAS_ROW_SCALE"})),  # w_out's gradient, gated
        ("weight_grad", frozenset({"HAS_G_INDEX"})),  # w_out's gradient, ungated
        ("weight_grad", frozenset({"HAS_A_INDEX"})),  # w_in's gradient
    }
    # each step: 4 row GEMMs and 2 weight gradients, one more row GEMM with recompute (the first again);
    # nothing ran (this machine has no GPU to run them on)
    assert len(launches) == (6 + 7 + 6)
    assert tk._recording is None
    with tk.recorded_launches():
        with pytest.raises(RuntimeError, match="does not nest"):
            with tk.recorded_launches():
                pass


def test_step_launches_refuse_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        ahead.step_launches(torch.bfloat16)


def test_every_tile_builds_for_hopper_in_bf16_pipelined_on_wgmma_without_spills(triton_compiler, tmp_path, capsys):
    """The GPU path's dtype on H100/H200: each of the 6 + 5 tiles of every launch fits in shared memory,
    loads asynchronously (software-pipelined) in 16-byte vectors, multiplies with wgmma and spills nothing."""
    out = tmp_path / "builds.json"
    ahead.main(["--arch", "90", "--dtype", "bf16", "--json", str(out)])
    record = json.loads(out.read_text())
    builds = [ahead.Build(**b) for b in record["builds"]]
    rows = [b for b in builds if b.kernel == "rows_mm"]
    # row GEMMs: x @ w_in, a @ w_out (gated), grad @ w_outᵀ, grad_h @ w_inᵀ, a @ w_out (ungated)
    assert len(rows) == 5 * len(tk._ROWS_CONFIGS)
    assert len(builds) - len(rows) == 3 * len(tk._GRAD_CONFIGS)
    for b in builds:
        assert b.fits and b.pipelined and b.widest_copy_bytes == 16 and b.matrix_instruction == "wgmma", b
        assert b.spilled_bytes == 0 and 0 < b.registers <= 255, b
    operands = {"a=bf16 w=bf16 out=bf16", "a=bf16 w=bf16 out=fp32", "a=bf16 wᵀ=bf16 out=bf16"}  # fp32: gated outputs
    assert {b.operands for b in rows} == operands
    printed = capsys.readouterr().out
    assert printed.count("\n| rows_mm |") + printed.count("\n| weight_grad |") == len(builds)
    assert printed.endswith(f"{ahead.summary(builds)}\n")
    assert ahead.summary(builds).startswith(f"{len(builds)} builds: {len(builds)} fit in shared memory")


@pytest.mark.slow
def test_ampere_bf16_on_mma_and_hopper_fp32_with_an_unspilled_tile_per_launch(triton_compiler):
    for b in ahead.compile_ahead(80, torch.bfloat16):
        assert b.fits and b.pipelined and b.matrix_instruction == "mma" and b.spilled_bytes == 0, b
    fp32 = ahead.compile_ahead(90, torch.float32)  # exact fp32 (FMA): the larger tiles spill, the autotuner skips them
    assert {b.matrix_instruction for b in fp32} == {"fma"}
    for launch in {(b.kernel, b.operands, b.flags) for b in fp32}:
        assert any(b.fits and b.spilled_bytes == 0 for b in fp32 if (b.kernel, b.operands, b.flags) == launch), launch


def test_the_command_line_checks_its_numbers():
    with pytest.raises(SystemExit):
        ahead.main(["--hidden", "0"])
