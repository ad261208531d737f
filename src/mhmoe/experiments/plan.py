"""A reproduction's plan as typed records: the budget every model shares (`Budget`, instead of `--set` strings),
the plan itself (`Plan`: task, part, budget, seeds), the measured training rate of each model on the device
(`measure_rates`: a few steps each, finite loss checked), the steps sized to end within a time budget
(`size_steps`), and what a device session sends back (`export`: a few small files).

    plan = Plan("english", PART_SPECS["decisive"], budget, seeds=5)
    rates = measure_rates(variants, lm_smoke(cfg), cfg.train)   # the smoke and rate step, <= 30 s
    steps = size_steps(plan, planned, rates, ...)               # the steps that end within --budget-min, or PlanError

Every reproduction's `--gpu` part goes through `start_part` (`dry_run_part` for `--dry-run`): the English parts,
multilingual and the ablations with `lm_smoke`, multimodal with its own smoke (random masked batches).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from mhmoe.errors import UserError
from mhmoe.experiments.common import RECORD, PartSpec, PlannedModel, Variant, finished_seeds
from mhmoe.io import atomic_write, notice, write_json
from mhmoe.models.gpt import GPT
from mhmoe.train.config import RunConfig, TrainConfig, apply_overrides, preset
from mhmoe.train.loop import autocast_for, resolve_device


class PlanError(UserError):
    """A plan that cannot run as asked (too little time for its token floor, too little disk)."""


@dataclass(frozen=True)
class Shape:
    """The model every variant of a budget shares (the variants set only the FFN's layout)."""

    seq_len: int
    d_model: int
    n_layers: int
    ffn_hidden: int  # the dense FFN's hidden, and the base experts' (the variants are sized from it)
    vocab_size: int  # BPE vocabulary


@dataclass(frozen=True)
class Budget:
    """The training budget every model of a part shares, on top of a training preset."""

    preset: str  # `mhmoe train --preset` name the budget starts from (its model, data and optimiser)
    steps: int  # optimiser steps per run (the most: `size_steps` may lower it on a device, never raise it)
    warmup_steps: int
    lr: float
    eval_every: int  # steps between periodic validations (the curves)
    eval_batches: int  # batches per periodic validation
    final_eval_batches: int | None = None  # batches of each held-out split at the end (None: the preset's)
    batch_size: int | None = None  # None: the preset's
    num_experts: int | None = None  # the base MoE's experts (None: the preset's)
    shape: Shape | None = None  # None: the preset's model
    log_every: int | None = None
    compile: bool | None = None
    min_tokens: int = 0  # the fewest training tokens per model the part may be sized down to

    def config(self) -> RunConfig:
        """The run configuration: the preset with this budget (one checkpoint, at the end)."""
        cfg = preset(self.preset)
        t, m = cfg.train, cfg.model
        t.max_steps, t.warmup_steps, t.lr = self.steps, self.warmup_steps, self.lr
        t.eval_every, t.eval_batches, t.checkpoint_every = self.eval_every, self.eval_batches, self.steps
        for name in ("final_eval_batches", "batch_size", "log_every", "compile"):
            if getattr(self, name) is not None:
                setattr(t, name, getattr(self, name))
        moe = m.ffn.moe
        if self.num_experts is not None:
            moe = dataclasses.replace(moe, num_experts=self.num_experts)
        if self.shape is not None:
            s = self.shape
            m.seq_len, m.d_model, m.n_layers = s.seq_len, s.d_model, s.n_layers
            moe = dataclasses.replace(moe, expert_hidden=s.ffn_hidden)
            m.ffn = dataclasses.replace(m.ffn, hidden=s.ffn_hidden)
            cfg.data.vocab_size = s.vocab_size
        m.ffn = dataclasses.replace(m.ffn, moe=moe)
        return cfg


class StepBudget(Protocol):
    """What a plan reads of its budget: `Budget` (the language models'), or another task's record with these
    fields (multimodal's `MaskedBudget`); a frozen dataclass."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def preset(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def min_tokens(self) -> int: ...


@dataclass(frozen=True)
class Plan:
    """What a reproduction part trains: its models and primary contrasts, the budget, the seeds, and the device
    time it must end within (`budget_min`, minutes; 0: no limit)."""

    task: str
    part: PartSpec
    budget: StepBudget
    seeds: int
    budget_min: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_steps(self, steps: int) -> "Plan":
        return dataclasses.replace(self, budget=dataclasses.replace(self.budget, steps=steps))

    def describe(self) -> str:
        b = self.budget
        primary = (
            "; ".join(f"{c.label} ({c.question})" for c in self.part.primary) or "none (every contrast exploratory)"
        )
        return "\n".join([
            f"part {self.part.name}: {', '.join(self.part.models)}; {self.seeds} seeds, seed-major "
            "(seed 0 of every model, then seed 1, ...; results.json rewritten after every round)",
            f"budget: preset {b.preset}, {b.steps} steps, lr {b.lr:g}, warmup {b.warmup_steps}"
            + (f", at least {b.min_tokens / 1e6:.1f} M tokens per model" if b.min_tokens else ""),
            f"primary contrasts (declared before any run, not adjusted): {primary}",
        ])  # fmt: skip


@dataclass(frozen=True)
class Rate:
    """A model's training rate on the device: from a few real steps (`measured`) or assumed from its FLOPs."""

    model: str
    tokens_per_s: float  # training tokens per second (forward, backward and the optimiser step)
    measured: bool
    loss: float | None = None  # the last smoke step's loss (finite), None when assumed

    def run_seconds(self, planned: PlannedModel, overhead_s: float) -> float:
        """One run: its training tokens, its evaluation tokens at about a third of the cost, and `overhead_s`."""
        return (planned.train_tokens + planned.eval_tokens / 3) / self.tokens_per_s + overhead_s


def assumed_rates(planned: Sequence[PlannedModel], tflops: float) -> list[Rate]:
    """Rates from FLOPs at `tflops` sustained (training counts 3× the forward FLOPs): an assumption."""
    return [Rate(m.name, tflops * 1e12 / (3 * m.flops_per_token), measured=False) for m in planned]


@dataclass
class SmokeModel:
    """One model of the smoke step: the module on the device, the keyword arguments of the forwards one training
    step makes (fixed random inputs; each output's loss + aux_loss is trained, as the real step does), and the
    training tokens of that step as `PlannedModel.train_tokens` counts them."""

    model: torch.nn.Module
    forwards: list[dict[str, torch.Tensor]]
    tokens: int


Smoke = Callable[[Variant, torch.device], SmokeModel]  # a task's smoke model of a variant, built on the device


def planned_vocab(cfg: RunConfig) -> int:
    """The vocabulary a run will have: 257 for bytes (256 + end of text), else the BPE size asked for."""
    return 257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size


def lm_smoke(cfg: RunConfig) -> Smoke:
    """The language models' smoke step: a GPT of the variant at the budget's batch shape (the vocabulary a run
    will have), random tokens."""

    def build(variant: Variant, device: torch.device) -> SmokeModel:
        model_cfg = dataclasses.replace(cfg.model, ffn=variant.ffn, vocab_size=planned_vocab(cfg))
        model = GPT(model_cfg).to(device)
        shape = (cfg.train.batch_size, model_cfg.seq_len)
        x = torch.randint(0, model_cfg.vocab_size, shape, device=device)
        y = torch.randint(0, model_cfg.vocab_size, shape, device=device)
        return SmokeModel(model, [dict(idx=x, targets=y)], x.numel())

    return build


def measure_rates(variants: Sequence[Variant], smoke: Smoke, train: TrainConfig, seconds: float = 30.0) -> list[Rate]:
    """The smoke and rate step: a few training steps of each variant on train.device (at train.precision and
    train.lr) on the task's random inputs (`smoke`); every loss must be finite (else PlanError naming the model).
    Two warm-up steps, then steps timed until the model's share of `seconds` is spent (at least 2). Prints one
    line per model."""
    device = resolve_device(train.device)
    share = seconds / max(len(variants), 1)
    rates = []
    for variant in variants:
        started = time.perf_counter()
        torch.manual_seed(0)
        built = smoke(variant, device)
        model = built.model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr)
        autocast = autocast_for(train.precision, device)
        timed, timed_s, loss = 0, 0.0, float("nan")
        for step in range(10_000):
            step_started = time.perf_counter()
            losses = []
            for inputs in built.forwards:
                with autocast:
                    out = model(**inputs)
                (out.loss + out.aux_loss).backward()
                losses.append(out.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = sum(value.item() for value in losses)  # synchronises the device
            if not math.isfinite(loss):
                raise PlanError(f"smoke step {step} of {variant.name} on {device} gave a non-finite loss ({loss})")
            if step >= 2:
                timed, timed_s = timed + 1, timed_s + time.perf_counter() - step_started
            if timed >= 8 or (timed >= 2 and time.perf_counter() - started > share):
                break
        rate = Rate(variant.name, timed * built.tokens / timed_s, measured=True, loss=loss)
        print(f"smoke {variant.name} on {device}: {step + 1} steps, loss {loss:.3f} (finite), "
              f"{rate.tokens_per_s:,.0f} tokens/s measured", flush=True)  # fmt: skip
        rates.append(rate)
        del model, optimizer, built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rates


@dataclass(frozen=True)
class Overheads:
    """Seconds beside the training and evaluation tokens; assumed, not measured (stated with every estimate)."""

    per_run_s: float = 8.0  # building the model, the checkpoint write and re-read, routing analysis, figures
    fixed_s: float = 30.0  # per invocation: start-up, the shared tokenizer, tokenising the data once


def estimate_seconds(
    planned: Sequence[PlannedModel], rates: Sequence[Rate], todo: dict[str, int], overheads: Overheads
) -> float:
    """The part's seconds: every run still to do at its model's rate, plus the overheads."""
    by_name = {r.model: r for r in rates}
    runs = sum(todo[m.name] * by_name[m.name].run_seconds(m, overheads.per_run_s) for m in planned)
    return overheads.fixed_s + runs


def size_steps(
    plan: Plan, planned: Sequence[PlannedModel], rates: Sequence[Rate], todo: dict[str, int], overheads: Overheads
) -> int:
    """The most steps (at most the budget's) whose runs still to do end within plan.budget_min at the rates;
    PlanError when even the token floor (budget.min_tokens) does not fit. The time is linear in the steps:
    fixed + Σ_runs (steps · tokens per step + eval tokens / 3) / rate + overhead."""
    budget = plan.budget
    if plan.budget_min <= 0 or not any(todo.values()):
        return budget.steps
    by_name = {r.model: r for r in rates}
    per_step = planned[0].train_tokens / planned[0].steps  # tokens per optimiser step, the same for every model
    slope = sum(todo[m.name] * per_step / by_name[m.name].tokens_per_s for m in planned)
    fixed = overheads.fixed_s + sum(
        todo[m.name] * (m.eval_tokens / 3 / by_name[m.name].tokens_per_s + overheads.per_run_s) for m in planned
    )
    fits = math.floor((plan.budget_min * 60 - fixed) / slope) if slope > 0 else budget.steps
    steps = min(budget.steps, fits)
    floor = math.ceil(budget.min_tokens / per_step)
    if steps < max(floor, 1):
        need = (fixed + slope * max(floor, 1)) / 60
        floor_text = (
            f"{floor} steps ({budget.min_tokens / 1e6:.1f} M tokens each, the part's floor)"
            if floor >= 1
            else "1 step (the part has no token floor)"
        )
        rates_text = "measured" if all(r.measured for r in rates) else "assumed"
        raise PlanError(
            f"part {plan.part.name} does not fit --budget-min {plan.budget_min:g}: at the {rates_text} rates "
            f"{sum(todo.values())} runs of {floor_text} need about {need:.1f} min; pass fewer --seeds or a larger "
            "--budget-min"
        )
    return steps


def plan_markdown(
    plan: Plan,
    planned: Sequence[PlannedModel],
    rates: Sequence[Rate],
    out: Path,
    overheads: Overheads,
    rate_source: str,
) -> str:
    """The plan (models, steps, tokens, seeds, runs already done in `out`), its primary contrasts, and its
    estimated time, saying whether the rates behind it were measured or assumed (`rate_source`)."""
    by_name = {r.model: r for r in rates}
    lines = [
        f"plan: reproduce {plan.task}, {len(planned)} models × {plan.seeds} seeds, output {out}",
        plan.describe(),
        "",
        "| model | params total | MFLOPs/token | steps | tokens/seed | eval tokens/seed | tokens/s | seeds to run "
        "| est. s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    todo = {m.name: plan.seeds - finished_seeds(out, m.name, plan.seeds) for m in planned}
    for m in planned:
        rate = by_name[m.name]
        seconds = todo[m.name] * rate.run_seconds(m, overheads.per_run_s)
        lines.append(
            f"| {m.name} | {m.params_total / 1e6:.1f} M | {m.flops_per_token / 1e6:.1f} | {m.steps} "
            f"| {m.train_tokens / 1e6:.2f} M | {m.eval_tokens / 1e6:.2f} M | {rate.tokens_per_s:,.0f} "
            f"| {todo[m.name]} | {seconds:.0f} |"
        )
    total = estimate_seconds(planned, rates, todo, overheads)
    measured = all(r.measured for r in rates)
    lines += [
        "",
        f"estimated time: {total / 60:.1f} min ({total:.0f} s); rates {'MEASURED' if measured else 'ASSUMED'}: "
        f"{rate_source}; beside the tokens {overheads.per_run_s:g} s per run and {overheads.fixed_s:g} s per "
        "invocation (assumed)"
        + (f"; limit --budget-min {plan.budget_min:g}" if plan.budget_min else ""),
    ]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ a part


# Beside the tokens, assumed (stated with every estimate). --gpu: 8 s per run for building the model, the checkpoint
# write and re-read, the routing analysis and figures; 30 s per invocation for start-up, the shared tokenizer and
# tokenising the data once. Multimodal's invocation also prepares its data (the k-means visual codebook: 36 s for
# 256 codes on 12 k images on 2 CPU cores, results/multimodal; --gpu fits 1024 codes on all 70 k).
OVERHEADS = {"gpu": Overheads(per_run_s=8.0, fixed_s=30.0), "cpu": Overheads(per_run_s=10.0, fixed_s=30.0)}
MULTIMODAL_OVERHEADS = {"gpu": Overheads(per_run_s=10.0, fixed_s=120.0), "cpu": Overheads(per_run_s=10.0, fixed_s=60.0)}
GPU_TFLOPS = 100.0  # --dry-run's assumed rate with --gpu and without --measure: a guess no run has checked
CPU_TFLOPS = 0.075  # the quick evidence runs' rate on 2 idle CPU cores (dense 0.073, MH-MoE 0.078 TFLOP/s)


@dataclass(frozen=True)
class Options:
    """How a part runs beside its plan: where, within what time, and what it keeps and sends back."""

    device: str | None = None  # train.device (None: the budget's, "auto")
    budget_min: float = 8.0  # --gpu: the part's steps are sized to end within this many minutes
    min_tokens: int | None = None  # None: the budget's floor (8 M for the --gpu decisive English part, else 0)
    keep_checkpoints: bool = False  # else deleted once a run's analysis is written
    export: Path | None = None  # English: copy the results into this folder after every seed round (`export`)
    assume_tflops: float | None = None  # --dry-run without a measurement: the assumed rate (None: GPU_/CPU_TFLOPS)

    def tflops(self, gpu: bool) -> float:
        """The rate a `--dry-run` without a measurement assumes: `assume_tflops`, else GPU_TFLOPS with --gpu,
        CPU_TFLOPS without."""
        return self.assume_tflops or (GPU_TFLOPS if gpu else CPU_TFLOPS)


def budget_plan(
    task: str,
    budget: Budget,
    part: PartSpec,
    seeds: int,
    overrides: Sequence[str],
    options: Options,
    gpu: bool,
) -> tuple[Plan, RunConfig]:
    """A language-model part's plan and run configuration: the budget with the overrides (train.max_steps among
    them caps the steps), the device and the token floor of `options`; with `gpu` its steps are to be sized to
    end within options.budget_min."""
    cfg = apply_overrides(budget.config(), list(overrides))
    if options.device:
        cfg.train.device = options.device
    floor = budget.min_tokens if options.min_tokens is None else options.min_tokens
    budget = dataclasses.replace(budget, steps=cfg.train.max_steps, min_tokens=floor)
    return Plan(task, part, budget, seeds, options.budget_min if gpu else 0.0), cfg


def part_rates(
    train: TrainConfig,
    variants: Sequence[Variant],
    smoke: Smoke,
    planned: Sequence[PlannedModel],
    measure: bool,
    tflops: float,
) -> tuple[list[Rate], str]:
    """The rates a part is planned at and where they come from: measured by the smoke step on train.device
    (`measure`), else assumed at `tflops` from the models' FLOPs."""
    if measure:
        return measure_rates(variants, smoke, train), f"the smoke step on {train.device}"
    source = f"{tflops:g} TFLOP/s sustained from FLOPs (training 3× the forward), not measured on this machine"
    return assumed_rates(planned, tflops), source


def sized_part(
    plan: Plan,
    train: TrainConfig,
    planned: Callable[[], list[PlannedModel]],
    out: Path,
    rates: Sequence[Rate],
    overheads: Overheads,
) -> tuple[Plan, list[PlannedModel]]:
    """The plan with its steps sized at `rates` to end within its budget_min (`size_steps`), or the steps a
    previous invocation into `out` sized; `train` (the runs' TrainConfig) gets them, and `planned()` (the part's
    models at train's steps) is returned at them."""
    steps = stored_steps(out, plan.part.name)
    if steps is None:
        models = planned()
        todo = {m.name: plan.seeds - finished_seeds(out, m.name, plan.seeds) for m in models}
        steps = size_steps(plan, models, rates, todo, overheads)
    train.max_steps, train.checkpoint_every = steps, min(train.checkpoint_every, steps)
    return plan.with_steps(steps), planned()


@dataclass(frozen=True)
class PartSetup:
    """What planning needs of a reproduction's part: its plan, the runs' training section (sized in place),
    its models, how to build each for the smoke step, its planned models at the training section's steps, and
    the assumed overheads."""

    plan: Plan
    train: TrainConfig
    variants: Sequence[Variant]
    smoke: Smoke
    planned: Callable[[], list[PlannedModel]]
    overheads: Overheads


def dry_run_part(part: PartSetup, out: Path, measure: bool, tflops: float) -> str:
    """`--dry-run`: the part sized as a run would size it, with its estimated time, from rates measured by the
    smoke step (`measure`) or assumed at `tflops` (the text says which)."""
    plan, planned, rates, source = _sized(part, out, measure, tflops)
    return plan_markdown(plan, planned, rates, out, part.overheads, source)


def start_part(part: PartSetup, out: Path, measure: bool, keep_checkpoints: bool = True) -> tuple[Plan, list[Rate]]:
    """A run's start: the smoke and rate step on the device (`measure`, every --gpu part; else rates assumed at
    CPU_TFLOPS), the steps sized to end within the plan's budget_min or PlanError with the reason, the plan
    printed, the disk checked, and the plan kept in `out` (a rerun continues with its steps). Returns the plan
    and the rates."""
    plan, planned, rates, source = _sized(part, out, measure, CPU_TFLOPS)
    print(plan_markdown(plan, planned, rates, out, part.overheads, source), flush=True)
    check_disk(out, planned, keep_checkpoints, plan.seeds * len(planned))
    return save_plan(out, plan), rates


def _sized(
    part: PartSetup, out: Path, measure: bool, tflops: float
) -> tuple[Plan, list[PlannedModel], list[Rate], str]:
    """The part's rates (measured by the smoke step, or assumed at `tflops`) and its plan sized at them."""
    rates, source = part_rates(part.train, part.variants, part.smoke, part.planned(), measure, tflops)
    plan, planned = sized_part(part.plan, part.train, part.planned, out, rates, part.overheads)
    return plan, planned, rates, source


# ------------------------------------------------------------------------------------------------ disk


def check_disk(out: Path, planned: Sequence[PlannedModel], keep_checkpoints: bool, runs: int) -> None:
    """PlanError unless `out`'s file system has room for the checkpoints the part holds at once (weights and
    two Adam moments in fp32, one run's when they are deleted after analysis, else every run's) and 1 GiB."""
    biggest = max(m.params_total for m in planned) * 4 * 3
    need = biggest * (runs if keep_checkpoints else 1) + 2**30
    existing = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        what = f"{runs} runs' checkpoints (--keep-checkpoints)" if keep_checkpoints else "one run's checkpoint"
        raise PlanError(
            f"{existing} has {free / 2**30:.1f} GiB free; the part needs about {need / 2**30:.1f} GiB for {what} "
            "and 1 GiB beside: free some space or pass another --out"
        )


# ------------------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class ExportLimits:
    """What a device session sends back: at most `files` files under the export root, each at most `file_bytes`,
    at most `depth` folders down."""

    files: int = 8
    file_bytes: int = 16 * 2**20
    depth: int = 2


RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", "env.json", RECORD, "analysis/analysis.json")
EXPORTED = ("results.json", "results.md", "val_curves.png")


def runs_archive(out: Path) -> bytes:
    """One .tar.gz of every run's config, summary, metrics, environment, record and routing analysis (no
    checkpoints), as runs/<run>/<file>, in a fixed order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for run in sorted(p for p in (out / "runs").glob("*") if p.is_dir()):
            for name in RUN_FILES:
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}")
    return buffer.getvalue()


def export(out: Path, root: Path, folder: str, limits: ExportLimits = ExportLimits()) -> list[Path]:
    """Copy results.json, results.md, the curves and runs.tar.gz of `out` into root/folder, within `limits`
    counted over everything under `root` (other parts' files included). A file that would break a limit is left
    out with a line saying why. Returns the files written."""
    target = root / folder
    if len(Path(folder).parts) + 1 > limits.depth + 1:
        raise PlanError(f"export folder {folder!r} is more than {limits.depth} folders below {root}")
    payload = {name: (out / name).read_bytes() for name in EXPORTED if (out / name).is_file()}
    payload["runs.tar.gz"] = runs_archive(out)
    order = ("results.json", "results.md", "runs.tar.gz", "val_curves.png")  # the most needed first
    others = [p for p in root.rglob("*") if p.is_file() and p.parent != target] if root.exists() else []
    chosen: list[str] = []
    for name in (n for n in order if n in payload):
        size = len(payload[name])
        if size > limits.file_bytes:
            notice(f"not exported: {name} ({size:,} bytes > {limits.file_bytes:,})")
        elif len(others) + len(chosen) >= limits.files:
            notice(f"not exported: {name} ({limits.files} files would be under {root})")
        else:
            chosen.append(name)
    if target.is_dir():  # an earlier export of this part: what it would no longer send goes
        for stale in target.iterdir():
            if stale.is_file() and stale.name not in chosen:
                stale.unlink()
    for name in chosen:
        with atomic_write(target / name, "wb") as f:
            f.write(payload[name])
    return [target / name for name in chosen]


def device_model(device: torch.device | None = None) -> str:
    """The accelerator's model for file names ("H100", "H200", "A100"), from its CUDA name; "cpu" without one.
    A name without such a model number falls back to its words joined by '-'."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return "cpu"
    return gpu_model(torch.cuda.get_device_name(device))


def gpu_model(name: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA GeForce RTX 4090" ->
    "RTX-4090"."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name.replace("-", " "))
    if found:
        return found.group(1)
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w and w.upper() not in ("NVIDIA", "GEFORCE")]
    return "-".join(words) or "gpu"


def save_plan(out: Path, plan: Plan) -> Plan:
    """The plan a part runs with, kept in out/plan-<part>.json: a rerun into the same `out` continues with the
    stored steps (sized once, on the first invocation) instead of sizing them again."""
    path = out / f"plan-{plan.part.name}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        steps = stored["budget"]["steps"]
        if steps != plan.budget.steps:
            notice(f"{path}: continuing with its {steps} steps per run (the first invocation sized them)")
        plan = plan.with_steps(steps)
    write_json(path, plan.to_dict())
    return plan


def stored_steps(out: Path, part: str) -> int | None:
    """The steps a previous invocation of the part sized into `out` (None: none ran there)."""
    path = out / f"plan-{part}.json"
    return json.loads(path.read_text())["budget"]["steps"] if path.is_file() else None


__all__ = [
    "CPU_TFLOPS",
    "GPU_TFLOPS",
    "MULTIMODAL_OVERHEADS",
    "OVERHEADS",
    "Budget",
    "ExportLimits",
    "Options",
    "Overheads",
    "PartSetup",
    "Plan",
    "PlanError",
    "Rate",
    "Shape",
    "Smoke",
    "SmokeModel",
    "StepBudget",
    "assumed_rates",
    "budget_plan",
    "check_disk",
    "device_model",
    "dry_run_part",
    "estimate_seconds",
    "export",
    "gpu_model",
    "lm_smoke",
    "measure_rates",
    "part_rates",
    "plan_markdown",
    "planned_vocab",
    "save_plan",
    "size_steps",
    "sized_part",
    "start_part",
    "stored_steps",
]
