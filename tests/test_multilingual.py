"""Multilingual pipeline: language-tagged layouts, temperature sampling (tokenizer text and batches), exact resume,
bits per byte, per-language evaluation, the word-divergence analysis on hand-made inputs, and a toy
`mhmoe reproduce multilingual` end to end."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TOY_MODEL, data_pack, pack_sample
from hypothesis import given, settings
from hypothesis import strategies as st

from mhmoe.analysis import LayerRouting, language_expert_information
from mhmoe.analysis.runs import evaluate_languages
from mhmoe.cli import main
from mhmoe.data import BPETokenizer, ByteTokenizer
from mhmoe.data.multilingual import (
    LanguageSampler,
    bits_per_byte,
    interleave,
    language_probabilities,
    load_multilingual,
    target_bytes,
    token_byte_lengths,
    tokenizer_text,
)
from mhmoe.errors import DataError
from mhmoe.experiments.multilingual.experiment import AnalysisBudget
from mhmoe.experiments.multilingual.wordlists import CONTROL_WORDS, FALSE_COGNATES
from mhmoe.experiments.multilingual.words import (
    divergence_windows,
    token_offsets,
    tokens_in_spans,
    word_divergence,
    word_spans,
)
from mhmoe.models.gpt import GPT
from mhmoe.train.config import apply_overrides, preset
from mhmoe.train.lm import train

MULTILINGUAL = pack_sample("multilingual")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine; restore the setting afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pack_text(lang: str, split: str = "valid") -> str:
    return gzip.open(MULTILINGUAL / f"{lang}.{split}.txt.gz", "rt", encoding="utf-8").read()


def paragraphs(tag: str, n: int, words: int = 30) -> str:
    return "\n\n".join(f"{tag}{i} " + " ".join(f"{tag}w{(i * 7 + j) % 53}" for j in range(words)) for i in range(n))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        path.write_text(text, encoding="utf-8")


@pytest.fixture
def toy_languages(tmp_path) -> Path:
    """Three languages of real text from the offline pack, in the pack's <lang>.<split>.txt layout."""
    folder = tmp_path / "toy"
    for lang, n in (("en", 24_000), ("de", 16_000), ("es", 6_000)):
        text = pack_text(lang)
        write(folder / f"{lang}.train.txt", text[:n])
        write(folder / f"{lang}.valid.txt", text[n : n + 3_000])
        write(folder / f"{lang}.test.txt", text[n + 3_000 : n + 6_000])
    return folder


# --------------------------------------------------------------------------------------------------- layouts


def test_split_files_layout_finds_languages_and_lists_other_files(tmp_path):
    folder = tmp_path / "pack"
    write(folder / "de.train.txt.gz", paragraphs("de", 2000))  # ~6 chunks of 64 kB
    write(folder / "de.valid.txt", "Das ist die Validierung.")
    write(folder / "pt-BR.train.txt", paragraphs("pt", 40))
    write(folder / "pt-BR.valid.txt", "Isto é a validação.")
    write(folder / "pt-BR.test.txt", "Isto é o teste.")
    write(folder / "udhr.jsonl.gz", '{"text": "x", "lang": "en"}\n')
    write(folder / "languages.json", "{}")
    corpus = load_multilingual(folder)
    assert list(corpus.languages) == ["de", "pt-BR"]
    assert corpus.ignored == ["languages.json", "udhr.jsonl.gz"]
    assert corpus.languages["pt-BR"].valid == ["Isto é a validação."] and corpus.languages["pt-BR"].test == [
        "Isto é o teste."
    ]
    de = corpus.languages["de"]
    assert de.valid == ["Das ist die Validierung."]
    assert de.test and not set(de.test) & set(de.train)  # no test file: test chunks held out of train
    assert load_multilingual(folder, languages=["de"]).languages.keys() == {"de"}
    with pytest.raises(DataError, match=r"\['fr'\] not found"):
        load_multilingual(folder, languages=["de", "fr"])


