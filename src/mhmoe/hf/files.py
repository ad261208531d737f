"""Reading a model folder someone else made without trusting it: no pickle behind a safetensors name or index, no
symbolic link out of the folder, no JSON file nested or sized to exhaust the parser, no safetensors header whose
tensors lie outside its file, and no weights that would build another model than the one the config describes.
Checked before transformers (or a copy) reads anything (`check_model_folder`), and after it has loaded the
weights (`load_checked`: every tensor the model has, none it has not, each of its shape)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mhmoe.errors import UserError

MAX_JSON_BYTES = 256 << 20  # a tokenizer.json of a 256k vocabulary is ~20 MB
MAX_JSON_DEPTH = 64  # configs and tokenizers nest a few levels; a deeper file is hostile (RecursionError)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}  # fmt: skip
Shapes = dict[str, tuple[int, ...]]
# transformers' loggers of the weights it found missing, unexpected or mismatched (5.x, 4.x): `load_checked`
# refuses those with its own line, so their report, a table of many lines, is held back while it loads
LOAD_REPORTERS = ("transformers.utils.loading_report", "transformers.modeling_utils")


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


def check_model_folder(path: Path) -> Shapes:
    """Refuse, before anything is read, a model folder whose weights are not all safetensors files of the folder:
    an index (model.safetensors.index.json) must name safetensors shards beside it, and every *.safetensors file
    must be one (an 8-byte header length, a JSON header whose tensors lie inside the file), not a pickle renamed.
    Every *.json file must be a file of the folder that parses, within MAX_JSON_BYTES and MAX_JSON_DEPTH.
    Returns {tensor name: shape} over all the folder's safetensors files."""
    for file in sorted(path.glob("*.json")):
        read_json_file(file, path)
    index = path / "model.safetensors.index.json"
    shards = set()
    if index.exists():
        try:
            weight_map = read_json_file(index, path)["weight_map"]
            shards = {str(name) for name in dict(weight_map).values()}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index} is not a safetensors weights index (no weight_map of file names)") from None
    for name in sorted(shards):
        if "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise UserError(
                f"{index} names {name[:60]!r}, which is not a safetensors file of {path}: refused before anything "
                "is unpickled (mhmoe loads safetensors weights only)"
            )
    shapes: Shapes = {}
    for file in sorted({*path.glob("*.safetensors"), *(path / name for name in shards)}):
        if not file.exists():
            raise UserError(f"{index} names {file.name}, which is missing from {path}")
        shapes.update(safetensors_shapes(folder_file(file, path)))
    return shapes


def read_json_file(file: Path, folder: Path) -> Any:
    """A JSON file of `folder` (`folder_file`), refused with one line if it is too large, not JSON or nested more
    than MAX_JSON_DEPTH levels (Python's parser, and transformers after it, would exhaust the stack)."""
    folder_file(file, folder)
    if file.stat().st_size > MAX_JSON_BYTES:
        raise UserError(f"{file} is {file.stat().st_size:,} bytes, more than any model's JSON file; replace it")
    try:
        data = json.loads(file.read_bytes())
        if _depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    except (ValueError, RecursionError) as e:
        raise UserError(f"{file} is not a JSON file of a model folder ({str(e)[:80]}); replace it") from None
    return data


