"""Language-model training: one flat loop, plus the small pieces it calls.

A run directory holds everything needed to understand and resume a run:
    config.json   the resolved RunConfig        env.json      versions, device, git commit, command
    tokenizer.json (BPE runs)                   metrics.jsonl / metrics.csv, tb/ (TensorBoard, if installed)
    checkpoints/  see checkpoint.py              summary.json  final validation and test perplexity
Calling `train` on a directory with a checkpoint resumes from it exactly (same batches, same RNG).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from mhmoe.errors import ConfigError, UserError
from mhmoe.layers.routers import SigmoidRouter
from mhmoe.models.gpt import GPT, gpt_cost
from mhmoe.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomically
from mhmoe.train.config import RunConfig

CSV_COLUMNS = ["step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"]


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss with on_nonfinite=stop)."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens_seen: int
    train_seconds: float
    val_loss: float
    val_ppl: float
    test_loss: float
    test_ppl: float


# ------------------------------------------------------------------------------------------------ set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return device


def autocast_for(cfg: RunConfig, device: torch.device) -> Any:
    precision = cfg.train.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def data_path(cfg: RunConfig) -> Path:
    """--data / data.path, else $MHMOE_DATA, else the built-in Shakespeare corpus (fetched once)."""
    from mhmoe.data import data_cache_dir, default_corpus

    given = cfg.data.path or os.environ.get("MHMOE_DATA", "")
    return Path(given).expanduser() if given else default_corpus(data_cache_dir())


def prepare_data(cfg: RunConfig, run_dir: Path, progress: bool) -> tuple[Any, dict[str, np.ndarray]]:
    """The run's tokenizer (trained once and kept in the run) and the tokenized splits (cached).

    Multilingual runs (data.multilingual) also hold "train:<lang>", "valid:<lang>", ... per language.
    """
    from mhmoe.data import data_cache_dir, load_corpus, tokenize_corpus

    d = cfg.data
    if d.multilingual:
        from mhmoe.data.multilingual import load_multilingual, tokenize_languages, tokenizer_text

        languages = [lang.strip() for lang in d.languages.split(",") if lang.strip()]
        corpus = load_multilingual(
            data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction, languages=languages
        )
        tokenizer = run_tokenizer(cfg, run_dir, lambda: tokenizer_text(corpus, d.language_alpha))
        return tokenizer, tokenize_languages(corpus, tokenizer, data_cache_dir(), cfg.model.seq_len, progress)
    corpus = load_corpus(data_path(cfg), valid_fraction=d.valid_fraction, test_fraction=d.test_fraction)
    tokenizer = run_tokenizer(cfg, run_dir, lambda: corpus.train)
    return tokenizer, tokenize_corpus(corpus, tokenizer, data_cache_dir(), progress=progress)


def run_tokenizer(cfg: RunConfig, run_dir: Path, bpe_text: Callable[[], Iterable[str]]) -> Any:
    """The run's saved tokenizer, else a BPE trained on `bpe_text()` (data.tokenizer=bpe) or the one named."""
    from mhmoe.data import BPETokenizer, load_tokenizer

    saved = run_dir / "tokenizer.json"
    if saved.exists():
        return load_tokenizer(saved)
    if cfg.data.tokenizer == "bpe":
        tokenizer = BPETokenizer.train(bpe_text(), cfg.data.vocab_size)
        tokenizer.save(saved)
        return tokenizer
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.data.tokenizer != "byte":
        tokenizer.save(saved)
    return tokenizer


