"""Reading a model folder someone else made without trusting it: no pickle behind a safetensors name or index, no
symbolic link out of the folder. Checked before transformers (or a copy) reads anything."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from mhmoe.errors import UserError


def folder_file(file: Path, folder: Path) -> Path:
    """`file`, a file of `folder` to be read or copied: a regular file, or a symbolic link that stays inside the
    folder or, in a Hugging Face hub cache (…/snapshots/REV/), inside that model's cache. Anything else is a
    UserError: a link to elsewhere would copy whatever it points at into the output."""
    if file.is_symlink():
        target, root = file.resolve(), folder.resolve()
        allowed = root.parent.parent if root.parent.name == "snapshots" else root
        if not target.is_relative_to(allowed):
            raise UserError(f"{file} is a symbolic link to {target}, outside {folder}; copy the real file there")
    if not file.is_file():
        raise UserError(f"{file} is not a regular file; replace it by the file it should be")
    return file


def check_model_folder(path: Path) -> None:
    """Refuse, before anything is read, a model folder whose weights are not all safetensors files of the folder:
    an index (model.safetensors.index.json) must name safetensors shards beside it, and every *.safetensors file
    must start like one (an 8-byte header length, then a JSON object), not like a pickle renamed."""
    index = path / "model.safetensors.index.json"
    shards = set()
    if index.exists():
        try:
            weight_map = json.loads(folder_file(index, path).read_bytes())["weight_map"]
            shards = {str(name) for name in dict(weight_map).values()}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{index} is not a safetensors weights index (no weight_map of file names)") from None
    for name in sorted(shards):
        if "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise UserError(
                f"{index} names {name[:60]!r}, which is not a safetensors file of {path}: refused before anything "
                "is unpickled (mhmoe loads safetensors weights only)"
            )
    for file in sorted({*path.glob("*.safetensors"), *(path / name for name in shards)}):
        if not file.exists():
            raise UserError(f"{index} names {file.name}, which is missing from {path}")
        _check_safetensors_header(folder_file(file, path))


def _check_safetensors_header(file: Path) -> None:
    with open(file, "rb") as f:
        head = f.read(9)
    size = file.stat().st_size
    length = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
    if len(head) < 9 or head[8:9] != b"{" or 8 + length > size:
        raise UserError(
            f"{file} is not a safetensors file (it may be a pickle renamed): refused before anything is unpickled"
        )
