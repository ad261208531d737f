"""The one training loop, over a small task interface; the causal LM (`mhmoe.train.lm`) and the masked multimodal
model (`mhmoe.experiments.multimodal.task`) are two tasks of it.

A run directory holds everything needed to understand and resume a run:
    config.json   the resolved run configuration     env.json      versions, device, git commit, command
    metrics.jsonl / metrics.csv, tb/ (TensorBoard, if installed)      summary.json  final held-out evaluation
    checkpoints/  `mhmoe.train.checkpoint` (`mhmoe.train.dcp` under torchrun), plus what the task saves
Calling `train` on a directory with a checkpoint resumes from it exactly (same batches, same RNG). The loop
runs on one process or on W ranks under torchrun alike (`mhmoe.train.session`): torchrun, expert parallelism,
FSDP2, exact resume, the non-finite guard, progress and metrics serve every task.

A run directory has one writer: `train` holds its lock (`mhmoe.io.lock_run`) from start to end, removes what an
interrupted writer left behind (temporary files and checkpoint folders, with a line saying so), and resumes
only when the run files still mean what the latest checkpoint was trained with (`check_run_files`). It refuses to
start over the record of a run whose checkpoints are gone (`check_fresh_start`). SIGINT and SIGTERM stop it after
the current step, saved, on every rank alike (`mhmoe.io.StopRequest`); it raises `Interrupted` with the line to print.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from mhmoe.errors import ConfigError, Interrupted, UserError
from mhmoe.io import StopRequest, environment, lock_run, notice, remove_temporaries, write_json
from mhmoe.models.cost import Cost
from mhmoe.train.checkpoint import (
    check_run_files,
    latest_checkpoint,
    load_model_weights,
    read_json,
    run_checkpoint,
    verify,
)
from mhmoe.train.config import TrainConfig
from mhmoe.train.metrics import MetricsLog, NoMetrics, last_logged_step, progress_bar
from mhmoe.train.session import Session, is_main_process, start_session


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss with on_nonfinite=stop)."""


class Part(NamedTuple):
    """One forward of a micro-batch: the model's keyword inputs (this rank's rows, on the device), a name for its
    logged loss, the input positions of the whole (global) batch it was cut from, and any other counts of that
    global batch the task's loss needs (e.g. its masked positions)."""

    name: str
    inputs: dict[str, Tensor]
    positions: int
    counts: dict[str, int] | None = None


class Task(Protocol):
    """What the loop trains. A task owns its data, its batches and its evaluation; the loop owns the rest."""

    cost: Cost  # of the model, for summary.json
    partial_forwards: bool  # whether one forward may use only part of the parameters (several parts per step)
    run_files: tuple[str, ...]  # files of the run folder the weights' meaning depends on besides config.json

    def build_model(self) -> nn.Module:
        """The model, on the CPU (the loop seeds torch first and moves it)."""
        ...

    def start(self) -> None:
        """Make the training samplers (of global batches: batch_size · world rows); called once, before resuming."""
        ...

    def parts(self, step: int, micro: int) -> Iterable[Part]:
        """The forwards of micro-batch `micro` of optimiser step `step`."""
        ...

    def loss(self, out: Any, part: Part) -> Tensor:
        """The task loss of a forward's output (the loop adds `out.aux_loss`)."""
        ...

    def evaluate(self, model: nn.Module, split: str, max_batches: int) -> dict:
        """A held-out report of `split` ("valid" or "test"); max_batches 0 = all of it."""
        ...

    def metrics(self, report: dict) -> dict:
        """The validation fields of metrics.jsonl for a report (val_loss and val_ppl at least)."""
        ...

    def summary(self, valid: dict, test: dict) -> dict:
        """The task's part of summary.json."""
        ...

    def state_dict(self) -> dict:
        """The data position, saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called at step 0 (before training) and after every optimiser step, on every rank."""
        ...

    def describe(self) -> list[str]:
        """Lines for the start-up summary: the data and its split sizes."""
        ...


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens_seen: int  # input positions trained on (tokens; patches + text tokens for the masked task)
    train_seconds: float
    valid: dict  # the task's final held-out reports
    test: dict
    cpu_seconds: float = 0.0  # process CPU time of the training steps (all threads): steadier than wall time


# ------------------------------------------------------------------------------------------------ pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return device


def autocast_for(precision: str, device: torch.device) -> Any:
    """bf16 autocast for train.precision bf16, or auto on CUDA; nothing (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(parameters: Iterable[nn.Parameter], t: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert stacks only (not norms, biases or temperatures)."""
    parameters = list(parameters)
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
    )


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr, then cosine or linear decay to lr · min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def all_finite(*values: Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)


