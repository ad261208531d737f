"""Distributed checkpoints: resharded on load, consolidated for single-process use, crash-safe.

A checkpoint folder `checkpoints/step-NNNNNNNN/` of a distributed run holds
    dcp/                 torch.distributed.checkpoint: model and optimiser state by global offsets
                         (expert weights are DTensors), so it loads at any world and expert-parallel size
    model.safetensors    the consolidated weights (experts gathered, tied weights once): what
                         `mhmoe eval`, `load_model_weights` or plain safetensors read, no torch.distributed
    rng/rank-NNNNN.*     each rank's generator states (restored when the world size is unchanged)
    state.json           step, data position, world and expert-parallel size
    manifest.json        written last, by rank 0, after every rank has finished (`mhmoe.train.checkpoint`)
Every rank writes into one temporary folder; rank 0 publishes it only after a barrier (rename + `latest`),
so a rank that dies mid-save leaves the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
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
    publish_checkpoint,
    rng_state,
    set_rng_state,
    temporary_checkpoint,
    verify,
)


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
    directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2
) -> Path:
    """Every rank: write checkpoint `step` (module doc); rank 0 publishes it. Returns its final path."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = temporary_checkpoint(directory, step, tag="dcp")  # one name for every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    _save_rng(tmp / "rng", rank)
    full = consolidated_state(model)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(full, str(tmp / "model.safetensors"))
        write_json(tmp / "state.json", {"step": step, "world_size": world, **state})
    dist.barrier()  # every rank's files are complete
    final = directory / f"step-{step:08d}"
    if rank == 0:
        publish_checkpoint(tmp, directory, step, keep, DCP_FORMAT)
    dist.barrier()  # nobody reads `latest` before it names this checkpoint
    return final


def _save_rng(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, plain = rng_state()
    save_file(tensors, str(folder / f"rank-{rank:05d}.safetensors"))
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
    if verdict[0]["format"] != DCP_FORMAT:
        raise CheckpointError(f"{path} was written by a single-process run; resume it without torchrun")
    return verdict[0]


def load_distributed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Every rank: restore model (and optimiser) from a distributed checkpoint, resharded to this layout.

    Generator states come back when the world size is the one that saved; returns state.json with
    "rng_restored" added.
    """
    _verify_on_rank0(path)
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        both: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(both, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    state = json.loads((path / "state.json").read_text())
    rank = dist.get_rank()
    rng_file = path / "rng" / f"rank-{rank:05d}.safetensors"
    state["rng_restored"] = state.get("world_size") == dist.get_world_size() and rng_file.exists()
    if state["rng_restored"]:
        from safetensors.torch import load_file

        set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    return state
