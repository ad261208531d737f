"""The documentation site (mkdocs.yml): every page is in the nav, the API page covers the public API, and the hook
that adds the repository's pages keeps links working on the site. .ci/run builds the site with `--strict`."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

import mhmoe

ROOT = Path(__file__).resolve().parents[1]


class _Loader(yaml.SafeLoader):
    """mkdocs.yml's `!!python/...` tags (the slug function) read as None: only the structure is checked here."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
CONFIG = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)


def nav_pages(nav) -> list[str]:
    """The page files a nav names, in order (sections nest lists of {title: page} or bare pages)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for entry in nav for page in nav_pages(entry)]


def site_pages() -> set[str]:
    """The site's pages: docs/*.md (docs/ has no subfolders of pages) and the repository pages, by site path."""
    folders = {path.parent for path in (ROOT / "docs").rglob("*.md")}
    assert folders == {ROOT / "docs"}, "pages in a subfolder of docs/: extend site_pages"
    repository = {
        f"{Path(path).parent.as_posix()}.md" if Path(path).parent.as_posix() != "." else "index.md"
        for path in CONFIG["extra"]["repository_pages"]
    }
    return {path.name for path in (ROOT / "docs").glob("*.md")} | repository


def test_every_page_is_in_the_nav_once_and_every_nav_entry_is_a_page():
    nav = nav_pages(CONFIG["nav"])
    assert len(nav) == len(set(nav)), f"a page twice in the nav: {sorted(p for p in nav if nav.count(p) > 1)}"
    assert site_pages() - set(nav) == set(), "pages missing from mkdocs.yml's nav"
    assert set(nav) - site_pages() == set(), "nav entries that are no page"
    assert (ROOT / "docs" / "index.md").exists() is False, "the home page is README.md (extra.repository_pages)"
    assert nav[0] == "index.md"


def test_the_repository_pages_exist_and_mkdocs_checks_links_strictly():
    for path in CONFIG["extra"]["repository_pages"]:
        assert (ROOT / path).is_file(), path
    assert all(level == "warn" for level in CONFIG["validation"].values())  # --strict makes them errors
    assert set(CONFIG["validation"]) >= {"omitted_files", "not_found", "unrecognized_links", "anchors"}


def _hf_all() -> list[str]:
    tree = ast.parse((ROOT / "src" / "mhmoe" / "hf" / "__init__.py").read_text())
    (names,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)]
    return names


def test_the_api_page_documents_the_whole_public_api():
    documented = set(re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api.md").read_text(), flags=re.M))
    expected = {f"mhmoe.{name}" for name in mhmoe.__all__ if name != "load_run"}
    expected |= {"mhmoe.analysis.runs.load_run"} | {f"mhmoe.hf.{name}" for name in _hf_all()}
    assert mhmoe.load_run.__module__ == "mhmoe.analysis.runs"
    assert expected - documented == set(), "public names missing from docs/api.md"


@pytest.fixture(scope="module")
def hooks():
    """The hook module (docs/hooks.py), which runs inside mkdocs: checked here when the docs extra is installed."""
    pytest.importorskip("mkdocstrings", reason="the docs extra (mkdocs, mkdocstrings) is not installed")
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_path_names_a_readme_by_its_folder(hooks):
    assert hooks.site_path("README.md") == "index.md"
    assert hooks.site_path("results/english/README.md") == "results/english.md"


def test_links_are_rewritten_to_the_site_page_of_the_file_they_name(hooks, tmp_path):
    (tmp_path / "results" / "english" / "run1").mkdir(parents=True)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "x.json").write_text("{}")
    pages = {"docs/layers.md": "layers.md", "docs/paper-notes.md": "paper-notes.md", "README.md": "index.md"}
    pages["results/english/README.md"] = "results/english.md"

    def rewrite(markdown: str, source: str, page: str) -> str:
        return hooks.LINK.sub(lambda match: hooks._rewrite(match, source, page, pages, tmp_path), markdown)

    assert rewrite("[a](docs/layers.md#top)", "README.md", "index.md") == "[a](layers.md#top)"
    assert rewrite("see [n](../../docs/paper-notes.md) §6", "results/multilingual/README.md", "results/x.md") == (
        "see [n](../paper-notes.md) §6"
    )
    assert rewrite("[e](../results/english/README.md)", "docs/results.md", "results.md") == "[e](results/english.md)"
    # no page of the site: the repository path as code text
    assert rewrite("in [`run1/`](run1/).", "results/english/README.md", "results/english.md") == (
        "in `results/english/run1/`."
    )
    assert rewrite("[the table](../benchmarks/x.json)", "docs/development.md", "development.md") == (
        "the table (`benchmarks/x.json` in the repository)"
    )
    # kept: other sites, anchors, images, and broken links (for mkdocs to report; an error under --strict)
    for kept in ("[w](https://example.com/a.md)", "[a](#anchor)", "![img](x.png)", "[b](nope.md)", "[c](../../up.md)"):
        assert rewrite(kept, "docs/layers.md", "layers.md") == kept


def test_lists_read_as_on_github(hooks):
    text = "Decisions:\n- one\n  more of one\n\n  | a |\n  |---|\n- two\n\nText\n2. not a list\n"
    assert hooks._github_lists(text) == (
        "Decisions:\n\n- one\n    more of one\n\n    | a |\n    |---|\n\n- two\n\nText\n2. not a list\n"
    )


def test_docstrings_keep_their_lines_and_comments_document_fields(hooks):
    assert hooks._hard_breaks("a: x\nb: y\n\n    code") == "a: x  \nb: y\n\n    code"
    assert hooks._line_comment("    y: Tensor  # same shape as the input") == "same shape as the input"
    assert hooks._line_comment("    x = f()  # noqa: E501") is None
    assert hooks._line_comment("    # a comment line") is None


def test_every_public_class_and_function_has_a_docstring_for_the_api_page():
    griffe = pytest.importorskip("griffe", reason="the docs extra (mkdocstrings) is not installed")
    package = griffe.load("mhmoe", search_paths=[ROOT / "src"], resolve_aliases=True, resolve_external=False)
    documented = set(re.findall(r"^::: (\S+)$", (ROOT / "docs" / "api.md").read_text(), flags=re.M))
    missing = [
        path
        for path in sorted(documented)
        if (obj := package[path.removeprefix("mhmoe.")]).kind.value in ("class", "function") and not obj.docstring
    ]
    assert missing == [], "public classes or functions without a docstring (the API page shows them empty)"
