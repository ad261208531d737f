"""Scoring exported models with lm-evaluation-harness (extra `eval`), on tasks shipped inside the package.

The tasks are YAML files in `lm_eval_tasks/` (`TASKS_DIR`, the harness's `--include_path`); their datasets are
built here from `mhmoe/data/texts/udhr-en.txt` (the Universal Declaration of Human Rights in English, held out:
not in the English data pack mhmoe's models train on), so nothing is fetched at run time:

    mhmoe_udhr_en        rolling-window perplexity on the whole text as one document (word / byte perplexity,
                         bits per byte: the harness's metrics for text, tokenizer-independent)
    mhmoe_udhr_en_cloze  each paragraph (at least 8 words) without its last word; four endings: that word and
                         the last words of three other paragraphs, chosen by a seeded generator (acc, acc_norm)

The harness loads the exported folder through its own `hf` model type (`pretrained=DIR,trust_remote_code=True`).
`mhmoe eval RUN --lm-eval TASKS` exports the run to a temporary folder, runs the harness on it and sets the
perplexity task beside mhmoe's own held-out evaluation (`mhmoe.train.lm.evaluate`) of the same text.

Why the two agree (`same_text_perplexity`): the harness's rolling windows (`get_rolling_token_windows`, context 1)
feed [EOS, t0 … t(L-2)] predicting t0 … t(L-1), then t(L-1) … t(2L-2) predicting tL … t(2L-1), and so on, with
L = max_position_embeddings = the run's seq_len and EOS its prefix token (the exported tokenizer has no BOS).
mhmoe's evaluation of a token stream predicts tokens 1 … N-1 in consecutive windows of L, so on the stream
[EOS] + tokens(text) it uses the same windows and targets, but for the last r = (N - 1) mod L targets: mhmoe
scores them in a short window of their own, the harness in a window of L inputs reaching back into the previous
one (more context, a lower loss). `same_text_perplexity` reports both mhmoe's number and, under "as_harness", the
same with those r targets scored as the harness scores them; that one equals the harness's to float32 rounding
(1e-6 relative required by the test, 3e-10 seen), and the difference between the two is that last window only.
"""

from __future__ import annotations

import math
import random
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.errors import UserError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ("mhmoe_udhr_en", "mhmoe_udhr_en_cloze")
PERPLEXITY_TASK = "mhmoe_udhr_en"
UDHR_EN = Path(__file__).resolve().parents[1] / "data" / "texts" / "udhr-en.txt"
CLOZE_CHOICES, CLOZE_MIN_WORDS, CLOZE_SEED = 4, 8, 0


@cache
def udhr_en_text() -> str:
    return UDHR_EN.read_text(encoding="utf-8")


def _dataset(rows: list[dict]) -> Any:
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def udhr_en_document(**_: Any) -> Any:
    """The perplexity task's data: {"test": one row {"text": the whole text}}."""
    return _dataset([{"text": udhr_en_text()}])


def perplexity_results(doc: dict, results: tuple[float]) -> dict[str, tuple[float, int]]:
    """The harness's text metrics for one document: (log-likelihood, words / bytes), aggregated as perplexities."""
    (loglikelihood,) = results
    words, nbytes = len(doc["text"].split()), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}  # fmt: skip


def cloze_items(text: str) -> list[dict]:
    """One multiple-choice item per paragraph of at least CLOZE_MIN_WORDS words: context (all but the last word),
    choices (the last word, without its final punctuation, among CLOZE_CHOICES - 1 other paragraphs' last words,
    all distinct), label (the index of the true one). Deterministic in the text."""
    paragraphs = [line.split() for line in text.splitlines() if len(line.split()) >= CLOZE_MIN_WORDS]
    endings = [words[-1].rstrip(".,;:") for words in paragraphs]
    rng = random.Random(CLOZE_SEED)
    items = []
    for words, ending in zip(paragraphs, endings):
        others = sorted({e for e in endings if e != ending})
        choices = [ending, *rng.sample(others, CLOZE_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:-1]), "choices": choices, "label": choices.index(ending)})
    return items


