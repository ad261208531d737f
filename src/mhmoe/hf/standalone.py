"""Remote code for an exported model folder: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
then loads it where only transformers and torch are installed (no mhmoe).

The folder gets `configuration_mhmoe.py` and `modeling_mhmoe.py` (this package's two modules) and, beside them,
the mhmoe modules they need (the GPT, the layers, the ops), found by following their imports and copied
unchanged except for those imports: `from mhmoe.layers.moe import X` becomes `from .mhmoe_layers_moe import X`.
It is the same code, not a second implementation. The one module left out is the Triton kernel module (it needs
Triton, and `dispatch="auto"` never picks it): a stub in its place says it cannot run. config.json's
`auto_map` names the classes (`AUTO_MAP`), as transformers expects of remote code.

transformers copies a remote module's relative imports (`from .name import ...`, the only form it follows) into its
module cache, so every vendored import is written in that form.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ENTRY = {"mhmoe.hf.configuration_mhmoe": "configuration_mhmoe", "mhmoe.hf.modeling_mhmoe": "modeling_mhmoe"}
STUBBED = "mhmoe.ops.triton_experts"
# All classes through the modeling module (which imports the config class): transformers 5 loads each auto_map
# entry into a module folder named by a hash of the entry file and its relative imports, so two entry files would
# give two copies of the layers, and the model's `isinstance` checks would fail between them.
AUTO_MAP = {
    "AutoConfig": "modeling_mhmoe.MHMoEConfig",
    "AutoModel": "modeling_mhmoe.MHMoEModel",
    "AutoModelForCausalLM": "modeling_mhmoe.MHMoEForCausalLM",
}
_TRITON_STUB = '''"""Stand-in for mhmoe.ops.triton_experts in an exported model folder: the Triton kernels are not shipped with
the model (dispatch="auto" never uses them); install mhmoe[triton] and load the folder with mhmoe for them."""

from typing import Any


def supports(device: Any, dtype: Any) -> bool:
    return False


def expert_ffn(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the Triton kernels are not part of an exported model folder; use dispatch='auto'")
'''


def file_name(module: str) -> str:
    """The vendored file (without .py) of an mhmoe module: mhmoe.layers.moe -> mhmoe_layers_moe."""
    return ENTRY.get(module) or module.replace(".", "_")


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module}")
    return Path(spec.origin).read_text(encoding="utf-8")


def _is_module(name: str) -> bool:
    """Whether a dotted name is a module (a name inside a plain module is not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package
        return False


def _mhmoe_imports(tree: ast.Module) -> list[tuple[ast.ImportFrom, list[str]]]:
    """Each `from mhmoe... import ...` statement, with the mhmoe modules it needs."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mhmoe" for a in node.names):
            raise ValueError(f"line {node.lineno}: `import mhmoe...` cannot be vendored; use `from mhmoe... import`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "mhmoe":
            assert node.module is not None
            submodules = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            found.append((node, submodules or [node.module]))
    return found


def _rewrite(source: str, tree: ast.Module) -> tuple[str, set[str]]:
    """The source with its mhmoe imports made relative to the flat folder, and the modules it needs."""
    lines = source.splitlines(keepends=True)
    needed: set[str] = set()
    for node, modules in sorted(_mhmoe_imports(tree), key=lambda item: -item[0].lineno):
        assert node.module is not None and node.end_lineno is not None
        needed.update(modules)
        indent = lines[node.lineno - 1][: node.col_offset]
        if modules == [node.module]:
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            new = f"{indent}from .{file_name(node.module)} import {names}\n"
        else:  # `from mhmoe.ops import triton_experts`: the module object itself; the first line is the form
            # transformers looks for when it copies a module's relative imports (`from .name import ...`)
            new = "".join(
                f"{indent}from .{file_name(f'{node.module}.{a.name}')} import __name__ as _{a.name}_module\n"
                f"{indent}from . import {file_name(f'{node.module}.{a.name}')} as {a.asname or a.name}\n"
                for a in node.names
            )
        lines[node.lineno - 1 : node.end_lineno] = [new]
    return "".join(lines), needed


def remote_code() -> dict[str, str]:
    """{file name: source} of the folder's remote code: the two entry modules and what they import."""
    files: dict[str, str] = {}
    todo, seen = list(ENTRY), set(ENTRY)
    while todo:
        module = todo.pop()
        if module == STUBBED:
            files[file_name(module) + ".py"] = _TRITON_STUB
            continue
        source = _source(module)
        text, needed = _rewrite(source, ast.parse(source))
        files[file_name(module) + ".py"] = text
        for other in sorted(needed - seen):
            seen.add(other)
            todo.append(other)
    return files


def write_remote_code(folder: Path) -> list[str]:
    """Write the remote code into an exported folder and name it in config.json's auto_map; returns the files."""
    import json

    from mhmoe.io import write_text

    files = remote_code()
    for name, text in files.items():
        write_text(folder / name, text)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = AUTO_MAP
    write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted(files)
