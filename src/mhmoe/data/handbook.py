"""The Debian handbook text of multilingual/ (`mhmoe data prepare multilingual`), byte for byte as the offline data
pack has it, for the edition that needs no filter of untranslated paragraphs: en-US.

pages: the HTML files of usr/share/doc/debian-handbook/html/<locale>/ in book order: the pages index.html links to
    (no anchors, no other sites), in the order of their first link; index.html links to itself first (`book_order`).
lines: the text of a page split at the start and end of every block element (headings, paragraphs, list items,
    table cells, divisions, ...) and at index-term anchors; each piece NFC, without control characters, runs of ASCII
    white space made one space and stripped; empty pieces dropped. Left out: <head>, <pre> blocks (commands,
    program output), the navigation (ul.docnav, #banner, #title) and tables of contents (div.toc) (`page_lines`).
    A line naming a host of the package archive (`ARCHIVE_HOSTS`) is dropped too.
splits: a page is one block with id its file name without ".html" (e.g. "sect.apt-get") and size the length of its
    text (its lines joined by newlines); `assign_splits` over the pages of the en-US edition (`handbook_pages`).
What is not rebuilt: the translated editions drop paragraphs left in English (one identical to an en-US paragraph,
or one with at least 2 common English function words and more than twice as many as function words of the
locale's language); the pack does not publish its function-word lists, so those languages stay with the pack.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

from mhmoe.data.builders import ARCHIVE_HOSTS, assign_splits

HANDBOOK_HTML = Path("usr", "share", "doc", "debian-handbook", "html")
_BLOCKS = frozenset(
    {"html", "head", "body", "title", "div", "p", "pre", "blockquote", "ul", "ol", "li", "dl", "dt", "dd", "table",
     "thead", "tbody", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6"}
)  # fmt: skip
_VOID = frozenset({"br", "img", "meta", "link", "hr", "col", "area", "input"})
_LEFT_OUT_TAGS = frozenset({"head", "pre", "script", "style"})
_LINK = re.compile(r'href="([^"#:]+\.html)')  # a page of the edition: no anchor, no scheme


class _Page(HTMLParser):
    """The lines of one handbook page (module doc)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._text: list[str] = []
        self._open: list[tuple[str, bool]] = []  # (tag, left out) of each open element
        self._left_out = 0  # open elements that are left out, with what is inside them

    def flush(self) -> None:
        text = unicodedata.normalize("NFC", "".join(self._text))
        text = "".join(c for c in text if c in "\t\n" or unicodedata.category(c) != "Cc")
        text = re.sub(r"[ \t\n\r\f]+", " ", text).strip()
        if text:
            self.lines.append(text)
        self._text = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            return
        attributes = dict(attrs)
        css = attributes.get("class") or ""
        left_out = (self._left_out > 0 or tag in _LEFT_OUT_TAGS or "docnav" in css.split() or css == "toc"
                    or attributes.get("id") in ("banner", "title"))  # fmt: skip
        self._open.append((tag, left_out))
        if left_out:
            self._left_out += 1
        elif tag in _BLOCKS or (tag == "a" and css == "indexterm"):
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        while self._open:  # close up to the matching element
            open_tag, left_out = self._open.pop()
            self._left_out -= left_out
            if open_tag == tag:
                break
        if self._left_out == 0 and tag in _BLOCKS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if self._left_out == 0:
            self._text.append(data)


def page_lines(html: str) -> list[str]:
    """The lines of a handbook page (module doc), archive hosts not yet dropped."""
    page = _Page()
    page.feed(html)
    page.close()
    page.flush()
    return page.lines


def book_order(folder: Path) -> list[str]:
    """The page files of one edition in book order (module doc)."""
    order: list[str] = []
    for name in _LINK.findall((folder / "index.html").read_text(encoding="utf-8")):
        if name not in order:
            order.append(name)
    return order


def handbook_pages(root: Path, locale: str = "en-US") -> list[dict]:
    """The pages of one edition from an unpacked debian-handbook, in book order, with their splits (module doc):
    {"id", "text", "split"}; lines naming an archive host dropped."""
    folder = root / HANDBOOK_HTML / locale
    pages = []
    for name in book_order(folder):
        lines = page_lines((folder / name).read_text(encoding="utf-8"))
        text = "\n".join(line for line in lines if not ARCHIVE_HOSTS.search(line))
        pages.append({"id": name.removesuffix(".html"), "text": text})
    assign_splits(pages)
    return pages