def test_per_language_files_folders_and_jsonl_tags(tmp_path):
    folder = tmp_path / "mine"
    write(folder / "fr.txt", paragraphs("fr", 1500))  # ~5 chunks
    for i in range(6):
        write(folder / "it" / f"doc{i}.txt", paragraphs(f"it{i}", 3))
    records = [{"text": f"português {i}", "lang": "pt"} for i in range(30)]
    records += [{"text": "teste fixo", "lang": "pt", "split": "test"}, {"text": f"español {i}", "lang": "es"}]
    records += [{"text": f"español más {i}", "lang": "es"} for i in range(5)]
    write(folder / "mixed.jsonl", "\n".join(json.dumps(r) for r in records))
    write(folder / "README.md", "not text")
    corpus = load_multilingual(folder)
    assert list(corpus.languages) == ["es", "fr", "it", "pt"] and corpus.ignored == ["README.md"]
    assert "teste fixo" in corpus.languages["pt"].test and "teste fixo" not in corpus.languages["pt"].train
    for lang, c in corpus.languages.items():
        assert c.train and c.valid and c.test, lang
    assert all(doc.startswith("it") for doc in corpus.languages["it"].train)


def test_a_jsonl_file_is_grouped_by_its_lang_field(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    lines = [json.dumps({"text": f"{lang} document {i}", "lang": lang, "split": split}) for lang in ("en", "zh")
             for i, split in enumerate(("train", "train", "valid", "test"))]  # fmt: skip
    write(path, "\n".join(lines))
    corpus = load_multilingual(path)
    assert corpus.languages["zh"].train == ["zh document 0", "zh document 1"]
    assert corpus.languages["en"].valid == ["en document 2"]


@pytest.mark.parametrize(
    "files,message",
    [
        ({"docs.jsonl": '{"text": "a"}\n'}, r'docs.jsonl line 1 has no string "lang"'),
        ({"docs.jsonl": '{"text": "a", "lang": "not a tag"}\n'}, "'not a tag' is not a language tag"),
        ({"docs.jsonl": '{"text": "a", "lang": "en", "split": "dev"}\n'}, "has split 'dev'"),
        (
            {"de.jsonl": '{"text": "a"}\n', "more.jsonl": '{"text": "b", "lang": "de"}\n'},
            "language 'de' is given twice",
        ),
        ({"notes.md": "x"}, "no language-tagged text"),
        ({"de.valid.txt": "x"}, "no de.train.txt"),
    ],
)
def test_layout_errors_name_the_problem(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / "data" / name, text)
    with pytest.raises(DataError, match=message):
        load_multilingual(tmp_path / "data")


@pytest.mark.data_pack
def test_the_offline_pack_loads_with_every_language():
    corpus = load_multilingual(data_pack("multilingual"))
    assert len(corpus.languages) >= 12 and "udhr.jsonl.gz" in corpus.ignored
    assert corpus.languages["de"].valid[0][:200] in pack_text("de")


# ---------------------------------------------------------------------------------------- temperature sampling


def test_language_probabilities_by_hand():
    sizes = {"big": 900, "small": 100}
    assert language_probabilities(sizes, 1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert language_probabilities(sizes, 0.0) == pytest.approx({"big": 0.5, "small": 0.5})
    # α = 0.5: √0.9 : √0.1 = 3 : 1
    assert language_probabilities(sizes, 0.5) == pytest.approx({"big": 0.75, "small": 0.25})
    assert language_probabilities({"a": 10, "b": 0}, 0.3) == {"a": 1.0, "b": 0.0}
    with pytest.raises(ValueError, match="alpha must be in"):
        language_probabilities(sizes, 1.5)
    with pytest.raises(ValueError, match="not all 0"):
        language_probabilities({"a": 0}, 0.3)


def test_tokenizer_text_follows_the_temperature(tmp_path):
    folder = tmp_path / "data"
    for lang, size in (("aa", 90_000), ("bb", 10_000)):  # test files given: all of train stays train
        write(folder / f"{lang}.train.txt", lang[0] * size)
        write(folder / f"{lang}.valid.txt", lang[0])
        write(folder / f"{lang}.test.txt", lang[0])
    corpus = load_multilingual(folder)
    texts = tokenizer_text(corpus, alpha=0.5, budget_bytes=40_000)
    joined = "".join(texts)
    assert joined.count("a") == 30_000 and joined.count("b") == 10_000  # 3 : 1, all of "bb" once
    texts = tokenizer_text(corpus, alpha=0.0, budget_bytes=40_000)
    assert "".join(texts).count("b") == 20_000  # uniform: "bb" (10 kB) is repeated to fill its half


def test_tokenizer_text_cuts_at_a_character():
    from mhmoe.data.multilingual import _take_bytes

    assert _take_bytes(["日本語"], 4) == ["日"]  # 3-byte characters: the partial second one is dropped
    assert _take_bytes(["ab", "c"], 7) == ["ab", "c", "ab", "c", "a"]


def toy_tokens() -> dict[str, np.ndarray]:
    """Language i has tokens 100·i .. 100·i + 99, so a row's language can be read off its ids."""
    sizes = {"xx": 20_000, "yy": 4_000, "zz": 500}
    return {lang: (100 * i + np.arange(n) % 100).astype(np.uint16) for i, (lang, n) in enumerate(sizes.items())}


def test_language_sampler_follows_the_probabilities():
    tokens = toy_tokens()
    sampler = LanguageSampler(tokens, batch_size=16, seq_len=8, seed=3, alpha=0.3)
    q = language_probabilities({k: len(v) for k, v in tokens.items()}, 0.3)
    assert sampler.probabilities == pytest.approx(q)
    counts = dict.fromkeys(tokens, 0)
    rows = 0
    for _ in range(250):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (16, 8) and torch.equal(x[:, 1:], y[:, :-1])
        lang_of_row = x[:, 0] // 100
        assert torch.equal((x // 100), lang_of_row[:, None].expand_as(x))  # every row is one language's window
        for i, lang in enumerate(tokens):
            counts[lang] += int((lang_of_row == i).sum())
        rows += 16
    for lang, p in q.items():
        sd = math.sqrt(p * (1 - p) / rows)
        assert abs(counts[lang] / rows - p) < 4 * sd, (lang, counts[lang] / rows, p)
    assert q["zz"] > 3 * len(tokens["zz"]) / sum(map(len, tokens.values()))  # the small language is lifted


def test_language_sampler_resumes_exactly():
    tokens = toy_tokens()
    original = LanguageSampler(tokens, batch_size=8, seq_len=16, seed=5)
    for _ in range(37):  # past the end of "zz"'s first epoch
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # it travels through the checkpoint's JSON
    restored = LanguageSampler(tokens, batch_size=8, seq_len=16, seed=5)
    restored.load_state_dict(state)
    for _ in range(20):
        (a, b), (c, d) = original.next_batch(), restored.next_batch()
        assert torch.equal(a, c) and torch.equal(b, d)
    other = LanguageSampler({k: v for k, v in tokens.items() if k != "zz"}, batch_size=8, seq_len=16, seed=5)
    with pytest.raises(DataError, match="saved for languages"):
        other.load_state_dict(state)


def test_multilingual_training_resumes_exactly(toy_languages, tmp_path, one_thread, capsys):
    cfg = apply_overrides(preset("cpu-tiny"), [
        f"data.path={toy_languages}", "data.multilingual=true", "train.max_steps=6", "train.checkpoint_every=3",
        "train.log_every=1", "train.eval_every=3", "train.eval_batches=1", "train.keep_checkpoints=3", "train.threads=1",
        "model.seq_len=32",
    ])  # fmt: skip
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    (cut / "checkpoints" / "latest").write_text("step-00000003\n")
    train(cfg, cut, progress=False)

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(cut) == losses(full) and len(losses(full)) == 6
    state = json.loads((full / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["sampler"]["languages"] == ["de", "en", "es"] and state["sampler"]["batches"] == 6

    from mhmoe.cli import main  # `mhmoe eval` of a multilingual run reports every language

    capsys.readouterr()
    assert main(["eval", str(full)]) == 0
    out = capsys.readouterr().out
    assert all(f"valid {lang}:" in out for lang in ("de", "en", "es")) and "bits/byte" in out, out


# ------------------------------------------------------------------------------------------------- bits per byte


def test_interleave_round_robin():
    a, b = np.arange(5), np.arange(100, 102)
    assert interleave([a, b], 2).tolist() == [0, 1, 100, 101, 2, 3, 4]


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_token_bytes_are_exact_for_byte_level_bpe(text):
    tokenizer = _bpe()
    ids = tokenizer.encode(text)
    assert target_bytes(tokenizer, ids) == len(text.encode("utf-8"))
    assert token_byte_lengths(tokenizer)[tokenizer.eos_id] == 0
    assert target_bytes(ByteTokenizer(), ByteTokenizer().encode(text) + [256]) == len(text.encode("utf-8"))


_BPE: list = []


def _bpe() -> BPETokenizer:
    if not _BPE:
        _BPE.append(BPETokenizer.train([pack_text(lang)[:20_000] for lang in ("en", "de", "ru", "zh")], 400))
    return _BPE[0]


class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over V: every token costs ln V nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return SimpleNamespace(logits=torch.zeros(*x.shape, self.vocab))


def fake_run(splits: dict[str, np.ndarray], tokenizer, model=None, seq_len: int = 4, batch_size: int = 2):
    cfg = preset("cpu-tiny")
    cfg.model.seq_len, cfg.train.batch_size = seq_len, batch_size
    model = model or Uniform(tokenizer.vocab_size)
    return SimpleNamespace(model=model, tokenizer=tokenizer, splits=splits, cfg=cfg, device=torch.device("cpu"))


def test_bits_per_byte_by_hand():
    # "héllo" = 6 UTF-8 bytes (é is 2) + eos: 7 tokens, 6 targets: "éllo" (5 bytes) and eos (0 bytes).
    # Uniform over 257 ids: 6 · ln 257 nats over 5 bytes = 1.2 · log2(257) = 9.60675 bits per byte.
    tok = ByteTokenizer()
    ids = np.array(tok.encode("héllo") + [tok.eos_id], dtype=np.uint16)
    splits = {"train:xx": ids, "valid:xx": ids, "test:xx": ids[:4]}
    report = evaluate_languages(fake_run(splits, tok), max_batches=0)["xx"]
    assert report["valid_tokens"] == 6 and report["valid_bytes"] == 5
    assert report["valid_bpb"] == pytest.approx(9.606749459, rel=1e-9)
    assert report["valid_ppl"] == pytest.approx(257)
    assert report["test_bytes"] == 3 and report["test_bpb"] == pytest.approx(math.log2(257))  # "éll" minus "h"
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least one byte"):
        bits_per_byte(1.0, 0)


def test_evaluate_languages_reads_each_language_and_caps_batches():
    tok = ByteTokenizer()
    en = np.array(tok.encode("the cat sat on the mat " * 20), dtype=np.uint16)
    zh = np.array(tok.encode("中文分词测试" * 10), dtype=np.uint16)
    splits = {f"{s}:{lang}": t for lang, t in (("en", en), ("zh", zh)) for s in ("train", "valid", "test")}
    report = evaluate_languages(fake_run(splits, tok, seq_len=4, batch_size=2), max_batches=3)
    assert list(report) == ["en", "zh"]
    for row in report.values():
        assert row["valid_tokens"] == 3 * 2 * 4 == row["valid_bytes"]  # all byte tokens, no eos in the prefix
        assert row["valid_bpb"] == pytest.approx(math.log2(257))


# -------------------------------------------------------------------------------------------------- analyses


def test_word_spans_are_whole_words_case_insensitive():
    text = "Das Kind und die Kinder; kind, KIND!"
    assert word_spans(text, ["kind", "die"]) == [(4, 8, "kind"), (13, 16, "die"), (25, 29, "kind"), (31, 35, "kind")]
    assert word_spans(text, []) == []


def test_tokens_in_spans_by_hand():
    offsets = np.array([[0, 3], [3, 5], [5, 9], [9, 10], [10, 14]])
    assert tokens_in_spans(offsets, [(4, 6, "a"), (9, 10, "b"), (11, 12, "c")]).tolist() == [-1, 0, 0, 1, 2]
    assert tokens_in_spans(offsets, [(0, 14, "a"), (5, 6, "b")]).tolist() == [0] * 5  # the first span wins
    ids, offs = token_offsets(ByteTokenizer(), "aé")
    assert ids.tolist() == [97, 0xC3, 0xA9] and offs.tolist() == [[0, 1], [1, 2], [1, 2]]


def test_language_expert_information_by_hand():
    assert language_expert_information(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert language_expert_information(np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)
    # H(mean) = H(0.75, 0.25) = 0.811278; mean H = (0 + 1) / 2
    assert language_expert_information(np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(0.311278, abs=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        language_expert_information(np.array([[0.5, 0.2]]))


def test_word_lists_are_documented_and_disjoint():
    assert not set(FALSE_COGNATES) & set(CONTROL_WORDS)
    for table in (FALSE_COGNATES, CONTROL_WORDS):
        for word, meanings in table.items():
            assert word == word.lower() and len(meanings) >= 2 and all(meanings.values()), word
    assert all(len(set(m.values())) >= 2 for m in FALSE_COGNATES.values())  # different meanings
    assert all(len(set(m.values())) == 1 for m in CONTROL_WORDS.values())  # the same meaning


def test_divergence_windows_label_tokens_by_hand():
    # German: "die" is a false cognate, "name" a control word. Byte tokens (one per character here), windows of 8:
    # window 0 = "die Name", window 1 = " die Kat", window 2 = "ze ist h", window 3 = "ier!!!!!" (eos cut off).
    from mhmoe.experiments.multilingual.words import WORDS as _WORDS

    doc = "die Name die Katze ist hier!!!!!"
    ids, group, word = divergence_windows(ByteTokenizer(), [doc], "de", seq_len=8, occurrences=1)
    assert ids.shape == (1, 8) and bytes(ids[0].tolist()) == b"die Name"  # the second "die" is over the quota
    assert group[0].tolist() == [0, 0, 0, -1, 1, 1, 1, 1]
    assert [_WORDS[w] if w >= 0 else None for w in word[0]] == ["die"] * 3 + [None] + ["name"] * 4
    ids, group, word = divergence_windows(ByteTokenizer(), [doc], "de", seq_len=8, occurrences=2)
    assert ids.shape == (2, 8) and bytes(ids[1].tolist()) == b" die Kat"
    assert group[1].tolist() == [-1, 0, 0, 0, -1, 2, 2, 2]  # "Kat" is part of another word
    assert word[1].tolist()[1:4] == [_WORDS.index("die")] * 3 and (word[1][4:] == -1).all()
    assert divergence_windows(ByteTokenizer(), ["nothing listed here at all"], "de", 8, 1) is None
    assert divergence_windows(ByteTokenizer(), ["die die die die"], "zz", 8, 1) is None  # nothing counts in "zz"


def test_word_divergence_groups_follow_the_routing(monkeypatch):
    """With routing that reaches 1 expert for even token ids and 2 for odd ones, each group's mean divergence is
    the share of odd ids among its tokens plus 1: the windows, routing rows and labels line up."""
    import mhmoe.experiments.multilingual.words as runs

    def fake_routing(run, tokens, max_batches):
        L, B = run.cfg.model.seq_len, run.cfg.train.batch_size
        inputs = np.asarray(tokens[: min(max_batches * B, (len(tokens) - 1) // L) * L], dtype=np.int64)
        odd = inputs % 2  # H = 2 sub-tokens, K = 1: (0, 0) for even ids, (0, 1) for odd ones
        top_SK = np.stack([np.zeros_like(odd), odd], axis=1).reshape(-1, 1)
        return [LayerRouting(top_SK, num_heads=2, num_experts=4, name="block 2")]

    monkeypatch.setattr(runs, "collect_routing", fake_routing)
    cfg = apply_overrides(preset("cpu-tiny"), ["model.vocab_size=257", "model.seq_len=8"])
    run = fake_run({}, ByteTokenizer(), model=GPT(cfg.model), seq_len=8, batch_size=2)
    docs = ["der Server hat die Kinder gesehen, die Daten auch"]
    inputs = {"de": divergence_windows(ByteTokenizer(), docs, "de", 8, occurrences=5)}
    report = word_divergence(run, inputs)
    ids, group = inputs["de"][0].reshape(-1), inputs["de"][1].reshape(-1)
    for g, name in enumerate(("false cognates", "control words", "other words")):
        expected = 1 + (ids[group == g] % 2).mean()
        assert report["groups"][name]["mean"] == pytest.approx(expected), name
        assert report["groups"][name]["tokens"] == int((group == g).sum())
    assert set(report["per_word"]) == {"hat", "die", "server"}


# ----------------------------------------------------------------------------------------------- end to end

TOY = [
    *TOY_MODEL,
    "train.max_steps=3",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.batch_size=2",
    "train.threads=1",
    "data.vocab_size=300",
]


def test_reproduce_multilingual_toy(toy_languages, tmp_path, monkeypatch, capsys, one_thread):
    import mhmoe.experiments.multilingual.experiment as rm

    monkeypatch.setattr(rm, "analysis_budget", lambda quick, gpu: AnalysisBudget(1, 1, 2))
    out = tmp_path / "out"
    args = ["reproduce", "multilingual", "--quick", "--out", str(out), "--data", str(toy_languages), "--no-progress"]
    for item in TOY:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "multilingual" and results["language_alpha"] == 0.3
    assert set(results["models"]) == {"dense", "smoe", "xmoe", "mhmoe_flops"}
    languages = results["languages"]
    assert list(languages) == ["de", "en", "es"]
    assert sum(v["probability"] for v in languages.values()) == pytest.approx(1)
    assert languages["es"]["probability"] > languages["es"]["natural_share"]  # the small language is lifted
    for name, model in results["models"].items():
        assert {"val_ppl", "test_ppl", "val_bpb", "test_bpb", "per_language", "seeds", "params_total"} <= set(model)
        assert set(model["per_language"]) == {"de", "en", "es"}
        per_lang_loss = [math.log(row["valid_ppl"]) for row in model["per_language"].values()]
        assert model["val_ppl"] == pytest.approx(math.exp(sum(per_lang_loss) / 3))  # languages weigh equally
        assert model["val_bpb"] > 0 and model["tokens_seen"] == 3 * 2 * 32
        if name.startswith("mhmoe"):
            assert model["divergence"]["false cognates"][0] >= 1 and model["language_mi_bits"] >= 0
            assert (out / "divergence" / f"{name}.png").exists()
        elif name == "dense":
            assert model["divergence"] is None and model["language_mi_bits"] is None
        if name != "dense":
            assert list((out / "heatmaps").glob(f"{name}-languages-*.png"))
    shared = (out / "tokenizer.json").read_text()
    assert all((run / "tokenizer.json").read_text() == shared for run in (out / "runs").iterdir())
    table = (out / "results.md").read_text()
    assert "bits per byte per language" in table and "| **average** |" in table and "false cognates" in table
    assert (out / "val_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "mhmoe_flops" in capsys.readouterr().out


def test_reproduce_multilingual_needs_data(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MHMOE_MULTILINGUAL_DATA", raising=False)
    assert main(["reproduce", "multilingual", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "no multilingual data: pass --data DIR" in capsys.readouterr().err