def udhr_en_cloze(**_: Any) -> Any:
    """The cloze task's data: {"test": `cloze_items` of the text}."""
    return _dataset(cloze_items(udhr_en_text()))


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown lm-eval task(s) {unknown or tasks}; mhmoe ships {', '.join(TASKS)}")
    return tasks


def harness_evaluate(model_dir: Path, tasks: list[str], batch_size: int = 8, log_samples: bool = False) -> dict:
    """lm-evaluation-harness's `simple_evaluate` on an exported folder (`hf` model type, the folder's own code),
    with mhmoe's task files only; on the CPU, in the folder's dtype. Returns the harness's results dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed: pip install 'mhmoe[eval]'") from None
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    model_args = {"pretrained": str(model_dir), "trust_remote_code": True}
    return lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=check_tasks(tasks), task_manager=manager, batch_size=batch_size,
        device="cpu", log_samples=log_samples, bootstrap_iters=0,
    )  # fmt: skip


def _text_metrics(nats: float, text: str) -> dict[str, float]:
    nbytes = len(text.encode("utf-8"))
    return {"bits_per_byte": nats / nbytes / math.log(2), "byte_perplexity": math.exp(nats / nbytes),
            "word_perplexity": math.exp(nats / len(text.split()))}  # fmt: skip


@torch.no_grad()
def _tail_nats(model: torch.nn.Module, stream: torch.Tensor, targets: int, context: int) -> float:
    """Summed cross-entropy of the stream's last `targets` tokens, each seeing the `context` tokens before the
    last target's (a window of `context` inputs ending just before the stream's end)."""
    x, y = stream[-context - 1 : -1].unsqueeze(0), stream[-targets:]
    logits = model(x).logits[0, -targets:].float()
    return float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))


def same_text_perplexity(run_dir: Path) -> dict[str, Any]:
    """mhmoe's own held-out evaluation (`mhmoe.train.lm.evaluate`, as `mhmoe eval`) of the perplexity task's text,
    on the stream [EOS] + tokens(text) (module doc): loss (nats/token), ppl (per token), tokens, and the harness's
    three text metrics. "as_harness": the same with the last r = (N - 1) mod L targets scored in a window of L
    inputs, as the harness's rolling windows score them (mhmoe's last window holds those r targets alone)."""
    from mhmoe.hf.runs import _read_run
    from mhmoe.train.lm import evaluate

    cfg, model, tokenizer, _ = _read_run(run_dir)
    model.eval()
    text = udhr_en_text()
    stream = np.array([tokenizer.eos_id, *tokenizer.encode(text)], dtype=np.int64)
    r = evaluate(model, stream, cfg, torch.device("cpu"))
    nats, L = r["loss"] * r["tokens"], cfg.model.seq_len
    tail = (len(stream) - 1) % L
    as_harness = nats
    if tail and len(stream) > L:
        tokens = torch.from_numpy(stream)
        as_harness = nats - _tail_nats(model, tokens, tail, tail) + _tail_nats(model, tokens, tail, L)
    return {
        **r,
        **_text_metrics(nats, text),
        "last_window_targets": tail,
        "as_harness": _text_metrics(as_harness, text),
    }


def eval_run_with_harness(run_dir: Path, tasks: list[str], batch_size: int = 8) -> dict:
    """`mhmoe eval RUN --lm-eval TASKS`: export the run to a temporary folder, score it with the harness;
    {"harness": {task: {metric: value}}, "mhmoe": same_text_perplexity when the perplexity task is asked for}."""
    from mhmoe.hf.runs import export_run

    check_tasks(tasks)
    with tempfile.TemporaryDirectory(prefix="mhmoe-lm-eval-") as tmp:
        folder = export_run(run_dir, Path(tmp) / "hf")
        results = harness_evaluate(folder, tasks, batch_size)
    harness = {task: {k.split(",")[0]: v for k, v in metrics.items() if k != "alias" and "stderr" not in k}
               for task, metrics in results["results"].items()}  # fmt: skip
    report: dict[str, Any] = {"harness": harness}
    if PERPLEXITY_TASK in tasks:
        report["mhmoe"] = same_text_perplexity(run_dir)
    return report
