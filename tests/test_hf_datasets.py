"""Hugging Face `datasets` as training and evaluation text, on small datasets built here (no hub access): a folder
saved with save_to_disk, a name `load_dataset` resolves (a local folder of parquet files), a builder with
data files, streaming with a character cap; and a run trained on one."""

import gzip
import json

import pytest
from conftest import pack_sample

datasets = pytest.importorskip("datasets")

from mhmoe.cli import main  # noqa: E402
from mhmoe.data.hf_datasets import HFSource, is_hf_source, load_hf_corpus  # noqa: E402
from mhmoe.errors import DataError  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def texts():
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt", encoding="utf-8").read()[:48_000]
    return [text[i : i + 2_000] for i in range(0, len(text), 2_000)]  # 24 rows


def test_saved_dataset_dict_keeps_its_splits(tmp_path, texts):
    folder = tmp_path / "saved"
    rows = {"train": texts[:20], "validation": texts[20:22], "test": texts[22:] + ["", "  "]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v, "n": list(range(len(v)))}) for k, v in rows.items()}
                         ).save_to_disk(str(folder))  # fmt: skip
    assert is_hf_source(str(folder)) and not is_hf_source(str(tmp_path))
    corpus = load_hf_corpus(HFSource(str(folder)))
    assert (corpus.train, corpus.valid, corpus.test) == (texts[:20], texts[20:22], texts[22:])  # empty rows skipped
    with pytest.raises(DataError, match=r"row 0 has no string 'body' field \(fields: n, text\); set data.text_field"):
        load_hf_corpus(HFSource(str(folder), text_field="body"))


def test_a_name_of_parquet_files_is_split_by_hash_and_streams_with_a_cap(tmp_path, texts):
    folder = tmp_path / "mydata"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(folder / "train.parquet"))
    corpus = load_hf_corpus(HFSource(f"hf:{folder}"), valid_fraction=0.2, test_fraction=0.2)
    assert sorted(corpus.train + corpus.valid + corpus.test) == sorted(texts)
    assert corpus.valid and corpus.test and not set(corpus.train) & set(corpus.valid + corpus.test)
    assert corpus == load_hf_corpus(HFSource(f"hf:{folder}"), valid_fraction=0.2, test_fraction=0.2)  # by hash
    builder = load_hf_corpus(HFSource("hf:parquet", files=str(folder / "*.parquet")), 0.2, 0.2)
    assert builder.splits() == corpus.splits() and builder.source == f"hf:parquet ({folder / '*.parquet'})"
    streamed = load_hf_corpus(HFSource(f"hf:{folder}", streaming=True, max_chars=10_000), 0.2, 0.2)
    assert sum(map(len, streamed.train + streamed.valid + streamed.test)) == 10_000  # 5 rows of 2,000
    with pytest.raises(DataError, match="cannot load the dataset hf:no-such-dataset-here"):
        load_hf_corpus(HFSource("hf:no-such-dataset-here"))


def test_train_and_eval_on_a_saved_dataset(tmp_path, texts, capsys):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:20]}),
                          "validation": datasets.Dataset.from_dict({"text": texts[20:]})}).save_to_disk(str(folder))  # fmt: skip
    run = tmp_path / "run"
    args = ["train", "--preset", "cpu-tiny", "--data", str(folder), "--out", str(run), "--no-progress",
            "--set", "train.max_steps=2", "--set", "train.final_eval_batches=1", "--set", "model.d_model=32"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    chars = summary["data"]["chars"]
    assert (
        summary["data"]["source"] == str(folder) and chars["train"] + chars["test"] == 40_000
    )  # test: drawn from train
    assert f"mhmoe: data: {folder}" in capsys.readouterr().err
    assert main(["eval", str(run), "--max-batches", "1", "--no-progress"]) == 0
    assert f"test: loss {summary['test_loss']:.4f}" in capsys.readouterr().out