def make_sampler(cfg: RunConfig, splits: dict[str, np.ndarray]) -> Any:
    """Training batches: uniform over the train split's windows, or per language with temperature (multilingual)."""
    from mhmoe.data import BatchSampler

    t = cfg.train
    if cfg.data.multilingual:
        from mhmoe.data.multilingual import LanguageSampler, languages_of, split_key

        tokens = {lang: splits[split_key("train", lang)] for lang in languages_of(splits)}
        return LanguageSampler(tokens, t.batch_size, cfg.model.seq_len, seed=t.seed, alpha=cfg.data.language_alpha)
    return BatchSampler(splits["train"], t.batch_size, cfg.model.seq_len, seed=t.seed)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    from mhmoe import __version__

    return {
        "mhmoe": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "command": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    """A run directory is resumed only with the same model and data; train.* may change (e.g. max_steps)."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = RunConfig.from_dict(json.loads(saved_path.read_text())).to_dict()  # fields added since: defaults
    now = cfg.to_dict()
    now["model"]["vocab_size"] = saved.get("model", {}).get("vocab_size")  # derived from the tokenizer
    for section in ("model", "data"):
        if saved.get(section) != now[section]:
            diffs = [k for k in now[section] if saved.get(section, {}).get(k) != now[section][k]]
            raise ConfigError(
                f"{run_dir} holds a run with different {section} settings ({', '.join(diffs)}); "
                "pass another --out, or the same settings to resume"
            )


# ---------------------------------------------------------------------------------------------- pieces


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert stacks only (not norms, biases or temperatures)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
    )


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr, then cosine or linear decay to lr · min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


@torch.no_grad()
def evaluate(
    model: GPT, tokens: np.ndarray, cfg: RunConfig, device: torch.device, max_batches: int = 0
) -> dict[str, float]:
    """Mean cross-entropy (nats/token) and perplexity over consecutive windows of a held-out split."""
    from mhmoe.data import eval_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = eval_batches(tokens, cfg.train.batch_size, cfg.model.seq_len, max_batches=max_batches or None)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_for(cfg, device):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total, count = total + loss.item(), count + y.numel()
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


class MetricsLog:
    """metrics.jsonl (every record), metrics.csv (fixed columns), TensorBoard when installed."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self._truncate_after(resume_step)
        new_csv = not self.csv.exists()
        self._csv_file = open(self.csv, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._jsonl_file = open(self.jsonl, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a crashed run wrote after its last checkpoint."""
        for path in (self.jsonl, self.csv):
            if not path.exists():
                continue
            lines = path.read_text().splitlines(keepends=True)
            if path.suffix == ".jsonl":
                kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            else:
                kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
            write_text_atomically(path, "".join(kept))

    def write(self, record: dict) -> None:
        self._jsonl_file.write(json.dumps(record) + "\n")
        self._jsonl_file.flush()
        self._csv.writerow(record)
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl_file.close()
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


def update_router_biases(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, SigmoidRouter):
            module.update_bias()


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


def all_finite(*values: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values)


class SingleProcess:
    """The one-process side of what `mhmoe.parallel.session.DistributedRun` does on W ranks (same methods)."""

    rank, world, is_main = 0, 1, True

    def __init__(self, device: torch.device):
        self.device = device

    def first_on_main(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def wrap(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        return model

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def finish_gradients(self, model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))

    def mean(self, values: list[float]) -> list[float]:
        return values

    def update_router_biases(self, model: torch.nn.Module) -> None:
        update_router_biases(model)

    def save(self, directory: Path, step: int, model: torch.nn.Module, optimizer: Any, state: dict, keep: int) -> None:
        save_checkpoint(directory, step, model, optimizer, state, keep=keep)

    def load(self, path: Path, model: torch.nn.Module, optimizer: Any) -> dict:
        return load_checkpoint(path, model, optimizer)

    def close(self) -> None:
        pass


def start_session(cfg: RunConfig, device: torch.device) -> Any:
    """DistributedRun under torchrun (or inside an existing process group), else SingleProcess."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group or "WORLD_SIZE" in os.environ:
        from mhmoe.parallel.session import DistributedRun

        return DistributedRun(cfg, device)
    if cfg.parallel.expert > 1:
        raise ConfigError(
            f"parallel.expert={cfg.parallel.expert} needs {cfg.parallel.expert} or more processes: "
            f"torchrun --nproc-per-node {cfg.parallel.expert} -m mhmoe train ..."
        )
    return SingleProcess(device)


class _NoMetrics:
    """Ranks other than 0 log nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------- train


def train(cfg: RunConfig, run_dir: Path, progress: bool = True) -> RunResult:
    """Train (or resume) the run in run_dir to cfg.train.max_steps, then evaluate on valid and test."""
    t = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, run_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    session = start_session(cfg, resolve_device(t.device))
    device, progress = session.device, progress and session.is_main
    tokenizer, splits = session.first_on_main(lambda: prepare_data(cfg, run_dir, progress))
    cfg.model.vocab_size = tokenizer.vocab_size
    if session.is_main:
        write_text_atomically(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
        write_text_atomically(run_dir / "env.json", json.dumps(environment(device), indent=1) + "\n")

    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    forward = session.wrap(model, t.seed)
    optimizer = make_optimizer(model, cfg)
    # one sampler of global batches (batch_size rows per rank), each rank keeps its slice: see session.shard
    sampler = make_sampler(replace(cfg, train=replace(t, batch_size=t.batch_size * session.world)), splits)
    step, tokens_seen, train_seconds = 0, 0, 0.0
    checkpoints = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        state = session.load(latest, model, optimizer)
        sampler.load_state_dict(state["sampler"])
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
    forward = torch.compile(forward) if t.compile else forward
    metrics = MetricsLog(run_dir, step) if session.is_main else _NoMetrics()
    cost = gpt_cost(cfg.model)
    bar = progress_bar(t.max_steps, step, progress)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len * session.world

    def save() -> None:
        state = {"sampler": sampler.state_dict(), "tokens_seen": tokens_seen, "train_seconds": train_seconds}
        session.save(checkpoints, step, model, optimizer, state, keep=t.keep_checkpoints)

    try:
        model.train()
        while step < t.max_steps:
            started = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = aux_sum = 0.0
            finite = True
            for _ in range(t.grad_accum):
                x, y = (session.shard(v).to(device, non_blocking=True) for v in sampler.next_batch())
                with autocast_for(cfg, device):
                    out = forward(x, y)
                loss = (out.loss + out.aux_loss) / t.grad_accum
                finite = finite and all_finite(loss)
                loss.backward()
                loss_sum += out.loss.item() / t.grad_accum
                aux_sum += out.aux_loss.item() / t.grad_accum
            grad_norm = session.finish_gradients(model, t.grad_clip)  # global norm, clipped
            loss_sum, aux_sum, nonfinite = session.mean([loss_sum, aux_sum, float(not finite)])
            finite = nonfinite == 0 and all_finite(grad_norm)  # the same verdict on every rank
            what = (
                ""
                if finite
                else f"non-finite loss or gradient at step {step} (loss {loss_sum:.4g}, grad norm {float(grad_norm):.4g})"
            )
            if apply_step(optimizer, finite, what, t.on_nonfinite, metrics, step):
                session.update_router_biases(model)
            step += 1
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                record = {
                    "step": step,
                    "tokens": tokens_seen,
                    "loss": loss_sum,
                    "aux_loss": aux_sum,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_per_step / elapsed,
                }
                metrics.write(record)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % t.eval_every == 0 or step == t.max_steps:
                val = evaluate(model, splits["valid"], cfg, device, max_batches=t.eval_batches)
                metrics.write({"step": step, "tokens": tokens_seen, "val_loss": val["loss"], "val_ppl": val["ppl"]})
                bar.set_postfix(loss=f"{loss_sum:.3f}", val_ppl=f"{val['ppl']:.1f}")
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                save()
    finally:
        bar.close()
        metrics.close()

    val = evaluate(model, splits["valid"], cfg, device, max_batches=t.final_eval_batches)
    test = evaluate(model, splits["test"], cfg, device, max_batches=t.final_eval_batches)
    result = RunResult(run_dir, step, tokens_seen, train_seconds, val["loss"], val["ppl"], test["loss"], test["ppl"])
    summary = {
        **{k: v for k, v in vars(result).items() if k != "run_dir"},
        "params_total": cost.params_total,
        "params_active": cost.params_active,
        "flops_per_token": cost.flops_per_token,
        "val_tokens": val["tokens"],
        "test_tokens": test["tokens"],
    }
    if session.is_main:
        write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    session.close()
    return result
