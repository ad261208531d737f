"""The fortune text of multilingual/ from the Debian fortunes packages (`mhmoe data prepare multilingual`), byte for
byte as the offline data pack has it:

files: the regular files under usr/share/games of each package, in path order, but no `off/` folder, no `.dat` /
    `.u8` index or link file, no symbolic link, no empty file and none of `SKIPPED_FILES` (pictures made of
    characters; the Slovak file of the Czech set) (`fortune_files`).
entries: each file read as UTF-8 (a bad byte becomes U+FFFD) and split at lines "%" (spaces or tabs may follow;
    "%\\r", in the CRLF files of fortunes-ru, is not a separator); in each entry UTF-8 that had been decoded as
    Latin-1 repaired (`repair_mojibake`), ANSI colour escapes and typewriter overstrikes removed, then
    `clean_text` with only control characters removed (a soft hyphen or a private-use character stays); empty
    entries dropped (`fortune_entries`).
blocks: per language, an entry equal to an earlier one is dropped, then one naming an archive host (`ARCHIVE_HOSTS`);
    the consecutive entries of a file make blocks, each closed once the sum of (length + 2) of its entries reaches
    8,000 (the last block of a file may be smaller); a block's id is "<package>/<file name>#<k>" (k counts the
    blocks of that file from 0), its size the sum of its entries' lengths (`fortune_blocks`).
splits: `assign_splits` over the fortune blocks of a language (`language_blocks`); each split file holds the
    language's handbook pages of that split (`mhmoe.data.handbook`), then its fortune blocks, in file order, entries
    and blocks separated by a blank line, with a final newline (`split_files`).
These are the rules behind every fortune count of the pack's languages.json (files, entries, duplicates, entries
naming hosts, repaired runs) and behind its split files; `mhmoe data prepare` builds the languages whose text is
fortunes only and English (`FORTUNE_LANGUAGES`).
"""

from __future__ import annotations

import re
from pathlib import Path

from mhmoe.data.builders import ARCHIVE_HOSTS, SPLIT_SHARES, assign_splits, clean_text, gzip_bytes

# the languages of multilingual/ that are rebuilt and their fortune packages (en: the en-US handbook comes first)
FORTUNE_LANGUAGES = {"cs": ["fortunes-cs"], "en": ["fortunes", "fortunes-min"], "pl": ["fortunes-pl"],
                     "zh": ["fortunes-zh"]}  # fmt: skip
SKIPPED_FILES = frozenset({"ascii-art", "asciiart", "banner", "klasik-sk"})
BLOCK_CHARS = 8000
_SEPARATOR = re.compile(r"^%[ \t]*(?:\n|\Z)", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERSTRIKE = re.compile(r".\x08")
# a UTF-8 sequence read as Latin-1: Â or Ã and one continuation byte, or â and two
_MOJIBAKE = re.compile(r"[\xc2\xc3][\x80-\xbf]|\xe2[\x80-\xbf]{2}")


def fortune_files(root: Path) -> list[tuple[str, bytes]]:
    """(file name, bytes) of the fortune files of an unpacked package (module doc), in path order."""
    games = root / "usr" / "share" / "games"
    found = []
    for path in sorted(games.rglob("*")):
        relative = path.relative_to(games)
        if path.is_symlink() or not path.is_file() or "off" in relative.parts[:-1]:
            continue
        if path.suffix in (".dat", ".u8") or path.name in SKIPPED_FILES or path.stat().st_size == 0:
            continue
        found.append((path.name, path.read_bytes()))
    return found


def repair_mojibake(text: str) -> tuple[str, int]:
    """UTF-8 that had been decoded as Latin-1 made right again, until nothing changes (text encoded twice is
    repaired twice); (text, number of characters repaired)."""
    repaired = 0

    def repair(match: re.Match) -> str:
        nonlocal repaired
        try:
            char = match.group(0).encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            return match.group(0)
        repaired += 1
        return char

    while True:
        fixed = _MOJIBAKE.sub(repair, text)
        if fixed == text:
            return fixed, repaired
        text = fixed


def fortune_entries(data: bytes) -> tuple[list[str], int]:
    """(the entries of a fortune file, characters repaired by `repair_mojibake`) (module doc)."""
    entries, repaired = [], 0
    for raw in _SEPARATOR.split(data.decode("utf-8", errors="replace")):
        text, count = repair_mojibake(raw)
        text = clean_text(_OVERSTRIKE.sub("", _ANSI.sub("", text)), controls_only=True)
        if text:
            entries.append(text)
            repaired += count
    return entries, repaired


def fortune_blocks(files: list[tuple[str, str, list[str]]]) -> list[dict]:
    """The blocks of one language from its files' (package, file name, entries), in file order (module doc):
    {"id", "text", "size"}."""
    seen: set[str] = set()
    blocks: list[dict] = []
    for package, name, entries in files:
        current: list[str] = []
        count = 0
        for entry in entries:
            if entry in seen:
                continue
            seen.add(entry)
            if ARCHIVE_HOSTS.search(entry):
                continue
            current.append(entry)
            if sum(len(e) + 2 for e in current) >= BLOCK_CHARS:
                blocks.append(_block(package, name, count, current))
                current, count = [], count + 1
        if current:
            blocks.append(_block(package, name, count, current))
    return blocks


def _block(package: str, name: str, k: int, entries: list[str]) -> dict:
    return {"id": f"{package}/{name}#{k}", "text": "\n\n".join(entries), "size": sum(map(len, entries))}


def language_blocks(lang: str, roots: dict[str, Path]) -> list[dict]:
    """The fortune blocks of a language with their splits, from its unpacked packages ({package name: folder})."""
    files = []
    for package in FORTUNE_LANGUAGES[lang]:
        for name, data in fortune_files(roots[package]):
            files.append((package, name, fortune_entries(data)[0]))
    blocks = fortune_blocks(files)
    assign_splits(blocks)
    return blocks


def split_files(lang: str, blocks: list[dict]) -> dict[str, bytes]:
    """{path: bytes} of multilingual/<lang>.{train,valid,test}.txt.gz: the blocks of each split, in the order given
    (handbook pages, then fortune blocks), a blank line between them and a final newline; empty blocks left out."""
    files = {}
    for split in SPLIT_SHARES:
        text = "\n\n".join(b["text"] for b in blocks if b["split"] == split and b["text"]) + "\n"
        files[f"multilingual/{lang}.{split}.txt.gz"] = gzip_bytes(text.encode("utf-8"))
    return files
