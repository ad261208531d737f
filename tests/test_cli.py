"""The `mhmoe` command: sizes table and a layer benchmark that checks before it times."""

import json

import pytest

from mhmoe.cli import main


def test_sizes_prints_every_preset(capsys):
    assert main(["sizes"]) == 0
    out = capsys.readouterr().out
    assert "v2-mhmoe-h3" in out and "| 96 | 3 | 512 |" in out


def test_bench_layer_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "bench.json"
    assert main(["bench", "layer", "--shapes", "tiny", "--repeats", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    (bench,) = report["benchmarks"]
    impls = {r["impl"]: r for r in bench["results"]}
    assert {"loop", "slices", "grouped_mm", "plain-grouped", "dense-eq"} <= set(impls)
    assert impls["plain-grouped"]["max_rel_error"] < 1e-4
    assert impls["grouped_mm"]["max_rel_error"] < 1e-4 and impls["dense-eq"]["vs_dense"] == 1.0
    assert impls["dense-eq"]["activation_vs_dense"] == 1.0 and all(r["activation_mib"] > 0 for r in impls.values())
    assert "tuned" in report["environment"]["allocator"]
    assert report["environment"]["torch"] and "| tiny | grouped_mm |" in capsys.readouterr().out


def test_bench_layer_times_the_triton_kernels_under_the_interpreter(tmp_path, triton_interpreter):
    """The Triton rows of a GPU session's benchmark, run here on the CPU under TRITON_INTERPRET=1."""
    path = tmp_path / "bench.json"
    assert main(["bench", "layer", "--shapes", "tiny", "--repeats", "1", "--json", str(path)]) == 0
    impls = {r["impl"]: r for r in json.loads(path.read_text())["benchmarks"][0]["results"]}
    assert impls["triton"]["max_rel_error"] < 1e-4 and impls["triton-recompute"]["max_rel_error"] < 1e-4
    # the Triton node keeps no expert outputs: less than the grouped_mm node, which keeps them (R, d)
    assert impls["triton"]["activation_mib"] < impls["grouped_mm"]["activation_mib"]
    assert impls["triton-recompute"]["activation_mib"] < impls["triton"]["activation_mib"] / 2


@pytest.mark.parametrize("kind", ["layer", "train"])
def test_a_failing_triton_kernel_is_reported_and_the_rest_still_timed(
    tmp_path, monkeypatch, capsys, kind, triton_interpreter
):
    """A GPU session runs its benchmark once: a kernel that fails there must not cost the other numbers."""
    from mhmoe.ops import triton_experts

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(triton_experts, "expert_ffn", broken)
    path = tmp_path / "bench.json"
    argv = ["--shapes", "tiny"] if kind == "layer" else ["--preset", "cpu-tiny", "--no-loop", "--also", "triton"]
    assert main(["bench", kind, *argv, "--repeats", "1", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    group = report["benchmarks"][0] if kind == "layer" else report
    impls = {r["impl"] for r in group["results"]}
    assert "fast" in impls or "grouped_mm" in impls
    assert not any(i.startswith("triton") for i in impls)
    assert group["failed"] and all("out of resources" in f["error"] for f in group["failed"])
    assert "not timed:" in capsys.readouterr().err


def test_saved_activation_bytes_counts_what_backward_keeps():
    import torch

    from mhmoe.bench.timing import saved_activation_bytes
    from mhmoe.layers.experts import DenseFFN

    ffn = DenseFFN(d_model=16, hidden=24, activation="gelu")
    # the input and the weights are not counted; GELU keeps its input, fc_out keeps GELU's output
    assert saved_activation_bytes(ffn, torch.randn(10, 16)) == 2 * 10 * 24 * 4


def test_bench_rejects_unknown_shape_and_bad_repeats():
    with pytest.raises(SystemExit, match="unknown shape"):
        main(["bench", "layer", "--shapes", "nope"])
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        main(["bench", "layer", "--repeats", "0"])


def test_bench_train_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    argv = ["bench", "train", "--preset", "cpu-tiny", "--repeats", "1", "--also", "recompute", "--json", str(path)]
    assert main(argv) == 0
    report = json.loads(path.read_text())
    rows = {(r["variant"], r["impl"]): r for r in report["results"]}
    assert set(rows) == {(v, i) for v in ("smoe", "mhmoe_flops") for i in ("fast", "recompute", "loop", "dense-eq")}
    for v in ("smoe", "mhmoe_flops"):
        assert rows[v, "fast"]["max_rel_error"] < 1e-4 and rows[v, "recompute"]["max_rel_error"] < 1e-4
        assert rows[v, "dense-eq"]["vs_dense"] == 1.0 and rows[v, "loop"]["max_rel_error"] is None
    assert report["matmul_peak_tflops"] > 0 and 0 < rows["smoe", "fast"]["mfu"]
    assert "| mhmoe_flops | fast |" in capsys.readouterr().out


def test_bench_train_times_the_triton_kernels_under_the_interpreter(tmp_path, triton_interpreter):
    path = tmp_path / "train.json"
    argv = ["bench", "train", "--preset", "cpu-tiny", "--repeats", "1", "--no-loop", "--also", "triton"]
    assert main([*argv, "--json", str(path)]) == 0
    rows = {(r["variant"], r["impl"]): r for r in json.loads(path.read_text())["results"]}
    assert all(rows[v, "triton"]["max_rel_error"] < 1e-4 for v in ("smoe", "mhmoe_flops"))  # against the fast path
    assert rows["smoe", "fast"]["max_rel_error"] is None  # nothing to check it against without the loop
    with pytest.raises(SystemExit, match="unknown --also"):
        main(["bench", "train", "--preset", "cpu-tiny", "--also", "recompute,nope"])


@pytest.mark.parametrize("argv", [["bench", "layer", "--shapes", "tiny"], ["bench", "train", "--preset", "cpu-tiny"]])
def test_benchmarks_refuse_to_time_a_wrong_fast_path(monkeypatch, argv):
    import mhmoe.layers.moe as moe

    def off_by_a_bit(*args, **kwargs):
        return moe_dispatch(*args, **kwargs) * 1.01

    moe_dispatch = moe.dispatch_sorted
    monkeypatch.setattr(moe, "dispatch_sorted", off_by_a_bit)
    with pytest.raises(RuntimeError, match="differ"):
        main([*argv, "--repeats", "1"])


@pytest.mark.slow
def test_bench_train_compiled_checks_against_the_eager_loop(tmp_path):
    path = tmp_path / "train.json"
    assert main(["bench", "train", "--preset", "cpu-tiny", "--repeats", "1", "--compile", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["compiled"] is True
    assert all(r["max_rel_error"] < 1e-4 for r in report["results"] if r["impl"] == "fast")


def test_cuda_graph_check_logic_with_stand_ins(monkeypatch):
    """The CUDA-graph check's own logic (warm-up, capture, replay, compare, report), with no-op stand-ins for
    the CUDA stream and graph API so it runs here; on a GPU the real ones are used (`gpu_session.sh`)."""
    import contextlib

    import torch

    from mhmoe.bench.layer import cuda_graph_check

    class Stand:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, stream):
            pass

        def replay(self):
            pass

    for name, value in dict(
        Stream=Stand,
        CUDAGraph=Stand,
        current_stream=lambda device=None: Stand(),
        stream=lambda s: contextlib.nullcontext(),
        graph=lambda g: contextlib.nullcontext(),
        synchronize=lambda device=None: None,
    ).items():
        monkeypatch.setattr(torch.cuda, name, value)
    result = cuda_graph_check("tiny", torch.device("cpu"), torch.float32)
    assert result["capturable"] is True and result["replay_max_rel_error"] == 0.0

    @contextlib.contextmanager
    def refusing(g):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", refusing)
    result = cuda_graph_check("tiny", torch.device("cpu"), torch.float32)
    assert result["capturable"] is False and "not permitted" in result["error"]


def test_cuda_graph_needs_cuda():
    with pytest.raises(SystemExit, match="--cuda-graph needs --device cuda"):
        main(["bench", "layer", "--cuda-graph"])


def test_the_prepared_gpu_session_runs_valid_commands():
    """`benchmarks/gpu_session.sh` is run once, on a machine with no second chance: every `mhmoe` command in it
    must parse (options that exist, shapes and extras that are known)."""
    import shlex
    from pathlib import Path

    from mhmoe.bench.layer import SHAPES
    from mhmoe.bench.train_step import TRAIN_EXTRAS
    from mhmoe.cli import build_parser

    script = (Path(__file__).parents[1] / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", " ")
    script = script.replace('"$1"', "decisive")  # the English parts' function, called with a part
    lines = [
        line.split("step ", 1)[1].split(";;")[0] for line in script.splitlines() if "step python3 -m mhmoe" in line
    ]
    commands = [shlex.split(line) for line in lines]
    assert len(commands) == 8  # the English driver, three other reproductions, four benchmarks
    for command in commands:
        args = build_parser().parse_args([word for word in command[3:] if word != "$extra"])  # after "-m mhmoe"
        if args.verb == "reproduce":
            assert args.gpu and not args.dry_run
            assert args.task != "english" or args.export == "$out"  # what comes back: --export's few files
            continue
        assert args.device == "cuda"
        assert getattr(args, "shapes", None) in (None, "all") or set(args.shapes.split(",")) <= set(SHAPES)
        assert set(filter(None, (getattr(args, "also", None) or "").split(","))) <= set(TRAIN_EXTRAS)
