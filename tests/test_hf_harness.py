"""lm-evaluation-harness scores an exported model through its own `hf` model type on mhmoe's local tasks
(`mhmoe.hf.harness`): the rolling perplexity equals mhmoe's own evaluation of the same text (module doc of
`mhmoe.hf.harness`: the same windows but the last), the cloze task's log-likelihoods equal the model's, and
`mhmoe eval RUN --lm-eval TASKS` prints both."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from conftest import english_documents  # noqa: E402

from mhmoe.cli import main  # noqa: E402
from mhmoe.errors import UserError  # noqa: E402
from mhmoe.hf.harness import (  # noqa: E402
    CLOZE_CHOICES,
    TASKS,
    check_tasks,
    cloze_items,
    harness_evaluate,
    same_text_perplexity,
    udhr_en_text,
)
from mhmoe.hf.runs import _read_run, export_run  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny GEMMs: one thread (two threads on a loaded 2-core machine wait on each other for most of the time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step run with a BPE tokenizer and seq_len 32 (so the text ends in a partial window)."""
    from mhmoe.train.config import apply_overrides, preset
    from mhmoe.train.lm import train

    tmp = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MHMOE_CACHE", str(tmp / "cache"))
        (tmp / "corpus").mkdir()
        english_documents(tmp / "corpus", documents=4)
        cfg = preset("cpu-tiny")
        cfg.data.path = str(tmp / "corpus")
        apply_overrides(cfg, ["train.max_steps=2", "train.eval_batches=1", "train.final_eval_batches=1",
                              "model.seq_len=32", "data.tokenizer=bpe", "data.vocab_size=300"])  # fmt: skip
        train(cfg, tmp / "run", progress=False)
    return tmp / "run"


def test_cloze_items_are_the_texts_paragraphs_with_their_last_word_among_distractors():
    text = udhr_en_text()
    items = cloze_items(text)
    assert len(items) >= 40 and items == cloze_items(text)  # deterministic
    lines = set(text.splitlines())
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(item["choices"]) == len(set(item["choices"])) == CLOZE_CHOICES
        assert any(line.startswith(f"{item['context']} {answer}") for line in lines)
    labels = [item["label"] for item in items]
    assert len(set(labels)) == CLOZE_CHOICES  # the answer is not always in one place


def loglikelihood(model, context: list[int], continuation: list[int], max_length: int) -> float:
    """log p(continuation | context) with the harness's left truncation to max_length + 1 tokens."""
    tokens = (context + continuation)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0, -len(continuation) :].double()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(continuation).unsqueeze(-1)).sum())


def test_harness_scores_the_exported_model_as_mhmoe_does(tiny_run, tmp_path):
    folder = export_run(tiny_run, tmp_path / "hf")
    results = harness_evaluate(folder, list(TASKS), log_samples=True)
    cfg, model, tokenizer, _ = _read_run(tiny_run)

    # perplexity: the harness's equals mhmoe's evaluation with the last window scored as the harness does; mhmoe's
    # own number differs by that last window only
    harness_bpb = results["results"]["mhmoe_udhr_en"]["bits_per_byte,none"]
    ours = same_text_perplexity(tiny_run)
    assert ours["last_window_targets"] == (len(tokenizer.encode(udhr_en_text())) + 1 - 1) % 32 > 0
    assert math.isclose(harness_bpb, ours["as_harness"]["bits_per_byte"], rel_tol=1e-6)
    assert not math.isclose(harness_bpb, ours["bits_per_byte"], rel_tol=1e-7)
    assert math.isclose(ours["ppl"], math.exp(ours["loss"])) and ours["tokens"] == len(tokenizer.encode(udhr_en_text()))

    # cloze: every choice's log-likelihood is the model's, and acc follows from them
    samples = results["samples"]["mhmoe_udhr_en_cloze"]
    assert len(samples) == len(cloze_items(udhr_en_text()))
    correct = 0
    for sample in samples[:8]:
        doc = sample["doc"]
        context = tokenizer.encode(doc["context"])
        scores = [r[0][0] for r in sample["resps"]]
        for choice, score in zip(doc["choices"], scores):
            continuation = tokenizer.encode(doc["context"] + " " + choice)[len(context) :]
            assert math.isclose(score, loglikelihood(model, context, continuation, 32), rel_tol=1e-5, abs_tol=1e-5)
    for sample in samples:
        scores = [r[0][0] for r in sample["resps"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["label"]
    assert results["results"]["mhmoe_udhr_en_cloze"]["acc,none"] == pytest.approx(correct / len(samples))


@pytest.mark.slow
def test_eval_lm_eval_prints_the_harness_beside_mhmoe(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--lm-eval", "mhmoe_udhr_en"]) == 0
    out = capsys.readouterr().out
    assert "lm-eval mhmoe_udhr_en: " in out and "bits_per_byte" in out
    assert "mhmoe eval, same text:" in out and "as the harness scores them" in out


def test_unknown_tasks_and_inapplicable_flags_are_refused(tmp_path, capsys):
    with pytest.raises(UserError, match="mhmoe ships mhmoe_udhr_en, mhmoe_udhr_en_cloze"):
        check_tasks(["hellaswag"])
    assert main(["eval", str(tmp_path), "--lm-eval", "hellaswag"]) == 2
    assert "unknown lm-eval task(s) ['hellaswag']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--max-batches does not apply to --lm-eval"):
        main(["eval", str(tmp_path), "--lm-eval", "mhmoe_udhr_en", "--max-batches", "3"])
