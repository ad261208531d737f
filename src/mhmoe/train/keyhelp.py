"""One-line meanings of configuration keys, for `mhmoe train --list-keys`, read from where the code already says
them: the comment on a dataclass field's line (`lr: float = 1e-3  # peak learning rate`), or a `name: meaning`
line of the class docstring (`num_experts, top_k: E experts, ...`, as `MoEConfig` writes them).

The source is read once per class (`inspect`); where it cannot be read (a frozen build) meanings are empty, and
tests/test_config.py checks that every key of every preset has one, so a new field without a comment fails there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import tokenize
import typing
from typing import Any

_DOC_LINE = re.compile(r"^\s*([a-z_][a-z0-9_]*(?:\s*,\s*[a-z_][a-z0-9_]*)*)\s*:\s+(.+?)\s*$")


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """{field name: meaning} of a dataclass, from its source comments and docstring (module doc)."""
    names = {f.name for f in dataclasses.fields(cls)}
    meanings = _docstring_meanings(inspect.getdoc(cls) or "", names)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return meanings
    meanings.update(_comment_meanings(source, names))
    return meanings


def _docstring_meanings(doc: str, names: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in doc.splitlines():
        match = _DOC_LINE.match(line)
        if match:
            fields = [n.strip() for n in match.group(1).split(",")]
            if all(n in names for n in fields):
                out.update({n: match.group(2) for n in fields})
    return out


def _comment_meanings(source: str, names: set[str]) -> dict[str, str]:
    """Comments inside the logical line of a `name: type = default` statement in the class body."""
    out: dict[str, str] = {}
    current: str | None = None
    at_start = True
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for token in tokens:
        if token.type in (tokenize.NEWLINE, tokenize.DEDENT):
            current, at_start = None, True
        elif token.type in (tokenize.INDENT, tokenize.NL):
            continue
        elif token.type == tokenize.COMMENT:  # on a line of its own before a field it is not that field's
            if current is not None:
                out.setdefault(current, token.string.lstrip("#").strip())
        elif at_start and token.type == tokenize.NAME:
            current, at_start = (token.string if token.string in names else None), False
        else:
            at_start = False
    return out


def key_meanings(cfg: Any, prefix: str = "") -> dict[str, str]:
    """{dotted leaf key: meaning} of a dataclass tree (instance or class); "" where the code says none."""
    cls = cfg if isinstance(cfg, type) else type(cfg)
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(key_meanings(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = helps.get(f.name, "")
    return out
