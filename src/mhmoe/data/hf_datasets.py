"""Hugging Face `datasets` as a text source (extra `datasets`): a dataset name, a folder saved with `save_to_disk`,
or files `datasets` reads, turned into a `Corpus` like any other data.

    data.path = "hf:NAME"            load_dataset(NAME, data.hf_config): a dataset of the Hub ("hf:wikitext" with
                                     data.hf_config=wikitext-103-raw-v1), a local folder of data files, or a
                                     builder ("hf:parquet", "hf:json", "hf:csv", "hf:text") with data.hf_files
    data.path = FOLDER               a DatasetDict / Dataset saved with `save_to_disk` (found by its
                                     dataset_dict.json or state.json)

The documents are the rows' `data.text_field` ("text"; empty and null rows skipped). Splits named train / validation
(or valid, dev) / test are used as given; a missing held-out split is drawn from the training rows by a hash of
their index (`data.valid_fraction`, `data.test_fraction`), as for plain files. `data.streaming=true` reads rows as
they come (for datasets too large to download whole), up to `data.max_chars` characters per split (0 = all).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhmoe.data.corpus import SPLITS, Corpus, _assign_by_hash, _fill_empty_splits
from mhmoe.errors import DataError

PREFIX = "hf:"
SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


@dataclass(frozen=True)
class HFSource:
    """Where the rows come from and how to read them (the data.* keys of the module doc)."""

    path: str
    config: str = ""
    files: str = ""
    text_field: str = "text"
    streaming: bool = False
    max_chars: int = 0

    @property
    def name(self) -> str:
        extra = [v for v in (self.config, self.files) if v]
        return self.path + (f" ({', '.join(extra)})" if extra else "") + (" [streaming]" if self.streaming else "")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_hf_source(path: str) -> bool:
    """Whether a data.path is read with `datasets` (module doc)."""
    return path.startswith(PREFIX) or is_saved_dataset(Path(path).expanduser())


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "Hugging Face datasets as data need the `datasets` package: pip install 'mhmoe[datasets]'"
        ) from e
    return datasets


def _open(source: HFSource) -> dict[str, Any]:
    """{split name: rows} of the source, as `datasets` gives them."""
    datasets = _datasets()
    if source.path.startswith(PREFIX) and not source.path.removeprefix(PREFIX).strip():
        raise DataError(f"data.path {source.path!r} names no dataset; write hf:NAME (e.g. hf:wikitext, or hf:parquet "
                        "with data.hf_files)")  # fmt: skip
    saved = Path(source.path).expanduser()
    if not source.path.startswith(PREFIX) and not any(saved.rglob("*.arrow")):
        raise DataError(f"{source.path} is a saved dataset with no rows (no .arrow file); give a dataset with text")
    try:
        if not source.path.startswith(PREFIX):
            if source.streaming:
                raise DataError(f"{source.path} is a saved dataset: data.streaming applies to hf:NAME sources only")
            loaded = datasets.load_from_disk(str(saved))
        else:
            files = source.files or None
            loaded = datasets.load_dataset(source.path.removeprefix(PREFIX), source.config or None, data_files=files,
                                           streaming=source.streaming)  # fmt: skip
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load the dataset {source.name}: {first}") from e
    return dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}


def _texts(rows: Iterable[dict], source: HFSource, split: str) -> Iterator[str]:
    """The texts of a split's rows, until max_chars characters (0 = all); empty and null texts are skipped. A
    file of the dataset found damaged while reading (pyarrow's errors are ValueError or OSError) is a DataError."""
    try:
        yield from _row_texts(rows, source, split)
    except (ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"cannot read the dataset {source.name} (split {split!r}): {first}; it is damaged") from e


def _row_texts(rows: Iterable[dict], source: HFSource, split: str) -> Iterator[str]:
    total = 0
    for number, row in enumerate(rows):
        text = row.get(source.text_field)
        if text is None and source.text_field in row:  # a null text: skipped like an empty one
            continue
        if not isinstance(text, str):
            fields = ", ".join(sorted(row))
            raise DataError(
                f"{source.name} split {split!r} row {number} has no string {source.text_field!r} field "
                f"(fields: {fields}); set data.text_field"
            )
        if text.strip():
            yield text
            total += len(text)
            if source.max_chars and total >= source.max_chars:
                return


def load_hf_corpus(
    source: HFSource, valid_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0
) -> Corpus:
    """The source's texts as a Corpus (module doc)."""
    splits = _open(source)
    found = {ours: next((splits[n] for n in names if n in splits), None) for ours, names in SPLIT_NAMES.items()}
    if found["train"] is None:
        raise DataError(f"{source.name} has no train split (it has {', '.join(splits) or 'none'})")
    docs = {split: list(_texts(rows, source, split)) if rows is not None else [] for split, rows in found.items()}
    missing = [s for s in ("valid", "test") if found[s] is None]
    if missing:  # hold out training rows by a hash of their index, as load_corpus does for plain files
        fractions = {
            "valid": valid_fraction if "valid" in missing else 0.0,
            "test": test_fraction if "test" in missing else 0.0,
        }
        scored = _assign_by_hash([(f"row#{i}", t) for i, t in enumerate(docs["train"])], fractions["valid"],
                                 fractions["test"], seed)  # fmt: skip
        for split in SPLITS:
            if split == "train" or split in missing:
                docs[split] = [text for _, text in scored[split]]
        if any(not docs[s] for s in SPLITS):
            filled = _fill_empty_splits({s: [(0.5, t) for t in docs[s]] for s in SPLITS}, Path(source.path))
            docs = {s: filled[s] for s in SPLITS}
    if not docs["train"]:
        raise DataError(f"{source.name}: the train split has no text in field {source.text_field!r}")
    return Corpus(docs["train"], docs["valid"], docs["test"], source=source.name)
