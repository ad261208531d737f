"""Distributed checkpoints: resharded on load, consolidated for single-process use, crash-safe.

A checkpoint folder `checkpoints/step-NNNNNNNN/` of a distributed run holds
    dcp/                 torch.distributed.checkpoint: model and optimiser state by global offsets
                         (expert weights are DTensors), so it loads at any world and expert-parallel size;
                         dcp/metadata.json is that checkpoint's metadata in JSON (below)
    model.safetensors    the consolidated weights (experts gathered, tied weights once): what
                         `mhmoe eval`, `load_model_weights` or plain safetensors read, no torch.distributed
    rng/rank-NNNNN.*     each rank's generator states (restored when the world size is unchanged)
    state.json           step, data position, world and expert-parallel size
    run/, manifest.json  written last, by rank 0, after every rank has finished (`mhmoe.train.checkpoint`)
Every rank writes into one temporary folder; rank 0 publishes it only after a barrier (rename + `latest`),
so a rank that dies mid-save leaves the previous checkpoint and `latest` untouched.

Nothing is unpickled on load. torch.distributed.checkpoint keeps its metadata in dcp/.metadata, a pickle, and
stores non-tensor values (the optimiser's lr, betas, ...) as pickles read with `weights_only=False`; a crafted
checkpoint would run code through either, whatever its manifest says (anyone can re-hash one). So the metadata
is also written as dcp/metadata.json, and loading reads that (`SafeReader`; .metadata stays for other DCP tools
and is never read), with every value loaded under `weights_only=True` (`SafePlanner`). A checkpoint of format
"mhmoe-checkpoint-dcp/1" has no metadata.json and is not resumed (its model.safetensors still evaluates).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from mhmoe.errors import CheckpointError
from mhmoe.io import write_json
from mhmoe.train.checkpoint import (
    DCP_FORMAT,
    DISTRIBUTED_FORMATS,
    publish_checkpoint,
    read_json,
    rng_state,
    set_rng_state,
    temporary_checkpoint,
    verify,
    write_safetensors,
)

METADATA_JSON = "metadata.json"
_SHARD_NAME = re.compile(r"__\d+_\d+\.distcp")


def consolidated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of model's state dict (a collective: call on every rank); tied weights once."""
    owners: dict[int, str] = {}
    aliases = set()  # later names of a parameter already listed (lm_head.weight tied to embed.weight)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            aliases.add(name)
        owners.setdefault(id(p), name)
    full = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if name not in aliases:
            full[name] = t.detach().cpu().contiguous()
    return full


def save_distributed(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int = 2,
    run_files: tuple[str, ...] = (),
) -> Path:
    """Every rank: write checkpoint `step` (module doc); rank 0 publishes it. Returns its final path."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = temporary_checkpoint(directory, step, tag="dcp")  # one name for every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    metadata = dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    _save_rng(tmp / "rng", rank)
    full = consolidated_state(model)
    if rank == 0:
        from safetensors.torch import save_file

        write_json(tmp / "dcp" / METADATA_JSON, metadata_to_json(metadata))
        write_safetensors(lambda f: save_file(full, f), tmp / "model.safetensors")
        write_json(tmp / "state.json", {"step": step, "world_size": world, **state})
    dist.barrier()  # every rank's files are complete
    final = directory / f"step-{step:08d}"
    if rank == 0:
        publish_checkpoint(tmp, directory, step, keep, DCP_FORMAT, run_files)
    dist.barrier()  # nobody reads `latest` before it names this checkpoint
    return final


def _save_rng(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, plain = rng_state()
    write_safetensors(lambda f: save_file(tensors, f), folder / f"rank-{rank:05d}.safetensors")
    write_json(folder / f"rank-{rank:05d}.json", plain)


def _verify_on_rank0(path: Path) -> dict:
    """verify() once (it hashes every file), the verdict shared, so all ranks fail alike."""
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            verdict[0] = verify(path)
        except CheckpointError as e:
            verdict[0] = str(e)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CheckpointError(verdict[0])
    if verdict[0]["format"] not in DISTRIBUTED_FORMATS:
        raise CheckpointError(f"{path} was written by a single-process run; resume it without torchrun")
    if verdict[0]["format"] != DCP_FORMAT:
        raise CheckpointError(
            f"{path} was written by an older mhmoe whose distributed checkpoints keep their metadata only as a pickle "
            "(dcp/.metadata), which mhmoe does not load; evaluate its model.safetensors, or resume it with the "
            "mhmoe that wrote it"
        )
    return verdict[0]


def load_distributed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Every rank: restore model (and optimiser) from a distributed checkpoint, resharded to this layout.

    Generator states come back when the world size is the one that saved; returns state.json with
    "rng_restored" added.
    """
    _verify_on_rank0(path)
    safe = dict(storage_reader=SafeReader(path / "dcp"), planner=SafePlanner())
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, **safe)
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        both: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(both, **safe)
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    state = read_json(path / "state.json", "trainer state")
    rank = dist.get_rank()
    rng_file = path / "rng" / f"rank-{rank:05d}.safetensors"
    state["rng_restored"] = state.get("world_size") == dist.get_world_size() and rng_file.exists()
    if state["rng_restored"]:
        from safetensors.torch import load_file

        set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    return state


