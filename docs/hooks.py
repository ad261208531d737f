"""MkDocs hooks (mkdocs.yml `hooks:`): the site is docs/ plus the repository's other pages, with links that work in
both places; and a griffe extension (`DocstringsAsWritten`, mkdocstrings' `extensions:`) for the API page.

The pages link by repository path (docs/results.md names ../results/english/README.md), which is what a reader of
the repository follows. The site adds the pages listed in mkdocs.yml's `extra.repository_pages` (the README as the
home page, the READMEs of benchmarks/ and results/*/) under the name of their folder (results/english/README.md is
the page results/english.md), and rewrites every relative link to the site's page for the file it names. A link to
a repository file or folder that is no page of the site (a results folder, a JSON file) becomes its repository
path as code text: the site has no copy of it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
ITEM = re.compile(r"^([-*+]|[0-9]+[.)]) ")
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#|/)", flags=re.I)


def site_path(repository_path: str) -> str:
    """The site page of a repository page: README.md -> index.md, results/english/README.md -> results/english.md."""
    folder, name = posixpath.split(repository_path)
    if name != "README.md":
        raise PluginError(f"extra.repository_pages: {repository_path} is not a README.md (only folders' READMEs)")
    return f"{folder}.md" if folder else "index.md"


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def _docs_prefix(config: MkDocsConfig) -> str:
    return Path(config.docs_dir).resolve().relative_to(_root(config)).as_posix()


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for repository_path in config.extra.get("repository_pages", []):
        uri = site_path(repository_path)
        if files.get_file_from_path(uri) is not None:
            raise PluginError(f"{repository_path} would be the page {uri}, which {config.docs_dir} already has")
        files.append(File.generated(config, uri, abs_src_path=str(_root(config) / repository_path)))
    return files


def _repository_path(page: Page, config: MkDocsConfig) -> str:
    """Where the page's markdown lives in the repository."""
    for repository_path in config.extra.get("repository_pages", []):
        if site_path(repository_path) == page.file.src_uri:
            return repository_path
    return f"{_docs_prefix(config)}/{page.file.src_uri}"


def _rewrite(match: re.Match[str], source: str, page_uri: str, pages: dict[str, str], root: Path) -> str:
    """One link of the page `page_uri`, whose markdown is the repository file `source`; `pages` maps repository
    paths to the site's pages."""
    text, target = match["text"], match["target"]
    if EXTERNAL.match(target):
        return match[0]
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    if resolved in pages:
        link = posixpath.relpath(pages[resolved], posixpath.dirname(page_uri) or ".")
        return f"[{text}]({link}{'#' + anchor if anchor else ''})"
    if resolved.startswith("../") or not (root / resolved).exists():
        return match[0]  # a broken link stays, for mkdocs to report (an error under --strict)
    shown = resolved + ("/" if path.endswith("/") else "")
    if text.strip("`").rstrip("/") and shown.rstrip("/").endswith(text.strip("`").rstrip("/")):
        return f"`{shown}`"  # the text was the path (or its end): show the whole repository path
    return f"{text} (`{shown}` in the repository)"


def _github_lists(chunk: str) -> str:
    """Lists as GitHub reads them, for Python-Markdown: a blank line before a list that follows a paragraph line
    (GitHub starts the list there, Python-Markdown would run the items into the paragraph); an item's indented
    lines moved to its content at four columns (GitHub takes the column after "- ", Python-Markdown needs four,
    or a table or second paragraph inside an item falls out of it); and a blank line before the item after one
    with a blank line inside (else Python-Markdown reads it as part of that item's last paragraph)."""
    out: list[str] = []
    shift = 0  # columns added to the indented lines of the current item; 0 outside lists
    loose = False  # the current item has a blank line inside: the next item needs one before it too
    for line in chunk.split("\n"):
        item = ITEM.match(line)
        previous = out[-1] if out else ""
        if item:
            interrupts = item[1] in "-*+" or item[1] == "1."  # GitHub: only these interrupt a paragraph
            paragraph = not shift and not previous.startswith(("|", "#", ">", " ")) and interrupts
            if previous.strip() and (paragraph or loose):
                out.append("")
            shift, loose = 4 - len(item[0]), False
        elif line.strip() and not line[0].isspace():
            shift = 0
        elif line.strip():
            loose = loose or (bool(shift) and not previous.strip())
            line = " " * shift + line
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    prefix = _docs_prefix(config)
    pages = {f"{prefix}/{file.src_uri}": file.src_uri for file in files.documentation_pages()}
    pages.update({path: site_path(path) for path in config.extra.get("repository_pages", [])})
    source = _repository_path(page, config)

    def rewrite_outside_code(chunk: str) -> str:
        chunk = _github_lists(chunk)
        return LINK.sub(lambda match: _rewrite(match, source, page.file.src_uri, pages, _root(config)), chunk)

    parts: list[Any] = []
    last = 0
    for fence in FENCE.finditer(markdown):  # links are not rewritten inside fenced code
        parts += [rewrite_outside_code(markdown[last : fence.start()]), fence[0]]
        last = fence.end()
    return "".join([*parts, rewrite_outside_code(markdown[last:])])


class DocstringsAsWritten(griffe.Extension):
    """The API page shows docstrings as `help()` does. They are prose laid out in lines (a field per line in
    `MoEConfig`'s, continuation lines indented), not Markdown paragraphs: each line break is kept (a Markdown hard
    break) instead of running the lines into one paragraph. Attributes documented by a comment on their line
    (`tokens_per_expert: Tensor  # (E,) int64: ...`, the fields of `MoEStats` and `RouterOutput`) get that comment
    as their docstring, so the page lists them."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None and obj.is_attribute and obj.parent is not None and obj.parent.is_class:
            comment = _line_comment(obj.lines[0] if obj.lines else "")
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = _hard_breaks(obj.docstring.value)


def _line_comment(line: str) -> str | None:
    """The comment ending a line of code (`x: int  # the count` -> "the count"), not a tool's (`# noqa`)."""
    code, sep, comment = line.partition("  # ")
    comment = comment.strip()
    if not sep or not code.strip() or comment.startswith(("noqa", "type:", "fmt:", "pragma")):
        return None
    return comment


def _hard_breaks(text: str) -> str:
    """Each line that another line follows in the same block ends in a hard break (two spaces)."""
    lines = text.split("\n")
    return "\n".join(
        line + "  " if line.strip() and i + 1 < len(lines) and lines[i + 1].strip() else line
        for i, line in enumerate(lines)
    )
