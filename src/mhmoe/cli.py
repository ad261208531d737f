"""The `mhmoe` command line.

    mhmoe train --preset NAME [--set key=value ...] [--data PATH] [--out DIR]
    mhmoe eval RUN_DIR
    mhmoe analyze RUN_DIR [--data PATH]
    mhmoe reproduce english [--quick|--gpu] [--part P] [--seeds N] [--out DIR] [--data PATH] [--ood-data PATH]
    mhmoe reproduce multilingual [--quick|--gpu] [--part P] [--seeds N] [--out DIR] [--data DIR] [--ood-data PATH]
    mhmoe reproduce multimodal [--quick|--gpu] [--part P] [--seeds N] [--out DIR] [--data DIR]
    mhmoe reproduce ablations [--quick|--gpu] [--sweeps heads,head_merge,depth,experts|all] [--seeds N] [--out DIR]
                      each also takes [--set key=value ...]; --dry-run prints the plan and a time estimate
    mhmoe bench layer [--device cpu|cuda] [--dtype ...] [--shapes NAME,...|all] [--repeats N] [--cuda-graph] [--json FILE]
    mhmoe bench train [--device cpu|cuda] [--preset NAME] [--repeats N] [--no-loop] [--compile] [--json FILE]
    mhmoe sizes       the papers' layer presets with their exact parameter counts and FLOPs
    mhmoe export-hf RUN_DIR OUT_DIR    a train run as a Hugging Face model folder (MHMoEForCausalLM + tokenizer)
    mhmoe import-hf HF_DIR RUN_DIR     and back: a run directory that eval / analyze / export-hf read
    mhmoe moeify HF_DIR OUT_DIR [--kind smoe|mhmoe] [--experts N] [--top-k K] [--heads H] [--every N]
                      replace a saved transformers model's FFNs by upcycled SMoE / MH-MoE layers, or a MoE
                      model's blocks by this library's SMoE (an exact swap) / MH-MoE layers

Errors a user can fix (bad data, config or checkpoint) and those of their machine (a full disk, a read-only or
missing folder, permissions, no memory left) print one line naming the path and the fix, and exit with status 2;
anything else is a bug and shows its traceback (as every error does with MHMOE_TRACEBACK=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")
PARTS = ("core", "params", "controls", "all")  # mhmoe.experiments.common.PARTS (the CLI imports no experiment)
SWEEPS = ("heads", "head_merge", "depth", "experts")  # mhmoe.experiments.ablations.sweeps()
GPU_SEEDS = {"ablations": 3}  # default --seeds with --gpu (else 5: enough to resolve 3%, results/english/README.md)


def _bench_layer(args: argparse.Namespace) -> int:
    import torch

    from mhmoe.bench.layer import DEFAULT_SHAPES, SHAPES, bench_shape, cuda_graph_check, format_table
    from mhmoe.bench.timing import environment
    from mhmoe.ops import triton_experts
    from mhmoe.ops.backend import DispatchName

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mhmoe: --device cuda given but no CUDA device is available")
    if args.cuda_graph and args.device != "cuda":
        raise SystemExit("mhmoe: --cuda-graph needs --device cuda")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = _parse_shapes(args.shapes, DEFAULT_SHAPES[device.type], SHAPES)
    benchmarks: list[dict] = []
    report = dict(environment=environment(device), dtype=str(dtype).removeprefix("torch."), benchmarks=benchmarks)
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        if args.cuda_graph:  # the default path, and the Triton kernels where they run
            dispatches: list[DispatchName] = ["auto", "triton"] if triton_experts.supports(device, dtype) else ["auto"]
            benchmarks += [cuda_graph_check(name, device, dtype, dispatch) for dispatch in dispatches]
        else:
            benchmarks.append(bench_shape(name, device, dtype, args.repeats))
    print(json.dumps(benchmarks, indent=1) if args.cuda_graph else format_table(report))
    return _finish_bench(report, args.json)


def _finish_bench(report: dict, json_path: str | None) -> int:
    """Write the report (with the Triton autotuner's choices, if it timed any); 1 if an implementation could
    not be checked (the rest was still timed)."""
    from mhmoe.bench.timing import failures
    from mhmoe.io import write_json
    from mhmoe.ops import triton_experts

    if tiles := triton_experts.tuned_tiles():
        report["triton_tiles"] = tiles
    if json_path:
        write_json(Path(json_path), report, indent=2)
        print(f"wrote {json_path}", file=sys.stderr)
    for line in failures(report):
        print(f"mhmoe: not timed: {line}", file=sys.stderr)
    return 1 if failures(report) else 0


def _bench_train(args: argparse.Namespace) -> int:
    import torch

    from mhmoe.bench.timing import environment
    from mhmoe.bench.train_step import TRAIN_EXTRAS, bench_train, format_train_table
    from mhmoe.train.config import PRESETS

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mhmoe: --device cuda given but no CUDA device is available")
    device = torch.device(args.device)
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    if name not in PRESETS:
        raise SystemExit(f"mhmoe: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    extras = [e for e in (args.also or "").split(",") if e]
    unknown = sorted(set(extras) - set(TRAIN_EXTRAS))
    if unknown:
        raise SystemExit(f"mhmoe: unknown --also {unknown}; choose from {sorted(TRAIN_EXTRAS)}")
    results = bench_train(name, device, args.repeats, loop=not args.no_loop, compile=args.compile, extras=extras)
    report = dict(environment=environment(device), **results)
    print(format_train_table(report))
    return _finish_bench(report, args.json)


def _parse_shapes(spec: str | None, default: list[str], known: dict) -> list[str]:
    if spec is None:
        return default
    names = list(known) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"mhmoe: unknown shape(s) {unknown}; choose from {sorted(known)} or 'all'")
    return names


def _export_hf(args: argparse.Namespace) -> int:
    from mhmoe.hf.runs import export_run

    print(f"wrote {export_run(Path(args.run_dir), Path(args.out_dir))}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from mhmoe.hf.runs import import_run

    print(f"wrote {import_run(Path(args.hf_dir), Path(args.run_dir))}")
    return 0


def _moeify(args: argparse.Namespace) -> int:
    from mhmoe.convert import moeify_pretrained
    from mhmoe.errors import UserError

    given = dict(num_experts=args.experts, top_k=args.top_k, every=args.every, router=args.router)
    recipe = {k: v for k, v in given.items() if v is not None}  # the rest: moeify's defaults, or the MoE model's
    if args.kind == "mhmoe":
        recipe["num_heads"] = args.heads
    try:
        replaced = moeify_pretrained(Path(args.hf_dir), Path(args.out_dir), args.kind, **recipe)
    except ValueError as e:  # sizes that do not fit the model: one line, like any user error
        raise UserError(str(e)) from None
    print(f"{args.out_dir}: {len(replaced)} FFNs / MoE blocks replaced by {args.kind} ({', '.join(replaced)})")
    print("load it with mhmoe.convert.load_moeified(OUT_DIR)", file=sys.stderr)
    return 0


def _sizes(args: argparse.Namespace) -> int:
    from mhmoe.models.cost import layer_cost, presets

    print("| preset | layer | experts | top-k | expert hidden | heads | params total | params active | GFLOPs/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, spec in presets().items():
        c, moe = layer_cost(spec), spec.moe
        experts, top_k = (moe.num_experts, moe.top_k) if moe and spec.kind != "dense" else ("-", "-")
        hidden = moe.expert_hidden if moe and spec.kind != "dense" else spec.hidden
        heads = moe.num_heads if moe and spec.kind == "mhmoe" else "-"
        print(
            f"| {name} | {spec.kind} | {experts} | {top_k} | {hidden} | {heads} | "
            f"{c.params_total:,} | {c.params_active:,} | {c.flops_per_token / 1e9:.4f} |"
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    from mhmoe.train.config import apply_overrides, field_names, preset
    from mhmoe.train.lm import train

    cfg = preset(args.preset)
    if args.list_keys:
        print("\n".join(field_names(cfg)))
        return 0
    if args.data:
        cfg.data.path = args.data
    apply_overrides(cfg, args.set)
    out = Path(args.out or f"runs/{args.preset}")
    result = train(cfg, out, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        print(
            f"{out}: step {result.step}, {result.tokens_seen:,} tokens, val ppl {result.valid['ppl']:.2f}, "
            f"test ppl {result.test['ppl']:.2f}, {result.train_seconds:.0f} s"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mhmoe.analysis.runs import eval_run

    results = eval_run(Path(args.run_dir))
    for split in ("valid", "test"):
        r = results[split]
        print(f"{split}: loss {r['loss']:.4f} nats/token, ppl {r['ppl']:.2f} over {r['tokens']:,} tokens")
    for lang, row in results.get("languages", {}).items():
        for split in ("valid", "test"):
            print(
                f"{split} {lang}: ppl {row[split + '_ppl']:.2f}, {row[split + '_bpb']:.4f} bits/byte "
                f"over {row[split + '_tokens']:,} tokens"
            )
    if "language_average" in results:
        avg = results["language_average"]
        print(f"average over languages: val ppl {avg['val_ppl']:.2f}, val {avg['val_bpb']:.4f} bits/byte")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from mhmoe.analysis.runs import analyze_run, load_run
    from mhmoe.data import data_cache_dir, load_corpus, tokenize_corpus

    run_dir = Path(args.run_dir)
    run = load_run(run_dir)
    other = {}
    if args.data:
        corpus = load_corpus(Path(args.data))
        other["other"] = tokenize_corpus(corpus, run.tokenizer, data_cache_dir(), progress=True)["valid"]
    report = analyze_run(run_dir, other=other, run=run, max_batches=args.batches)
    print(json.dumps(report, indent=1))
    print(f"plots and analysis.json in {run_dir / 'analysis'}", file=sys.stderr)
    return 0


# What each reproduction writes besides results.json / results.md
REPRODUCTION_FILES = {
    "english": "val_curves.png and heatmaps/",
    "multilingual": "val_curves.png, heatmaps/ and divergence/",
    "multimodal": "val_curves*.png, heatmaps/ and divergence/",
    "ablations": "sweep-*.png and heatmaps/",
}


def _reproduce(args: argparse.Namespace) -> int:
    from mhmoe.experiments import ablations, english, multilingual, multimodal
    from mhmoe.experiments.common import Assumptions, plan_markdown

    task = args.task
    if args.ood_data and task not in ("english", "multilingual"):
        raise SystemExit("mhmoe: --ood-data applies to `reproduce english` and `reproduce multilingual` only")
    if args.sweeps and task != "ablations":
        raise SystemExit("mhmoe: --sweeps applies to `reproduce ablations` only; the others take --part")
    if args.part and task == "ablations":
        raise SystemExit("mhmoe: `reproduce ablations` takes --sweeps, not --part")
    seeds = args.seeds or (GPU_SEEDS.get(task, 5) if args.gpu else 1)
    out = Path(args.out or f"runs/reproduce-{task}{'-gpu' if args.gpu else '-quick' if args.quick else ''}")
    size = dict(quick=args.quick, gpu=args.gpu, overrides=args.set)
    choice = dict(only=_sweeps(args.sweeps)) if task == "ablations" else dict(part=args.part or "core")
    ood = dict(ood=args.ood_data) if task in ("english", "multilingual") else {}
    if args.dry_run:
        counted = dict(other_corpora=len(english.ood_corpora(args.ood_data))) if ood else {}
        data = dict(data=args.data or "") if task == "multilingual" else {}
        models = {"english": english, "multilingual": multilingual, "multimodal": multimodal, "ablations": ablations}
        planned = models[task].plan(**size, **choice, **counted, **data)
        print(plan_markdown(task, planned, seeds, out, Assumptions(tflops=args.assume_tflops)))
        return 0
    experiment = {"english": english, "multilingual": multilingual, "multimodal": multimodal, "ablations": ablations}
    results = experiment[task].run(
        out, **size, **choice, **ood, seeds=seeds, data=args.data or "", progress=not args.no_progress
    )
    print(experiment[task].table(results))
    print(f"results.json, results.md, {REPRODUCTION_FILES[task]} in {out} ({results['wall_seconds']:.0f} s)")
    return 0


def _sweeps(text: str | None) -> list[str] | None:
    if not text:
        return ["heads"]
    if text == "all":
        return None
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SWEEPS]
    if unknown:
        raise SystemExit(f"mhmoe: unknown sweep {unknown[0]!r}; choose from {', '.join(SWEEPS)} (comma-separated)")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhmoe", description="Multi-Head Mixture-of-Experts for PyTorch")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a language model")
    train.add_argument("--preset", default="cpu", help="cpu-tiny, cpu, gpu or paper (default: cpu)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--data", help="text file, folder of .txt/.jsonl files, or a data pack folder")
    train.add_argument("--out", help="run directory (default: runs/PRESET); an existing run is resumed")
    train.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=_train)

    evaluate = verbs.add_parser("eval", help="validation and test perplexity of a run")
    evaluate.add_argument("run_dir")
    evaluate.set_defaults(run=_eval)

    analyze = verbs.add_parser("analyze", help="expert activation, per-head usage and sub-token divergence")
    analyze.add_argument("run_dir")
    analyze.add_argument("--data", help="also analyse held-out text from this corpus (another genre or language)")
    analyze.add_argument("--batches", type=int, default=20, help="held-out batches to route (default 20)")
    analyze.set_defaults(run=_analyze)

    reproduce = verbs.add_parser("reproduce", help="the paper's comparisons and ablations")
    reproduce.add_argument("task", choices=("english", "multilingual", "multimodal", "ablations"))
    size = reproduce.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="minutes on a 2-core CPU: shows the pipeline")
    size.add_argument("--gpu", action="store_true", help="one H200: each part in about six minutes (see --dry-run)")
    reproduce.add_argument(
        "--seeds",
        type=int,
        help="seeds per model (default with --gpu: 5, ablations 3; else 1); finished seeds are reused",
    )
    reproduce.add_argument(
        "--ood-data",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="also measure routing on this corpus the models never saw (another language or genre); repeat it, or "
        "separate corpora with commas; a bare path is named by its file name's first part (de.test.txt.gz: de)",
    )
    reproduce.add_argument(
        "--part",
        choices=PARTS,
        help="core: dense, smoe, xmoe, mhmoe_flops (v2, equal FLOPs); params: dense, xmoe, mhmoe_params (v1, equal "
        "parameters); controls: smoe and the four attribution controls (fine-grained SMoE, MH-MoE with the "
        "softmax router, with H = 1, without head and merge layers); all: every model. Runs already in --out are "
        "reused (default: core)",
    )
    reproduce.add_argument(
        "--sweeps",
        help=f"ablations: the sweeps to run, comma-separated from {', '.join(SWEEPS)}, or all (default: heads); "
        "sweeps run into the same --out share their common models",
    )
    reproduce.add_argument(
        "--dry-run", action="store_true", help="print the plan (models, steps, tokens, seeds) and a time estimate"
    )
    reproduce.add_argument(
        "--assume-tflops",
        type=float,
        default=100.0,
        help="--dry-run: the sustained training rate to estimate with, TFLOP/s (default 100)",
    )
    reproduce.add_argument("--out")
    reproduce.add_argument(
        "--data",
        help="english: default $MHMOE_DATA or the built-in Shakespeare corpus; multilingual: a folder of "
        "<lang>.train.txt(.gz) / <lang>.valid.txt(.gz) files (or <lang>.txt, <lang>/, JSONL with text and lang), "
        "default $MHMOE_MULTILINGUAL_DATA; multimodal: the data pack root "
        "(images/, english/) or an image folder with captions.jsonl, default $MHMOE_MULTIMODAL_DATA",
    )
    reproduce.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the budget")
    reproduce.add_argument("--no-progress", action="store_true")
    reproduce.set_defaults(run=_reproduce)

    bench = verbs.add_parser("bench", help="benchmarks")
    bench_verbs = bench.add_subparsers(dest="what", required=True)
    layer = bench_verbs.add_parser("layer", help="time MoE/MH-MoE layers against dense-eq and the loop")
    layer.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    layer.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    layer.add_argument("--shapes", help="comma-separated shape names, or 'all' (default: the device's set)")
    layer.add_argument("--repeats", type=int, default=5)
    layer.add_argument("--json", help="also write the results to this JSON file")
    layer.add_argument(
        "--cuda-graph", action="store_true", help="instead of timing: capture forward + backward in a CUDA graph"
    )
    layer.set_defaults(run=_bench_layer)
    step = bench_verbs.add_parser("train", help="time LM training steps: fast path vs loop vs dense-eq")
    step.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    step.add_argument("--preset", help="model and batch of this training preset (default: cpu, or gpu on CUDA)")
    step.add_argument("--repeats", type=int, default=5)
    step.add_argument("--no-loop", action="store_true", help="skip the per-expert loop (and its correctness check)")
    step.add_argument(
        "--compile", action="store_true", help="time torch.compile'd models (fast and dense-eq; checked against eager)"
    )
    step.add_argument(
        "--also",
        metavar="IMPLS",
        help="more fast-path rows, comma-separated: recompute, triton, triton-recompute (Triton: CUDA only)",
    )
    step.add_argument("--json", help="also write the results to this JSON file")
    step.set_defaults(run=_bench_train)

    export_hf = verbs.add_parser("export-hf", help="a train run as a Hugging Face model folder")
    export_hf.add_argument("run_dir")
    export_hf.add_argument("out_dir", help="a new (or empty) folder")
    export_hf.set_defaults(run=_export_hf)

    import_hf = verbs.add_parser("import-hf", help="a Hugging Face MHMoEForCausalLM folder as a run directory")
    import_hf.add_argument("hf_dir")
    import_hf.add_argument("run_dir", help="a new (or empty) folder")
    import_hf.set_defaults(run=_import_hf)

    moeify = verbs.add_parser(
        "moeify",
        help="replace a saved transformers model's FFNs, or its MoE blocks (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3, "
        "Switch), by SMoE / MH-MoE layers",
    )
    moeify.add_argument("hf_dir", help="a saved transformers model (safetensors weights): dense or MoE")
    moeify.add_argument("out_dir", help="a new (or empty) folder")
    moeify.add_argument("--kind", choices=("smoe", "mhmoe"), default="smoe",
                        help="smoe: dense FFNs upcycled, or MoE blocks swapped exactly; mhmoe: either made MH-MoE")  # fmt: skip
    moeify.add_argument("--experts", type=int, help="experts per layer (dense: default 8; MoE -> MH-MoE: E·H)")
    moeify.add_argument("--top-k", type=int, help="experts per (sub-)token (dense: default 2; MoE: the model's)")
    moeify.add_argument("--heads", type=int, default=4, help="MH-MoE heads (default 4; --kind mhmoe only)")
    moeify.add_argument("--every", type=int, help="convert every N-th dense FFN (default 1: all; dense only)")
    moeify.add_argument("--router", choices=("softmax", "xmoe", "sigmoid"), help="dense only (default softmax)")
    moeify.set_defaults(run=_moeify)

    sizes = verbs.add_parser("sizes", help="parameter counts and FLOPs of the paper's presets")
    sizes.set_defaults(run=_sizes)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mhmoe.train.allocator import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    tune_cpu_allocator()  # keep freed activations for reuse on the CPU (module doc); MHMOE_TUNE_MALLOC=0 opts out
    for name in ("repeats", "seeds", "batches"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"mhmoe: --{name} must be >= 1, got {getattr(args, name)}")
    try:
        return args.run(args)
    except Exception as e:
        message = user_message(e)
        if message is None or os.environ.get("MHMOE_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"mhmoe: error: {message}", file=sys.stderr)
        return 2


def user_message(e: Exception) -> str | None:
    """The one line for an error the user can act on (`UserError`, a foreseeable `OSError`, memory exhausted), or
    None for a bug."""
    from mhmoe.errors import UserError, os_error_message

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    cpu_oom = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or cpu_oom:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return f"out of memory ({first}); lower train.batch_size or the model's sizes"
    return None


if __name__ == "__main__":
    sys.exit(main())
