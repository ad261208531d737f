"""Checkpoints without pickle, written atomically, verified on load.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
    model.safetensors      the weights (tied weights stored once)
    optimizer.safetensors  optimiser state tensors, keyed "<param index>.<name>"
    optimizer.json         optimiser param groups and non-tensor state
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step, data position (and the data's digests), numpy/python RNG, anything else the
                           trainer keeps
    run/                   copies of the run files the weights' meaning depends on: config.json, and the
                           tokenizer (and whatever else the task names) when the run has one
    manifest.json          format tag, sha256 + size of every file above, which run files were declared (and
                           whether the run had each), written last
It is built in a temporary folder and renamed into place; `checkpoints/latest` (a one-line file,
replaced atomically) then names it. A crash at any point leaves the previous checkpoint and
`latest` intact; a failed write removes its temporary folder. `verify` refuses a folder whose manifest is
malformed, omits a file every checkpoint has, names a file that is not there, or leaves one out, and anything
that is not a regular file (a symbolic link, a FIFO, a device): nothing outside the folder is read.
`check_run_files` refuses a run whose config.json (model and data sections) or tokenizer changed since the
checkpoint was written. `latest` must name a `step-NNNNNNNN` folder of `checkpoints/` itself; when it is missing
the newest such folder is used (with a line saying so), never a fresh start over a trained run.

Readers (`eval`, `generate`, `export-hf`, `analyze`) may run while the run trains and prunes: `reading` holds the
checkpoint `latest` names with a shared `flock` on its folder, and pruning removes only folders it can lock
exclusively (a held one is removed by a later save). A checkpoint pruned between reading `latest` and taking hold
of it is passed over for the new `latest`, so a reader never sees a checkpoint vanish under it.

Distributed runs (`mhmoe.train.dcp`, format "mhmoe-checkpoint-dcp/1") keep the same
folder, manifest and `latest` rules; their optimiser and sharded weights are in dcp/ (resharded on
load), and model.safetensors holds the consolidated weights, so `load_model_weights` reads both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mhmoe.errors import CheckpointError
from mhmoe.io import TEMP_MARK, atomic_write, fsync_tree, notice, publish_dir, write_json, write_text

FORMAT = "mhmoe-checkpoint/2"
DCP_FORMAT = "mhmoe-checkpoint-dcp/2"
# Written by mhmoe before checkpoints held copies of the run files (and, distributed, the DCP metadata in JSON):
# still verified and read, without the run-file check; a distributed one is not resumed (`mhmoe.train.dcp`).
OLD_FORMAT, OLD_DCP_FORMAT = "mhmoe-checkpoint/1", "mhmoe-checkpoint-dcp/1"
FORMATS = (FORMAT, DCP_FORMAT, OLD_FORMAT, OLD_DCP_FORMAT)
DISTRIBUTED_FORMATS = (DCP_FORMAT, OLD_DCP_FORMAT)
_SINGLE_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")
_DCP_FILES = ("model.safetensors", "state.json", "dcp/.metadata")
REQUIRED = {  # files every checkpoint of a format has; the manifest must list them
    OLD_FORMAT: _SINGLE_FILES,
    OLD_DCP_FORMAT: _DCP_FILES,
    FORMAT: _SINGLE_FILES,
    DCP_FORMAT: (*_DCP_FILES, "dcp/metadata.json"),
}
LATEST = "latest"
RUN_COPIES = "run"  # the checkpoint's sub-folder holding copies of the run files
STEP_NAME = re.compile(r"step-\d{8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(path: Path) -> str:
    """sha256 of a regular file, opened without following a symbolic link (a FIFO or device is refused, never
    read: it could block or never end)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file: a checkpoint holds only regular files")
        h = hashlib.sha256()
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
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int = 2,
    run_files: tuple[str, ...] = (),
) -> Path:
    """Write checkpoint `step` under directory/, point `latest` to it, keep the newest `keep`. run_files: names of
    files in directory's parent (the run folder) copied into the checkpoint (`publish_checkpoint`). On any
    failure the temporary folder is removed and the previous checkpoint stays `latest`."""
    from safetensors.torch import save_file, save_model

    directory.mkdir(parents=True, exist_ok=True)
    tmp = temporary_checkpoint(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(lambda f: save_model(model, f), tmp / "model.safetensors")
        opt_tensors, opt_plain = _optimizer_parts(optimizer)
        write_safetensors(lambda f: save_file(opt_tensors, f), tmp / "optimizer.safetensors")
        write_json(tmp / "optimizer.json", opt_plain)
        rng_tensors, rng_plain = rng_state()
        write_safetensors(lambda f: save_file(rng_tensors, f), tmp / "rng.safetensors")
        write_json(tmp / "state.json", {"step": step, "rng": rng_plain, **state})
        return publish_checkpoint(tmp, directory, step, keep, run_files=run_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(write: Callable[[str], None], path: Path) -> None:
    """`write(filename)` with a safetensors writer; its I/O failures (a full disk, a read-only folder) come back as
    the OSError they are (safetensors reports them as SafetensorError("... (os error 28)"))."""
    from safetensors import SafetensorError

    try:
        write(str(path))
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def temporary_checkpoint(directory: Path, step: int, tag: str | None = None) -> Path:
    """Where checkpoint `step` is written before it is published: a hidden `.step-N.tmp-…` folder (`mhmoe.io`);
    `tag` names it for writers that must agree on one name (all ranks of a distributed run), else it is unique."""
    return directory / f".step-{step:08d}{TEMP_MARK}{tag if tag is not None else os.getpid()}"


def publish_checkpoint(
    tmp: Path, directory: Path, step: int, keep: int, fmt: str = FORMAT, run_files: tuple[str, ...] = ()
) -> Path:
    """Seal a fully written temporary folder: copies of the run files (`run_files`, from directory's parent) in
    run/, the manifest (every file, sub-folders included) written last, rename to step-NNNNNNNN, point `latest`
    to it, keep the newest `keep`. Returns the final path."""
    final = directory / f"step-{step:08d}"
    declared = {}
    for name in run_files:
        source = directory.parent / name
        declared[name] = source.is_file()
        if declared[name]:
            with atomic_write(tmp / RUN_COPIES / name, "wb") as f:
                f.write(source.read_bytes())
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in paths}
    write_json(tmp / "manifest.json", {"format": fmt, "step": step, "files": files, "run_files": declared})
    fsync_tree(tmp)
    if final.exists():  # left by an abandoned later attempt (`_prune`)
        _remove_checkpoint(final, wait=True)
    publish_dir(tmp, final)
    write_text(directory / LATEST, final.name + "\n")
    _prune(directory, final, keep)
    return final


def _step_folders(directory: Path) -> list[Path]:
    """The published checkpoints of `directory` (real `step-NNNNNNNN` folders, not links), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found)


def _prune(directory: Path, newest: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to `newest`; folders after it (left by an abandoned later attempt)
    stay until a save reaches their step and replaces them, and a folder a reader holds stays until a later save
    finds it free (`reading`)."""
    steps = [p for p in _step_folders(directory) if p.name <= newest.name]
    for old in steps[:-keep]:
        _remove_checkpoint(old, wait=False)


def _remove_checkpoint(path: Path, wait: bool) -> None:
    """Remove a checkpoint folder unless a reader holds it (wait=False: leave it; wait=True: wait for the reader).
    It is first renamed to a temporary name (removed by the next `mhmoe train` if this process dies half-way),
    under the exclusive lock, so a reader either holds the whole folder or finds its name gone."""
    held = _lock_folder(path, shared=False, wait=wait)
    if held is None:
        return
    doomed = path.with_name(f".{path.name}{TEMP_MARK}pruned-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    finally:
        held.close()
    shutil.rmtree(doomed, ignore_errors=True)


class _Held:
    """An open folder and the `flock` on it (none where `fcntl` is missing); `close` releases both."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_folder(path: Path, shared: bool, wait: bool) -> _Held | None:
    """Hold a shared (readers) or exclusive (pruning) `flock` on a checkpoint folder itself: no lock file, released
    by the operating system however the holder ends. None when the folder is gone, or (wait=False) when another
    process holds a conflicting lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: nothing is locked
        return _Held(None) if path.is_dir() else None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return _Held(fd)


@contextlib.contextmanager
def reading(directory: Path) -> Iterator[Path | None]:
    """The checkpoint `latest` names (`latest_checkpoint`), held against pruning while the body reads it (None when
    there is none yet). A checkpoint pruned after `latest` was read and before it is held is passed over for the
    new `latest`: each try follows a newer save, so this ends as soon as a reader wins one race."""
    for _ in range(_TRIES):
        path = latest_checkpoint(directory)
        if path is None:
            yield None
            return
        held = _lock_folder(path, shared=True, wait=True)
        if held is None:
            continue  # pruned between reading `latest` and opening the folder
        if not _still_at(held, path):
            held.close()
            continue  # pruned while this waited for the lock
        try:
            yield path
        finally:
            held.close()
        return
    raise CheckpointError(
        f"{directory}: the latest checkpoint was replaced {_TRIES} times while this opened it; run the command again"
    )


_TRIES = 100  # attempts to hold the latest checkpoint, each lost to a newer save (a few steps of a tiny model)


def _still_at(held: _Held, path: Path) -> bool:
    """Whether the folder `held` is open on is still the one at `path` (not pruned, not replaced)."""
    if held.fd is None:
        return path.is_dir()
    try:
        now, then = os.stat(path), os.fstat(held.fd)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (then.st_dev, then.st_ino)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet.

    `latest` must name a step-NNNNNNNN folder of `directory` itself (no path, no link); anything else is a
    CheckpointError. When `latest` is missing but checkpoints exist (a kill between publishing a checkpoint and
    pointing `latest` at it, or a deleted pointer), the newest one is used, with a line saying so. The folders
    are listed before `latest` is read, so a name absent from the list was published (or pruned) meanwhile by a
    training run: it is looked up again, and only a name absent twice is refused.
    """
    pointer, seen = directory / LATEST, None
    while True:
        steps = _step_folders(directory)
        if not pointer.exists() and not pointer.is_symlink():
            if steps:
                notice(f"{pointer} is missing; using the newest checkpoint, {steps[-1].name}")
                return steps[-1]
            return None
        name = _read_pointer(pointer)
        path = directory / name
        if path in steps:
            return path
        if name == seen:
            newest = f"resume from the newest one ({steps[-1].name})" if steps else "start over"
            raise CheckpointError(
                f"{pointer} names {name}, which is not a checkpoint folder of {directory}; delete {pointer} to {newest}"
            )
        seen = name


def _read_pointer(pointer: Path) -> str:
    """The step-NNNNNNNN name `latest` holds, or a CheckpointError saying why it cannot be used."""
    damaged = f"{pointer} must hold the name of a checkpoint folder (step-NNNNNNNN)"
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{damaged}, but it is not a regular file; delete it to resume from the newest one")
    data = pointer.read_bytes()[:64]
    try:
        name = data.decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not STEP_NAME.fullmatch(name):
        shown = repr(name)[:40] if name is not None else "binary data"
        raise CheckpointError(f"{damaged}, but it holds {shown}; delete it to resume from the newest checkpoint")
    return name


@contextlib.contextmanager
def run_checkpoint(run_dir: Path, kind: str = "an mhmoe run directory") -> Iterator[tuple[dict, Path]]:
    """(the run's config.json, its latest checkpoint) of a trained run directory, verified, its run files checked
    against the checkpoint's copies (`check_run_files`); or a CheckpointError saying what is wrong. The checkpoint
    is held while the body reads it (`reading`): a run training meanwhile does not prune it."""
    config = run_dir / "config.json"
    if not config.exists():
        raise CheckpointError(f"{run_dir} is not {kind} (no config.json); pass the --out of a train run")
    with reading(run_dir / "checkpoints") as checkpoint:
        if checkpoint is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first")
        check_run_files(run_dir, checkpoint, verify(checkpoint))
        yield read_json(config, "the run's configuration"), checkpoint


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content; a file that is not JSON is a CheckpointError naming it."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} ({what}) is not valid JSON: it is damaged") from None


# ---------------------------------------------------------------------------------------------- checking


def verify(path: Path) -> dict:
    """Check the manifest (structure, format, the files every checkpoint of its format has), that the folder holds
    exactly the files it lists, all regular files, and each file's size and sha256; return the manifest.

    A result is remembered for as long as no file of the folder changes (size, time, inode), so a checkpoint
    read twice in a process is hashed once."""
    files = _checkpoint_files(path)
    key = (str(path.resolve()), tuple(sorted((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in files.items())))
    if key in _VERIFIED:
        return _VERIFIED[key]
    manifest = _read_manifest(path)
    listed = manifest["files"]
    required = [
        *REQUIRED[manifest["format"]],
        *(f"{RUN_COPIES}/{n}" for n, held in manifest["run_files"].items() if held),
    ]
    missing = [name for name in required if name not in listed]
    if missing:
        raise CheckpointError(
            f"{path / 'manifest.json'} does not list {', '.join(missing)}: the checkpoint is damaged or was altered"
        )
    unlisted = sorted(set(files) - set(listed) - {"manifest.json"})
    if unlisted:
        raise CheckpointError(f"{path / unlisted[0]} is not listed in the manifest: the checkpoint was altered")
    for name, meta in sorted(listed.items()):
        file = path / name
        if name not in files or files[name].st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file} is missing, truncated or altered: the checkpoint is damaged")
    _VERIFIED[key] = manifest
    return manifest


_VERIFIED: dict[tuple, dict] = {}


def _checkpoint_files(path: Path) -> dict[str, os.stat_result]:
    """{relative name: lstat} of every file under the checkpoint folder, without following links; a link, a FIFO,
    a device or a socket anywhere is a CheckpointError."""
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (a symbolic link or not a folder)")
    files = {}
    for root, dirs, names in os.walk(path, followlinks=False):
        for name in dirs + names:
            entry = Path(root) / name
            info = entry.lstat()
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
                raise CheckpointError(f"{entry} is {kind}: a checkpoint holds only regular files; it was altered")
            files[entry.relative_to(path).as_posix()] = info
    return files


def _read_manifest(path: Path) -> dict:
    """manifest.json, checked to have the structure `publish_checkpoint` writes (a CheckpointError otherwise)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not an mhmoe checkpoint (no manifest.json): it is incomplete or foreign")
    manifest = read_json(manifest_path, "the checkpoint's manifest")
    damaged = f"{manifest_path} is malformed: the checkpoint is damaged or was altered"
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{damaged} (not a JSON object)")
    if manifest.get("format") not in FORMATS:
        raise CheckpointError(f"{path} has format {str(manifest.get('format'))[:40]!r}, expected one of {FORMATS}")
    files, step = manifest.get("files"), manifest.get("step")
    if not isinstance(files, dict) or not all(_is_entry(meta) for meta in files.values()):
        raise CheckpointError(f"{damaged} (its files must map names to their sha256 and size)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{damaged} (step {str(step)[:20]!r} is not a number of steps)")
    if STEP_NAME.fullmatch(path.name) and int(path.name[5:]) != step:
        raise CheckpointError(f"{damaged} (it is for step {step}, the folder is {path.name})")
    run_files = manifest.setdefault("run_files", {})
    if not isinstance(run_files, dict) or not all(isinstance(v, bool) and _plain_name(n) for n, v in run_files.items()):
        raise CheckpointError(f"{damaged} (run_files must map file names to true or false)")
    return manifest


def _is_entry(meta: Any) -> bool:
    return (
        isinstance(meta, dict)
        and isinstance(meta.get("sha256"), str)
        and _SHA256.fullmatch(meta["sha256"]) is not None
        and isinstance(meta.get("bytes"), int)
        and not isinstance(meta["bytes"], bool)
    )


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def check_run_files(run_dir: Path, checkpoint: Path, manifest: dict) -> None:
    """The run folder's files still mean what they meant when `checkpoint` was written: config.json's model and
    data sections (data.path aside: the data's content is checked by digest) equal the checkpoint's copy, and
    each other declared file (the tokenizer) is the same bytes, or absent if the run had none. `train.*` may
    change (e.g. train.max_steps to train longer)."""
    if manifest["format"] not in (FORMAT, DCP_FORMAT):
        return  # written before checkpoints held the run files: nothing to compare with
    declared = manifest["run_files"]
    if not declared.get("config.json"):
        raise CheckpointError(f"{checkpoint} holds no copy of the run's config.json: the checkpoint was altered")
    for name, held in declared.items():
        live, copy = run_dir / name, checkpoint / RUN_COPIES / name
        if name == "config.json":
            _check_config(live, copy, checkpoint)
        elif held and not live.is_file():
            raise CheckpointError(f"{live} is missing: {checkpoint.name} was trained with it; restore it from {copy}")
        elif held and _sha256(live) != manifest["files"][f"{RUN_COPIES}/{name}"]["sha256"]:
            raise CheckpointError(f"{live} is not the file {checkpoint.name} was trained with; restore it from {copy}")
        elif not held and (live.exists() or live.is_symlink()):
            raise CheckpointError(f"{live} appeared after {checkpoint.name} was written (the run had none): remove it")


def _check_config(live: Path, copy: Path, checkpoint: Path) -> None:
    now, then = read_json(live, "the run's configuration"), read_json(copy, "the checkpoint's configuration")
    if not isinstance(now, dict) or not isinstance(then, dict):
        raise CheckpointError(f"{live} is not a run configuration (a JSON object)")
    diffs = config_differences(then, now)
    if diffs:
        raise CheckpointError(
            f"{live} differs from the configuration {checkpoint.name} was trained with ({', '.join(diffs[:4])}): "
            f"the weights would be read as another model; restore it from {copy} or train a new run"
        )


MEANINGLESS = ("train", "parallel")  # sections of a run configuration that do not change what the weights mean


def config_differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two run configurations (dicts), outside `MEANINGLESS` sections and
    data.path (where the data is, not what it is)."""
    diffs = []
    for key in sorted(set(then) | set(now)):
        dotted = f"{prefix}{key}"
        if (not prefix and key in MEANINGLESS) or dotted == "data.path":
            continue
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{dotted}.")
        elif a != b:
            diffs.append(dotted)
    return diffs


# ---------------------------------------------------------------------------------------------- loading


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Verified weights into `model` (strict: every key must match)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    verify(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except SafetensorError as e:
        raise CheckpointError(f"{path / 'model.safetensors'} is not a safetensors file ({e}): it is damaged") from None
    except RuntimeError as e:  # "Error(s) in loading state_dict for GPT:" then one line per mismatch
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: weights do not fit this model ({lines[min(1, len(lines) - 1)]})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimiser and RNG from a verified checkpoint; return its state.json."""
    load_model_weights(path, model)
    if optimizer is not None and verify(path)["format"] in DISTRIBUTED_FORMATS:
        raise CheckpointError(
            f"{path} was written by a distributed run; resume it with torchrun (any number of processes)"
        )
    try:
        if optimizer is not None:
            opt_plain = read_json(path / "optimizer.json", "optimiser state")
            optimizer.load_state_dict(_optimizer_state(_load_tensors(path / "optimizer.safetensors"), opt_plain))
        state = read_json(path / "state.json", "trainer state")
        set_rng_state(_load_tensors(path / "rng.safetensors"), state["rng"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path} holds a state this model and optimiser cannot take ({e!r:.120})") from None
    return state


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}): it is damaged") from None
