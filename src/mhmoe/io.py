"""Writing files so that a crash, a full disk or a second reader never sees half of one; and the environment record.

Every file mhmoe writes (run configs, metrics snapshots, checkpoints, token caches, tokenizers, plots, results)
goes through `atomic_write`: a temporary file in the same folder (named `.NAME.tmp-PID-RANDOM`), flushed and
fsynced, renamed over the target, and the folder fsynced, so the target is either the old file or the new one.
Folders are published the same way (`publish_dir`). `is_temporary` recognises what a killed writer leaves behind,
and `remove_temporaries` clears it away. `lock_run` keeps a second writer out of a run folder. `signals_raise` and
`StopRequest` turn SIGINT and SIGTERM into an exception (so every cleanup runs) or into a request to stop at a
safe point.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mhmoe.errors import Interrupted, UserError
from mhmoe.version import __version__

TEMP_MARK = ".tmp-"  # in every temporary name this module makes, and in no final name


def temporary_name(path: Path) -> Path:
    """A fresh temporary sibling of `path`: `.NAME.tmp-PID-RANDOM`."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file or folder of this module (or of a checkpoint being written)."""
    return path.name.startswith(".") and TEMP_MARK in path.name


def notice(message: str) -> None:
    """One line to stderr, for what the user should know but need not act on (e.g. what was cleaned up)."""
    print(f"mhmoe: {message}", file=sys.stderr, flush=True)


def remove_temporaries(folder: Path, who: str) -> list[str]:
    """Delete the temporary files and folders a killed or failed writer left directly in `folder` (names with
    TEMP_MARK, `is_temporary`), with a line naming them and `who` left them; return their names. Call it only while
    no other process writes there (under `lock_run`)."""
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if is_temporary(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        notice(f"removed {len(removed)} unfinished temporary file(s) {who} left in {folder}: "
               f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")  # fmt: skip
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path` (fsynced), on an exception
    it is removed and `path` is left as it was. The parent folder is created if needed."""
    path = Path(path)
    if "w" not in mode and "x" not in mode:
        raise ValueError(f"atomic_write writes files; got mode {mode!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike[str], data: Any, indent: int = 1) -> None:
    """`data` as JSON with a final newline, atomically."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def staging_dir(path: Path) -> Path:
    """A new temporary sibling folder in which to build what becomes `path` (`publish_dir`), after checking that
    `path` does not hold anything yet: outputs are never overwritten or mixed with what was there."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; pass a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written folder into place (an empty `final` is replaced) and make the rename durable."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Build the folder `path` aside: yields a new temporary sibling (`staging_dir`) that is renamed into place
    (`publish_dir`) when the body succeeds and removed when it fails, so `path` is whole or absent."""
    tmp = staging_dir(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, path)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (before publishing it)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for sub in {p.parent for p in folder.rglob("*")} | {folder}:
        fsync_dir(sub)


class RunInUse(UserError):
    """Another live process holds the folder's lock."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_run(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `folder` (its `.lock` file) while the body runs.

    The lock is an `flock` on the file, so the operating system releases it when the holder exits, however it
    exits (a kill included): a lock file left by a dead process is stale by construction and is simply taken
    over. The file records the holder (pid, host, command, start time), which the error names. A body that
    leaves nothing else in the folder (a start that failed) leaves no lock file either, nor the folder if this
    call made it. Where `fcntl` is missing (Windows) nothing is locked.
    """
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = folder / LOCK_FILE
    fd = _locked(path, fcntl)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        if [p.name for p in folder.iterdir()] == [LOCK_FILE]:  # removed while still held (`_locked` checks)
            path.unlink()
            if made:
                folder.rmdir()
        os.close(fd)  # releases the flock


def _locked(path: Path, fcntl: Any) -> int:
    """An open descriptor of `path`, flocked. A holder that removes the file on leaving (`lock_run`) may do so
    between our open and our flock: then the lock is on a file no longer there, and we open the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUse(
                f"{path.parent} is in use by {_holder(path)}; wait for it to finish or pass another folder"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(lock_file: Path) -> str:
    """Who holds a lock, in words, from its file ("another process" if the file cannot be read)."""
    try:
        holder = json.loads(lock_file.read_text())
        program = Path(holder["command"][0]).name
        program = "python -m mhmoe" if program == "__main__.py" else program
        command = " ".join([program, *holder["command"][1:]])[:100]
        return f"process {holder['pid']} on {holder['host']} (`{command}`, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "another process"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0  # a second SIGINT sooner than this is the same stop (torchrun passes the terminal's Ctrl-C on again)


def _install(handler: Any) -> dict[int, Any]:
    """`handler` for SIGINT and SIGTERM, except one the parent set to be ignored (`nohup`, `cmd &`); the previous
    handlers, to restore. Nothing outside the main thread (where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: one not set from Python


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While the body runs, SIGTERM raises `Interrupted` as SIGINT does (a KeyboardInterrupt), so the cleanups of
    every `finally` and `except BaseException` run on the stop a cluster sends as on Ctrl-C: temporary files and
    working folders are removed, locks released."""

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = _install(stop)
    try:
        yield
    finally:
        _restore(previous)


class StopRequest:
    """While in its `with` block, SIGINT and SIGTERM ask to stop instead of raising: `signum` is set (with a line
    saying so) and the holder stops at its next safe point (the training loop: after the current step, saved).
    A second SIGINT (REPEAT_S or more later) raises `Interrupted` at once; a repeated SIGTERM changes nothing."""

    def __init__(self, what: str, announce: bool = True):
        self.what = what  # what happens now, for the line: "finishing the current step and saving it"
        self.announce = announce  # whether to print that line (one rank of several does)
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        _restore(self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            if self.announce:  # os.write, not print: a handler may run in the middle of another write to stderr
                os.write(2, f"mhmoe: {signal.Signals(signum).name}: {self.what}{again}\n".encode())
        elif signum == signal.SIGINT and time.monotonic() - self._at >= REPEAT_S:
            raise Interrupted(signum)


def git_commit() -> str:
    """The commit of the mhmoe checkout this runs from, or "unknown" (an installed package has none)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: Any = None, **extra: Any) -> dict:
    """What a run or a benchmark ran on: versions, machine, device, threads, command, date (+ `extra`)."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    env = {
        "mhmoe": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        # how idle OpenMP threads wait (mhmoe.train.threads; the command line sets OMP_WAIT_POLICY=PASSIVE)
        "openmp_wait": {
            k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME") if k in os.environ
        },
        "command": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return {**env, **extra}