def _depth(data: Any) -> int:
    """How deeply lists and objects nest in parsed JSON (iterative: a hostile depth must not exhaust the stack)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def safetensors_shapes(file: Path) -> Shapes:
    """{tensor name: shape} of a safetensors file whose header is checked entry by entry (a known dtype, a shape
    of non-negative ints, byte offsets inside the file that span exactly the tensor): a pickle renamed, a
    malformed header or offsets past the end of the file are a UserError before any loader reads the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(9)
        length = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if len(head) < 9 or head[8:9] != b"{" or 8 + length > size or length > MAX_HEADER_BYTES:
            raise UserError(
                f"{file} is not a safetensors file (it may be a pickle renamed): refused before anything is unpickled"
            )
        f.seek(8)
        raw = f.read(length)
    data_bytes = size - 8 - length
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return {name: _entry_shape(name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, RecursionError) as e:
        raise UserError(
            f"{file} has a damaged safetensors header ({str(e)[:120]}); export or download it again"
        ) from None


def _entry_shape(name: str, entry: Any, data_bytes: int) -> tuple[int, ...]:
    """The shape of one header entry, or ValueError naming what is wrong with it."""
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
        raise ValueError(f"tensor {name[:60]!r} has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"tensor {name[:60]!r} has shape {str(shape)[:40]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets):
        raise ValueError(f"tensor {name[:60]!r} has data_offsets {str(offsets)[:40]}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise ValueError(f"tensor {name[:60]!r} lies at bytes {begin}..{end}, past the file's {data_bytes} data bytes")
    if end - begin != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
        raise ValueError(f"tensor {name[:60]!r} of shape {shape} does not span its {end - begin} bytes")
    return tuple(shape)


def load_checked(load: Callable[..., Any], model_class: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
    """`load(path, *args, **kwargs)`, a transformers `from_pretrained` of `model_class`, refusing weights that
    would build another model than the one the config describes, with one line naming the tensors: a tensor
    the model has and the files lack (transformers would initialise it at random), one the files have and the
    model lacks, one of another shape. A local folder is checked first (`check_model_folder`), and its shapes
    against the model built on the meta device, before any memory is taken for a size the config may claim.
    `ignore_mismatched_sizes=True` given by the caller lets shapes differ (those tensors are re-initialised)."""
    local = isinstance(path, (str, os.PathLike)) and Path(path).is_dir()
    accept_shapes = bool(kwargs.get("ignore_mismatched_sizes"))
    if local:
        shapes = check_model_folder(Path(path))
        if not accept_shapes:
            _check_shapes(model_class, Path(path), shapes, kwargs.get("config"))
    wants_info = kwargs.pop("output_loading_info", False)
    kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below in one line, not in transformers' table
    with _quiet(*(() if accept_shapes else LOAD_REPORTERS)):
        model, info = load(path, *args, output_loading_info=True, **kwargs)
    mismatched = {} if accept_shapes else {str(k[0]): (k[1], k[2]) for k in info.get("mismatched_keys", ())}
    ignored = [re.compile(p) for p in getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not any(p.search(k) for p in ignored)]
    check_weights_fit(str(path), info.get("missing_keys", ()), unexpected, mismatched)
    return (model, info) if wants_info else model


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Warnings of the named loggers held back, errors still shown (a filter: transformers 5 acts on its
    loggers' levels)."""
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(_errors_only)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _check_shapes(model_class: Any, path: Path, shapes: Shapes, config: Any) -> None:
    """Compare the files' shapes with those of the model the config builds, on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        config_class = getattr(model_class, "config_class", None) or AutoConfig
        config = config_class.from_pretrained(str(path))
    build = getattr(model_class, "from_config", None) or model_class._from_config
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build(config).state_dict().items()}
    mismatched = {n: (shapes[n], expected[n]) for n in sorted(set(shapes) & set(expected)) if shapes[n] != expected[n]}
    check_weights_fit(str(path), (), (), mismatched)


def check_weights_fit(where: str, missing: Any, unexpected: Any, mismatched: dict[str, tuple[Any, Any]]) -> None:
    """A UserError naming the tensors that do not fit (the first few of each kind), if any."""
    parts = []
    for kind, names in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{kind} {', '.join(names[:3])}{more}")
    for name, (found, wanted) in sorted(mismatched.items())[:3]:
        parts.append(f"{name} of shape {tuple(found)} where the model has {tuple(wanted)}")
    if parts:
        raise UserError(
            f"{where}: the weights do not build the model its config.json describes ({'; '.join(parts)}); "
            "the folder was altered or damaged: export or download it again"
        )
