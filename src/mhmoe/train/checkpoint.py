"""Checkpoints without pickle, written atomically, verified on load.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
    model.safetensors      the weights (tied weights stored once)
    optimizer.safetensors  optimiser state tensors, keyed "<param index>.<name>"
    optimizer.json         optimiser param groups and non-tensor state
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step, data position, numpy/python RNG, anything else the trainer keeps
    manifest.json          format tag and sha256 + size of every file above, written last
It is built in a temporary folder and renamed into place; `checkpoints/latest` (a one-line file,
replaced atomically) then names it. A crash at any point leaves the previous checkpoint and
`latest` intact; a truncated or foreign folder fails `verify` with a CheckpointError.

Distributed runs (`mhmoe.train.dcp`, format "mhmoe-checkpoint-dcp/1") keep the same
folder, manifest and `latest` rules; their optimiser and sharded weights are in dcp/ (resharded on
load), and model.safetensors holds the consolidated weights, so `load_model_weights` reads both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mhmoe.errors import CheckpointError
from mhmoe.io import TEMP_MARK, fsync_tree, publish_dir, write_json, write_text

FORMAT = "mhmoe-checkpoint/1"
DCP_FORMAT = "mhmoe-checkpoint-dcp/1"
FORMATS = (FORMAT, DCP_FORMAT)
LATEST = "latest"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    plain = {
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        "python": [version, list(py_state), py_gauss],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = plain["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for index, entries in state["state"].items():
        plain_state[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain_state[str(index)][name] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain_state}


def _optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(entries) for i, entries in plain["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(
    directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2
) -> Path:
    """Write checkpoint `step` under directory/, point `latest` to it, keep the newest `keep`."""
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_checkpoint(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_plain = _optimizer_parts(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "optimizer.json", opt_plain)
    rng_tensors, rng_plain = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    write_json(tmp / "state.json", {"step": step, "rng": rng_plain, **state})
    return publish_checkpoint(tmp, directory, step, keep)


def temporary_checkpoint(directory: Path, step: int, tag: str | None = None) -> Path:
    """Where checkpoint `step` is written before it is published: a hidden `.step-N.tmp-…` folder (`mhmoe.io`);
    `tag` names it for writers that must agree on one name (all ranks of a distributed run), else it is unique."""
    return directory / f".step-{step:08d}{TEMP_MARK}{tag if tag is not None else os.getpid()}"


def publish_checkpoint(tmp: Path, directory: Path, step: int, keep: int, fmt: str = FORMAT) -> Path:
    """Seal a fully written temporary folder: manifest (every file, sub-folders included) written last,
    rename to step-NNNNNNNN, point `latest` to it, keep the newest `keep`. Returns the final path."""
    final = directory / f"step-{step:08d}"
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in paths}
    write_json(tmp / "manifest.json", {"format": fmt, "step": step, "files": files})
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    publish_dir(tmp, final)
    write_text(directory / LATEST, final.name + "\n")
    _prune(directory, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    steps = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; delete {pointer} to start over")
    return path


def run_checkpoint(run_dir: Path, kind: str = "an mhmoe run directory") -> tuple[dict, Path]:
    """(the run's config.json, its latest checkpoint) of a trained run directory, or a CheckpointError saying
    what is missing."""
    config = run_dir / "config.json"
    if not config.exists():
        raise CheckpointError(f"{run_dir} is not {kind} (no config.json); pass the --out of a train run")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first")
    return json.loads(config.read_text()), checkpoint


def verify(path: Path) -> dict:
    """Check format and every file's size and sha256; return the manifest."""
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{path} is not an mhmoe checkpoint (no manifest.json): it is incomplete or foreign")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{manifest_path} is not valid JSON: the checkpoint is damaged") from None
    if manifest.get("format") not in FORMATS:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}, expected one of {FORMATS}")
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.exists() or file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file} is missing, truncated or altered: the checkpoint is damaged")
    return manifest


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Verified weights into `model` (strict: every key must match)."""
    from safetensors.torch import load_model

    verify(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit this model ({str(e).splitlines()[0]})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimiser and RNG from a verified checkpoint; return its state.json."""
    from safetensors.torch import load_file

    load_model_weights(path, model)
    if optimizer is not None and json.loads((path / "manifest.json").read_text())["format"] == DCP_FORMAT:
        raise CheckpointError(
            f"{path} was written by a distributed run; resume it with torchrun (any number of processes)"
        )
    if optimizer is not None:
        opt_plain = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), opt_plain))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