def apply_step(
    optimizer: torch.optim.Optimizer, finite: bool, what: str, on_nonfinite: str, metrics: Any, step: int
) -> bool:
    """Step the optimizer; after a non-finite loss or gradient (`what` says which) stop with a TrainingError or
    skip the step (logged), as train.on_nonfinite says. Gradients are cleared either way; returns whether it stepped."""
    if finite:
        optimizer.step()
    elif on_nonfinite == "stop":
        raise TrainingError(f"{what}; the last checkpoint is intact. Lower train.lr or set train.on_nonfinite=skip")
    else:
        metrics.write({"step": step + 1, "skipped": what})
    optimizer.zero_grad(set_to_none=True)
    return finite


def check_resumable(cfg: Any, run_dir: Path) -> None:
    """A run directory is resumed only with the same model and data; train.* may change (e.g. max_steps). The data
    path may be spelled another way (relative or absolute, ~) if it names the same place."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = type(cfg).from_dict(read_json(saved_path, "the run's configuration")).to_dict()  # new fields: defaults
    now = cfg.to_dict()
    now["model"]["vocab_size"] = saved.get("model", {}).get("vocab_size")  # derived from the tokenizer
    for config in (saved, now):
        if config.get("data", {}).get("path"):
            config["data"]["path"] = os.path.abspath(os.path.expanduser(config["data"]["path"]))
    for section in ("model", "data"):
        if saved.get(section) != now[section]:
            diffs = [k for k in now[section] if saved.get(section, {}).get(k) != now[section][k]]
            raise ConfigError(
                f"{run_dir} holds a run with different {section} settings ({', '.join(diffs)}); "
                "pass another --out, or the same settings to resume"
            )


# ------------------------------------------------------------------------------------------------- train


def train(cfg: Any, run_dir: Path, make_task: Callable[[Session], Task], progress: bool = True) -> RunResult:
    """Train (or resume) the run in run_dir to cfg.train.max_steps, then evaluate on valid and test.

    cfg: a run configuration with `train` and `parallel` sections (`RunConfig` or a task's own); make_task builds
    the task once the session exists (it prepares the data, and may fill in derived fields such as the vocabulary
    size, before config.json is written).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder; pass a folder")
    main = is_main_process()  # rank 0 of a torchrun job checks and cleans for all (torchrun ends the others)
    if not main:  # rank 0's lock makes the folder, and removes it again if the start fails
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with lock_run(run_dir) if main else nullcontext():
            if main:
                clean_up(run_dir)
            check_resumable(cfg, run_dir)
            latest = latest_checkpoint(run_dir / "checkpoints") if main else None
            if latest is not None:  # the run files must still mean what the checkpoint was trained with
                check_run_files(run_dir, latest, verify(latest))
            elif main:
                check_fresh_start(run_dir)
            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            session = start_session(cfg.parallel, resolve_device(cfg.train.device))
            task = make_task(session)
            if session.is_main:
                write_json(run_dir / "config.json", cfg.to_dict())
                write_json(run_dir / "env.json", environment(session.device))
            return run(task, cfg.train, run_dir, session, progress and session.is_main)
    except KeyboardInterrupt as e:  # a stop outside the loop's safe points, or a second Ctrl-C: say what is saved
        if isinstance(e, Interrupted) and e.message:
            raise
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(signum, stopped_at_once(signum, run_dir) if main else "") from None


def check_fresh_start(run_dir: Path) -> None:
    """Refuse to start at step 0 over the record of an earlier run whose checkpoints are gone (deleted, or never
    written): its summary.json, or metrics of steps after its first scheduled checkpoint (which was written, then).
    Metrics up to that checkpoint are what a run killed before it leaves; they are recomputed, as on any resume."""
    config = run_dir / "config.json"
    saved = read_json(config, "the run's configuration") if config.is_file() else {}
    t = saved.get("train", {}) if isinstance(saved, dict) else {}
    try:
        first_checkpoint = min(int(t["checkpoint_every"]), int(t["max_steps"]))
    except (KeyError, TypeError, ValueError):
        first_checkpoint = 0  # no record of its schedule: any metrics count
    found = []
    summary = run_dir / "summary.json"
    if summary.exists():
        found.append(summary.name)
    last = last_logged_step(run_dir / "metrics.jsonl")
    if last > first_checkpoint:
        found.append(f"metrics.jsonl up to step {last}")
    if found:
        raise UserError(
            f"{run_dir} holds the record of an earlier run ({', '.join(found)}) but no checkpoint to resume from in "
            f"{run_dir / 'checkpoints'}; training would start at step 0 and replace it: pass another --out, or "
            "move those files away to start afresh in this folder"
        )


def stopped_at_once(signum: int, run_dir: Path) -> str:
    """The line for a run stopped by a signal wherever it was (start-up, evaluation, a second Ctrl-C): the last
    complete checkpoint, which is all a rerun needs."""
    how = f"stopped by {signal.Signals(signum).name}"
    try:
        latest = latest_checkpoint(run_dir / "checkpoints")
    except UserError:
        latest = None
    if latest is None:
        return f"{how} before its first checkpoint; run the same command to start again"
    return f"{how}; the last complete checkpoint is {latest}: run the same command to resume from it"


def clean_up(run_dir: Path) -> None:
    """Remove the temporary files and checkpoint folders an interrupted writer left in the run (under its lock,
    so none of them is being written), with a line saying what."""
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_temporaries(folder, "an interrupted run")


def run(task: Task, t: TrainConfig, run_dir: Path, session: Session, progress: bool) -> RunResult:
    """The loop: optimiser steps until t.max_steps, with logging, evaluation and checkpoints, then the final
    held-out evaluation. Every rank runs it; rank 0 alone writes files."""
    device = session.device
    torch.manual_seed(t.seed)
    model = task.build_model().to(device)
    forward: Callable[..., Any] = session.wrap(model, t.seed, task.partial_forwards)
    optimizer = make_optimizer(model.parameters(), t)
    task.start()
    step, tokens_seen, train_seconds, cpu_seconds = 0, 0, 0.0, 0.0
    checkpoints = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        state = session.load(latest, model, optimizer)
        task.load_state_dict(state)
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        cpu_seconds = state.get("cpu_seconds", 0.0)  # checkpoints before mhmoe 0.2 did not count it
    elif t.init_from:
        start_from_weights(model, Path(t.init_from), session.is_main)
    if session.is_main:
        announce(run_dir, task, t, session, step, tokens_seen)
    forward = torch.compile(forward) if t.compile else forward
    metrics = MetricsLog(run_dir, step) if session.is_main else NoMetrics()
    bar = progress_bar(t.max_steps, step, progress)
    autocast = autocast_for(t.precision, device)
    shown: dict[str, str] = {}  # the latest periodic validation, labelled (`periodic_label`)

    def save() -> None:
        state = {**task.state_dict(), "tokens_seen": tokens_seen, "train_seconds": train_seconds,
                 "cpu_seconds": cpu_seconds}  # fmt: skip
        run_files = ("config.json", *task.run_files)
        session.save(checkpoints, step, model, optimizer, state, t.keep_checkpoints, run_files)

    stop = StopRequest("finishing the current step and saving it", announce=session.is_main)
    with stop, closing(bar), closing(metrics):
        model.train()
        if step == 0:
            task.on_step(model, 0)
        while step < t.max_steps:
            started, cpu_started = time.perf_counter(), time.process_time()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses: dict[str, float] = {}
            aux_sum, positions, finite = 0.0, 0, True
            for micro in range(t.grad_accum):
                for part in task.parts(step, micro):
                    positions += part.positions
                    with autocast:
                        out = forward(**part.inputs)
                    task_loss = task.loss(out, part)
                    loss = (task_loss + out.aux_loss) / t.grad_accum
                    finite = finite and all_finite(loss)
                    loss.backward()
                    losses[part.name] = losses.get(part.name, 0.0) + task_loss.item() / t.grad_accum
                    aux_sum += out.aux_loss.item() / t.grad_accum
            grad_norm = session.finish_gradients(model, t.grad_clip)  # global norm, clipped
            *means, aux_sum, nonfinite = session.mean([*losses.values(), aux_sum, float(not finite)])
            losses = dict(zip(losses, means))
            finite = nonfinite == 0 and all_finite(grad_norm)  # the same verdict on every rank
            what = "" if finite else _nonfinite(step, sum(losses.values()), grad_norm)
            if apply_step(optimizer, finite, what, t.on_nonfinite, metrics, step):
                session.update_router_biases(model)
            step += 1
            tokens_seen += positions
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            cpu_seconds += time.process_time() - cpu_started
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                record = {"step": step, "tokens": tokens_seen, "loss": sum(losses.values()), "aux_loss": aux_sum,
                          "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": positions / elapsed}  # fmt: skip
                if len(losses) > 1:
                    record.update({f"loss_{name}": value for name, value in losses.items()})
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", **shown)
            if step % t.eval_every == 0 or step == t.max_steps:
                report = task.evaluate(model, "valid", t.eval_batches)
                val = task.metrics(report)
                metrics.write({"step": step, "tokens": tokens_seen, **val})
                shown = {"val_ppl": periodic_label(val["val_ppl"], step, report)}
                bar.set_postfix(loss=f"{sum(losses.values()):.3f}", **shown)
            task.on_step(model, step)
            scheduled = step % t.checkpoint_every == 0 or step == t.max_steps
            if scheduled:
                save()
            if session.mean([float(stop.signum is not None)])[0] > 0:  # every rank stops after the same step
                if not scheduled:
                    save()
                signum = stop.signum or signal.SIGTERM  # (a rank that got no signal stops with the others)
                session.close()
                raise Interrupted(signum, stopped_after(signum, step, checkpoints) if session.is_main else "")

    valid = task.evaluate(model, "valid", t.final_eval_batches)
    test = task.evaluate(model, "test", t.final_eval_batches)
    cost = task.cost
    summary = {"step": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
               "train_cpu_seconds": cpu_seconds, **task.summary(valid, test),
               "params_total": cost.params_total, "params_active": cost.params_active,
               "flops_per_token": cost.flops_per_token}  # fmt: skip
    if session.is_main:
        write_json(run_dir / "summary.json", summary)
    session.close()
    return RunResult(run_dir, step, tokens_seen, train_seconds, valid, test, cpu_seconds)


def stopped_after(signum: int, step: int, checkpoints: Path) -> str:
    return (
        f"stopped by {signal.Signals(signum).name} after step {step}, saved in {checkpoints / f'step-{step:08d}'}: "
        "run the same command to resume"
    )


def start_from_weights(model: nn.Module, source: Path, say: bool) -> None:
    """train.init_from: a new run's model starts from the latest weights of the run in `source` (fine-tuning);
    the optimiser, the step count and the data position start afresh. Weights that do not fit the model (another
    model.*) are a CheckpointError naming the checkpoint."""
    with run_checkpoint(source) as (_, checkpoint):
        load_model_weights(checkpoint, model)
    if say:
        notice(f"starting from the weights of {checkpoint} (train.init_from)")


def periodic_label(ppl: float, step: int, report: dict) -> str:
    """The progress bar's validation figure with what it covers: "62.4 (step 10, first 768 tokens)"; the same
    number as `mhmoe eval RUN --max-batches train.eval_batches` at that step."""
    covered = f", first {report['tokens']:,} tokens" if "tokens" in report else ""
    return f"{ppl:.1f} (step {step}{covered})"


def evaluation_plan(t: TrainConfig) -> str:
    """The start-up line saying what each validation figure covers."""
    periodic = f"the first {t.eval_batches} batches" if t.eval_batches else "all"
    final = f"the first {t.final_eval_batches} batches" if t.final_eval_batches else "all"
    return (f"validation every {t.eval_every} steps on {periodic} of the valid split (progress bar, metrics.jsonl); "
            f"at the end on {final} of valid and test (summary.json)")  # fmt: skip


def announce(run_dir: Path, task: Task, t: TrainConfig, session: Session, step: int, tokens_seen: int) -> None:
    """The start-up summary on stderr: where the run is, what it trains, on what data, and from which step."""
    cost = task.cost
    threads = f", {torch.get_num_threads()} threads" if session.device.type == "cpu" else ""
    lines = [
        f"run folder {run_dir} (config.json, metrics.jsonl, checkpoints/, summary.json at the end)",
        f"model: {cost.params_total:,} parameters ({cost.params_active:,} active per token), "
        f"{cost.flops_per_token / 1e6:.2f} MFLOPs/token; device {session.device}{threads}, {session.world} process(es)",
        *task.describe(),
        evaluation_plan(t),
    ]
    if step >= t.max_steps:
        lines.append(f"already trained to step {step} (train.max_steps={t.max_steps}): evaluating only")
    elif step:
        lines.append(f"resuming from step {step} of {t.max_steps} ({tokens_seen:,} tokens seen)")
    else:
        lines.append(f"training {t.max_steps} steps of {t.batch_size * t.grad_accum * session.world} sequences")
    for line in lines:
        notice(line)


def _nonfinite(step: int, loss: float, grad_norm: Tensor) -> str:
    return f"non-finite loss or gradient at step {step} (loss {loss:.4g}, grad norm {float(grad_norm):.4g})"