# ------------------------------------------------------------------------ the metadata, without pickle


class SafeReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader, with the metadata read from our metadata.json instead of the
    pickled .metadata."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        folder = Path(self.path)
        metadata = metadata_from_json(read_json(folder / METADATA_JSON, "distributed checkpoint metadata"), folder)
        assert metadata.storage_meta is not None  # metadata_from_json always sets it
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (the optimiser's lr, betas, ...) loaded under weights_only=True:
    plain numbers, strings, tuples and lists load, a crafted object does not."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # an UnpicklingError, or whatever a damaged value raises: nothing was executed
            fqn = read_item.dest_index.fqn
            raise CheckpointError(
                f"{fqn} of a distributed checkpoint is refused ({str(e).splitlines()[0]:.100})"
            ) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the value loaded safely
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def metadata_to_json(metadata: Metadata) -> dict:
    """A DCP Metadata as plain JSON: per entry its dtype, size and chunks (or "bytes"), where each piece is stored,
    and the planner's key paths."""
    entries: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            entries[fqn] = "bytes"
        else:
            props = item.properties
            entries[fqn] = {
                "dtype": str(props.dtype).removeprefix("torch."),
                "requires_grad": props.requires_grad,
                "size": list(item.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in item.chunks],
            }
    storage = [
        [index.fqn, None if index.offset is None else list(index.offset), index.index,
         info.relative_path, info.offset, info.length, list(info.transform_descriptors or [])]
        for index, info in metadata.storage_data.items()
    ]  # fmt: skip
    planner = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    modules = metadata.storage_meta.modules if metadata.storage_meta is not None else []
    return {"version": metadata.version, "entries": entries, "storage": storage, "planner": planner, "modules": modules}


def metadata_from_json(data: Any, folder: Path) -> Metadata:
    """The Metadata `metadata_to_json` wrote; a malformed one, or one whose pieces are not shard files of `folder`,
    is a CheckpointError."""
    try:
        entries: dict[str, Any] = {}
        for fqn, item in data["entries"].items():
            entries[str(fqn)] = BytesStorageMetadata() if item == "bytes" else _tensor_metadata(item)
        storage = {}
        for fqn, offset, index, file, start, length, transforms in data["storage"]:
            if not isinstance(file, str) or not _SHARD_NAME.fullmatch(file) or not (folder / file).is_file():
                raise ValueError(f"piece of {fqn} stored in {str(file)[:40]!r}, not a shard file of {folder}")
            key = MetadataIndex(str(fqn), None if offset is None else [int(o) for o in offset], index)
            storage[key] = _StorageInfo(file, int(start), int(length), [str(t) for t in transforms] or None)
        planner = {str(k): tuple(p if isinstance(p, int) else str(p) for p in v) for k, v in data["planner"].items()}
        modules = [str(m) for m in data["modules"]]
        version = None if data["version"] is None else str(data["version"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{folder / METADATA_JSON} is malformed ({e!s:.120}): the checkpoint is damaged"
        ) from None
    return Metadata(entries, planner, storage, StorageMeta(modules=modules), version)


def _tensor_metadata(item: dict) -> TensorStorageMetadata:
    dtype = getattr(torch, item["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {str(item['dtype'])[:20]!r}")
    chunks = [ChunkStorageMetadata(torch.Size(map(int, o)), torch.Size(map(int, s))) for o, s in item["chunks"]]
    properties = TensorProperties(dtype=dtype, requires_grad=bool(item["requires_grad"]))
    return TensorStorageMetadata(properties, torch.Size(map(int, item["size"])), chunks)
