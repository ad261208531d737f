"""The reliability contract of a run folder, as tests: what survives a kill, a full disk, a corrupt or hostile
folder and a second process, and the exact line the user reads when something is refused (README, "Reliability").

- Kills: `mhmoe train` in a child process is SIGKILLed at a fault point drawn at random (seeded) among the ~100
  fsyncs, renames, optimiser steps and metrics lines of a 6-step run (tests/fault_driver.py); the run is then
  resumed and must end bit for bit where an uninterrupted run ends: same losses, same weights. The default part
  draws three points; `pytest -m slow` draws many more and kills at random times too.
- A full disk: the checkpoint or the metrics writer fails with ENOSPC (patched), and a real per-file size limit
  (RLIMIT_FSIZE, no root needed) makes the safetensors writer itself fail; one line, the previous checkpoint
  intact, no temporary left, and the run resumes as if nothing happened.
- Corrupt and hostile folders: every altered manifest, pointer, file or run file is refused with one line before
  anything is loaded, and a refused command changes nothing.
- Two processes: the second `mhmoe train` on a folder is refused with the holder's pid; the lock of a killed
  holder is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import english_documents
from safetensors.torch import load_file

import mhmoe
from mhmoe.cli import main
from mhmoe.data import ByteTokenizer

DRIVER = Path(__file__).with_name("fault_driver.py")
STEPS = 6  # a full run; checkpoints every 2 steps


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One token cache for the module (content-addressed, so runs share it safely)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("MHMOE_CACHE", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """train.threads=1 (here, for identical numbers in and out of process) must not slow the rest of the suite."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return english_documents(tmp_path_factory.mktemp("corpus"), 12, 10_000)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A tokenizer.json of the user's (the byte tokenizer's), so that the run keeps one: a run file to protect."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    ByteTokenizer().save(path)
    return path


def train_args(corpus: Path, out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    settings = [f"train.max_steps={steps}", "train.checkpoint_every=2", "train.eval_batches=2", "train.log_every=1",
                "train.threads=1", *extra]  # fmt: skip
    return ["train", "--preset", "cpu-tiny", "--data", str(corpus), "--out", str(out), "--no-progress"] + [
        item for kv in settings for item in ("--set", kv)
    ]


def cli(capsys, args: list[str]) -> tuple[int, str]:
    """Exit status and stderr of `mhmoe ARGS`; a refusal must be exactly one line."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("mhmoe: error:")]
        assert len(lines) == 1 and err.endswith(lines[0]), err
    return code, err


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def assert_same_run(run: Path, reference: Path) -> None:
    """Nothing lost: the run ended where the uninterrupted one did, bit for bit."""
    assert losses(run) == losses(reference)
    expected = final_weights(reference)
    for name, tensor in final_weights(run).items():
        assert torch.equal(tensor, expected[name]), name


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for folder in (run, run / "checkpoints") if folder.is_dir() for p in folder.iterdir()
                  if ".tmp-" in p.name)  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}  # fmt: skip


def child_env() -> dict[str, str]:
    source = str(Path(mhmoe.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run, made in this process."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(corpus, run)) == 0
    return run


@pytest.fixture(scope="module")
def pristine(corpus, tokenizer_file, tmp_path_factory) -> Path:
    """A 4-step run with a tokenizer.json, to be copied and damaged."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    assert main(train_args(corpus, run, 4, f"data.tokenizer={tokenizer_file}")) == 0
    assert (run / "tokenizer.json").is_file()
    return run


# ------------------------------------------------------------------------------------------------------ kills


def kill_and_resume(corpus: Path, reference: Path, run: Path, kill_at: int) -> None:
    """Kill a child `mhmoe train` at fault point `kill_at`, check what it left, resume here, compare."""
    child = subprocess.run([sys.executable, str(DRIVER), str(kill_at), "--", *train_args(corpus, run)],
                           env=child_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, (kill_at, child.stdout, child.stderr[-2000:])
    checkpoints = run / "checkpoints"
    if (checkpoints / "latest").exists():  # whatever `latest` names is complete
        step = (checkpoints / "latest").read_text().strip()
        assert (checkpoints / step / "manifest.json").is_file()
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)
    assert temporaries(run) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_kill_at_a_random_fault_point_loses_nothing(corpus, reference, tmp_path, seed):
    kill_and_resume(corpus, reference, tmp_path / "run", random.Random(seed).randint(1, 100))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 23))
def test_soak_kills_at_random_fault_points(corpus, reference, tmp_path, seed):
    kill_and_resume(corpus, reference, tmp_path / "run", random.Random(seed).randint(1, 100))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_soak_kills_at_random_times(corpus, reference, tmp_path, seed):
    """SIGKILL from outside after a random delay (most land in start-up or training), then resume."""
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "mhmoe", *train_args(corpus, run)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(random.Random(seed).uniform(2.0, 8.0))
    child.kill()
    child.wait()
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


def test_a_kill_between_publishing_a_checkpoint_and_pointing_latest_at_it(corpus, reference, tmp_path, capsys):
    """The one window where `latest` lags a complete checkpoint (or `latest` was deleted): the newest checkpoint
    is used, with a line saying so; training never starts over on top of a trained run."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)  # as it was when killed right after publishing step 4
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "checkpoints" / "latest").unlink()
    code, err = cli(capsys, ["eval", str(run)])
    assert (
        code == 0 and f"{run / 'checkpoints' / 'latest'} is missing; using the newest checkpoint, step-00000004" in err
    )
    code, err = cli(capsys, train_args(corpus, run))
    assert code == 0 and "using the newest checkpoint, step-00000004" in err
    assert_same_run(run, reference)


# -------------------------------------------------------------------------------------------------- full disk


def enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_writing_a_checkpoint(corpus, reference, tmp_path, capsys, monkeypatch):
    import mhmoe.train.checkpoint as checkpoint

    original = checkpoint.write_safetensors

    def full_at_step_4(write, path):  # type: ignore[no-untyped-def]
        if ".step-00000004" in str(path) and path.name == "optimizer.safetensors":
            path.write_bytes(b"the first bytes of it")
            raise enospc(path)
        return original(write, path)

    monkeypatch.setattr(checkpoint, "write_safetensors", full_at_step_4)
    run = tmp_path / "run"
    code, err = cli(capsys, train_args(corpus, run))
    assert code == 2 and "mhmoe: error: no space left on device: " in err and "optimizer.safetensors; free some" in err
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002\n"
    assert temporaries(run) == [] and not (run / "checkpoints" / "step-00000004").exists()
    monkeypatch.setattr(checkpoint, "write_safetensors", original)
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


def test_a_full_disk_while_writing_metrics(corpus, reference, tmp_path, capsys, monkeypatch):
    from mhmoe.train.metrics import MetricsLog

    original = MetricsLog.write

    def full_at_step_5(self, record):  # type: ignore[no-untyped-def]
        if record["step"] == 5:
            self._jsonl_file.write('{"step": 5, "lo')  # what a full disk leaves: part of a line
            self._jsonl_file.flush()
            raise enospc(self.jsonl)
        return original(self, record)

    monkeypatch.setattr(MetricsLog, "write", full_at_step_5)
    run = tmp_path / "run"
    code, err = cli(capsys, train_args(corpus, run))
    assert code == 2 and f"mhmoe: error: no space left on device: {run / 'metrics.jsonl'}; free some space" in err
    monkeypatch.setattr(MetricsLog, "write", original)
    code, err = cli(capsys, train_args(corpus, run))
    assert code == 0 and f"{run / 'metrics.jsonl'}: dropped 1 incomplete line(s)" in err
    assert_same_run(run, reference)


def test_a_file_size_limit_makes_the_safetensors_writer_fail(corpus, reference, tmp_path):
    """A real operating-system failure inside the (Rust) safetensors writer: RLIMIT_FSIZE below the optimiser
    file's size (~860 KB) and above every other file's. safetensors reports it as its own error; mhmoe says
    what happened, removes the temporary checkpoint, and a later run trains normally."""
    run = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    child = subprocess.run([sys.executable, "-m", "mhmoe", *train_args(corpus, run)], env=child_env(),
                           capture_output=True, text=True, timeout=300, preexec_fn=limit)  # fmt: skip
    assert child.returncode == 2, child.stderr[-2000:]
    assert child.stderr.strip().splitlines()[-1] == (
        "mhmoe: error: file too large for this process's file-size limit (ulimit -f): "
        f"{run / 'checkpoints' / f'.step-00000002.tmp-{child_pid(child)}' / 'optimizer.safetensors'}; raise the limit"
    )
    assert temporaries(run) == [] and not (run / "checkpoints" / "latest").exists()
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


def child_pid(child: subprocess.CompletedProcess) -> str:
    """The pid in the temporary checkpoint name the child's error line names."""
    line = child.stderr.strip().splitlines()[-1]
    return line.split(".step-00000002.tmp-")[1].split("/")[0]


# ------------------------------------------------------------------------------ corrupt and hostile folders


def rewrite_manifest(checkpoint: Path, change) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "manifest.json").write_text(json.dumps(change(manifest)))


def entry(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


def edit_config(run: Path, **moe: object) -> None:
    config = json.loads((run / "config.json").read_text())
    config["model"]["ffn"]["moe"].update(moe)
    (run / "config.json").write_text(json.dumps(config, indent=1))


def flip_byte(path: Path, at: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _empty_manifest(run: Path, ck: Path) -> None:
    rewrite_manifest(ck, lambda m: {**m, "files": {}})
    flip_byte(ck / "model.safetensors")


def _outside_entry(run: Path, ck: Path) -> None:
    rewrite_manifest(ck, lambda m: {**m, "files": {**m["files"], "../../config.json": entry(run / "config.json")}})


def _dev_zero_entry(run: Path, ck: Path) -> None:
    rewrite_manifest(ck, lambda m: {**m, "files": {**m["files"], "/dev/zero": {"sha256": "0" * 64, "bytes": 0}}})


def _linked_weights(run: Path, ck: Path) -> None:
    outside = run.parent / "weights-elsewhere.safetensors"
    shutil.move(ck / "model.safetensors", outside)
    (ck / "model.safetensors").symlink_to(outside)


def _fifo_file(run: Path, ck: Path) -> None:
    (ck / "rng.safetensors").unlink()
    os.mkfifo(ck / "rng.safetensors")


CK = "{run}/checkpoints/step-00000004"
DAMAGED = [  # (id, what is done to the run, the line `mhmoe eval` prints, the line `mhmoe train` prints or None: same)
    ("manifest lists nothing, weights altered", _empty_manifest,
     f"{CK}/manifest.json does not list model.safetensors, optimizer.safetensors, optimizer.json, "
     "rng.safetensors, state.json, run/config.json, run/tokenizer.json: the checkpoint is damaged or was altered",
     None),
    ("config.json: activation", lambda run, ck: edit_config(run, activation="relu"),
     "{run}/config.json differs from the configuration step-00000004 was trained with (model.ffn.moe.activation): "
     f"the weights would be read as another model; restore it from {CK}/run/config.json or train a new run",
     "holds a run with different model settings (ffn); pass another --out, or the same settings to resume"),
    ("config.json: top_k", lambda run, ck: edit_config(run, top_k=1),
     "differs from the configuration step-00000004 was trained with (model.ffn.moe.top_k)",
     "holds a run with different model settings (ffn)"),
    ("config.json: residual", lambda run, ck: edit_config(run, residual="subtoken"),
     "differs from the configuration step-00000004 was trained with (model.ffn.moe.residual)",
     "holds a run with different model settings (ffn)"),
    ("tokenizer changed", lambda run, ck: (run / "tokenizer.json").write_text("{}"),
     f"{{run}}/tokenizer.json is not the file step-00000004 was trained with; restore it from {CK}/run/tokenizer.json",
     None),
    ("tokenizer removed", lambda run, ck: (run / "tokenizer.json").unlink(),
     f"{{run}}/tokenizer.json is missing: step-00000004 was trained with it; restore it from {CK}/run/tokenizer.json",
     None),
    ("latest is binary", lambda run, ck: (run / "checkpoints" / "latest").write_bytes(b"\x00\xff\xfe"),
     "{run}/checkpoints/latest must hold the name of a checkpoint folder (step-NNNNNNNN), but it holds binary data; "
     "delete it to resume from the newest checkpoint", None),
    ("latest is a list", lambda run, ck: (run / "checkpoints" / "latest").write_text('["step-00000004"]'),
     """but it holds '["step-00000004"]'; delete it to resume from the newest checkpoint""", None),
    ("latest escapes", lambda run, ck: (run / "checkpoints" / "latest").write_text("../../other/checkpoints/step-2"),
     "but it holds '../../other/checkpoints/step-2'", None),
    ("latest is absolute", lambda run, ck: (run / "checkpoints" / "latest").write_text(str(ck)),
     "(step-NNNNNNNN), but it holds '/", None),
    ("latest names nothing", lambda run, ck: (run / "checkpoints" / "latest").write_text("step-00000008\n"),
     "{run}/checkpoints/latest names step-00000008, which is not a checkpoint folder of {run}/checkpoints; delete "
     "{run}/checkpoints/latest to resume from the newest one (step-00000004)", None),
    ("manifest is a list", lambda run, ck: (ck / "manifest.json").write_text("[1, 2]"),
     f"{CK}/manifest.json is malformed: the checkpoint is damaged or was altered (not a JSON object)", None),
    ("manifest without files", lambda run, ck: rewrite_manifest(ck, lambda m: {"format": m["format"], "step": 4}),
     "manifest.json is malformed: the checkpoint is damaged or was altered (its files must map names to", None),
    ("manifest is binary", lambda run, ck: (ck / "manifest.json").write_bytes(b"\x80\x04\x95"),
     f"{CK}/manifest.json (the checkpoint's manifest) is not valid JSON: it is damaged", None),
    ("manifest of another step", lambda run, ck: rewrite_manifest(ck, lambda m: {**m, "step": 2}),
     "(it is for step 2, the folder is step-00000004)", None),
    ("manifest names a file outside", _outside_entry,
     "{run}/checkpoints/step-00000004/../../config.json is missing, truncated or altered", None),
    ("manifest names /dev/zero", _dev_zero_entry, "/dev/zero is missing, truncated or altered", None),
    ("weights are a link out", _linked_weights,
     f"{CK}/model.safetensors is a symbolic link: a checkpoint holds only regular files; it was altered", None),
    ("a FIFO in the checkpoint", _fifo_file,
     f"{CK}/rng.safetensors is not a regular file: a checkpoint holds only regular files; it was altered", None),
    ("an unlisted file", lambda run, ck: (ck / "extra.bin").write_bytes(b"x"),
     f"{CK}/extra.bin is not listed in the manifest: the checkpoint was altered", None),
    ("weights altered", lambda run, ck: flip_byte(ck / "model.safetensors"),
     f"{CK}/model.safetensors is missing, truncated or altered: the checkpoint is damaged", None),
]  # fmt: skip


@contextlib.contextmanager
def deadline(seconds: int):  # type: ignore[no-untyped-def]
    """Fail instead of hanging (hashing /dev/zero or opening a FIFO never ends)."""

    def expire(*_):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("damage,eval_message,train_message", [case[1:] for case in DAMAGED],
                         ids=[case[0] for case in DAMAGED])  # fmt: skip
def test_a_damaged_or_hostile_run_is_refused_and_left_as_it_is(
    pristine, corpus, tokenizer_file, tmp_path, capsys, damage, eval_message, train_message
):
    run = tmp_path / "run"
    shutil.copytree(pristine, run, symlinks=True)
    damage(run, run / "checkpoints" / "step-00000004")
    before = snapshot(run / "checkpoints")
    with deadline(60):
        code, err = cli(capsys, ["eval", str(run)])
    assert code == 2 and eval_message.format(run=run) in err, err
    with deadline(60):
        code, err = cli(capsys, train_args(corpus, run, STEPS, f"data.tokenizer={tokenizer_file}"))
    assert code == 2 and (train_message or eval_message).format(run=run) in err, err
    assert snapshot(run / "checkpoints") == before  # a refused command changed nothing


def test_a_tokenizer_planted_in_a_run_that_had_none(reference, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ByteTokenizer().save(run / "tokenizer.json")
    code, err = cli(capsys, ["eval", str(run)])
    assert code == 2 and f"{run}/tokenizer.json appeared after step-00000006 was written (the run had none)" in err


# ------------------------------------------------------------------------------- left-overs of a killed run


def test_temporaries_of_an_interrupted_run_are_removed_with_a_line(pristine, corpus, tokenizer_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    (run / "checkpoints" / ".step-00000006.tmp-4242").mkdir()
    (run / "checkpoints" / ".step-00000006.tmp-4242" / "model.safetensors").write_bytes(b"half")
    (run / ".config.json.tmp-4242-abcdef01").write_text("{")
    lines = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(lines + "5,1280,2.5")  # a kill mid-line
    code, err = cli(capsys, train_args(corpus, run, STEPS, f"data.tokenizer={tokenizer_file}"))
    assert code == 0
    assert f"removed 1 unfinished temporary file(s) an interrupted run left in {run / 'checkpoints'}: " in err
    assert f"removed 1 unfinished temporary file(s) an interrupted run left in {run}: .config.json.tmp-" in err
    assert f"{run / 'metrics.csv'}: dropped 1 incomplete line(s)" in err
    assert temporaries(run) == []
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == STEPS


# ------------------------------------------------------------------------------------------- two processes


def wait_for_lock(run: Path, pid: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((run / ".lock").read_text())["pid"] == pid:
                return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} never took the lock of {run}")


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(corpus, reference, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "mhmoe", *train_args(corpus, run, 100_000)], env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_lock(run, holder.pid)
        code, err = cli(capsys, train_args(corpus, run))
        assert code == 2
        assert f"mhmoe: error: {run} is in use by process {holder.pid} on {socket.gethostname()} (`" in err
        assert "; wait for it to finish or pass another folder" in err
    finally:
        holder.kill()
        holder.wait()
    # the holder died holding the lock: its lock is stale, and the next run takes it over
    shutil.rmtree(run)  # (its checkpoints are of a 100,000-step schedule: start clean for the comparison)
    holder = subprocess.Popen([sys.executable, "-m", "mhmoe", *train_args(corpus, run)], env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_lock(run, holder.pid)
    holder.kill()
    holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # a stale lock file is left
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


def test_a_failed_start_leaves_no_lock_nor_new_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    new, given = tmp_path / "new" / "run", tmp_path / "given"
    given.mkdir()  # a folder the user made: kept, and left empty
    for out in (new, given):
        code, err = cli(capsys, ["train", "--preset", "cpu-tiny", "--data", str(empty), "--out", str(out)])
        assert code == 2 and "no usable files" in err
    assert not new.exists() and list(given.iterdir()) == []


def test_the_lock_file_goes_only_with_nothing_beside_it(tmp_path):
    import fcntl

    from mhmoe.io import _locked, lock_run

    run = tmp_path / "run"
    with lock_run(run):
        (run / "config.json").write_text("{}")
    assert (run / ".lock").is_file()  # a run folder keeps its (released) lock file, as it always did
    path = tmp_path / "other" / ".lock"
    with lock_run(path.parent):
        assert path.is_file()
    assert not path.parent.exists()

    class LeavesBetween:
        """A holder that removes the file on leaving does so between our open and our flock (once)."""

        LOCK_EX, LOCK_NB, calls = fcntl.LOCK_EX, fcntl.LOCK_NB, 0

        def flock(self, fd, operation):
            self.calls += 1
            if self.calls == 1:
                path.unlink()
            fcntl.flock(fd, operation)

    path.parent.mkdir()
    path.write_text("")
    fake = LeavesBetween()
    fd = _locked(path, fake)
    try:  # the second try locks the file that is there, not the removed one
        assert fake.calls == 2 and os.path.samestat(os.fstat(fd), os.stat(path))
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------- the operating system's errors


def test_os_errors_are_one_line_naming_the_path_and_the_fix(corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    code, err = cli(capsys, train_args(corpus, tmp_path / "file"))
    assert code == 2 and err == f"mhmoe: error: --out {tmp_path / 'file'} is a file, not a folder; pass a folder"
    code, err = cli(capsys, train_args(corpus, tmp_path / "file" / "run"))
    assert code == 2 and err == (
        f"mhmoe: error: a part of this path is a file, not a folder: {tmp_path / 'file' / 'run'}; choose another path"
    )
    original = Path.mkdir

    def refused(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.name == "denied":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        if self.name == "read-only":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    code, err = cli(capsys, train_args(corpus, tmp_path / "denied"))
    assert code == 2 and err == (
        f"mhmoe: error: permission denied: {tmp_path / 'denied'}; fix its permissions, or choose a place you can "
        "write (--out, MHMOE_CACHE)"
    )
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "read-only"))
    code, err = cli(capsys, train_args(corpus, tmp_path / "run"))  # after the data's warnings: the refusal last
    assert code == 2 and err.splitlines()[-1] == (
        f"mhmoe: error: read-only file system: {tmp_path / 'read-only'}; choose a writable place (--out; "
        "MHMOE_CACHE for the token cache)"
    )


def test_a_bug_still_shows_its_traceback(corpus, tmp_path, monkeypatch):
    from mhmoe.train import lm

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyError("a bug")

    monkeypatch.setattr(lm, "prepare_data", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(train_args(corpus, tmp_path / "run"))
    with pytest.raises(OSError, match="connection"):  # an OSError that is not about the user's files
        monkeypatch.setattr(lm, "prepare_data", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("connection")))
        main(train_args(corpus, tmp_path / "run"))


# ------------------------------------------------------------------------------------- the data trained on


def test_eval_and_resume_refuse_data_that_changed(pristine, corpus, tokenizer_file, tmp_path, capsys):
    """The checkpoint records each split's sha256: evaluating (or resuming) on other text would report the
    perplexity of something else, so it is refused; the same data at another path is fine."""
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    moved = tmp_path / "moved"
    shutil.copytree(corpus, moved)
    config = json.loads((run / "config.json").read_text())
    config["data"]["path"] = str(moved)
    (run / "config.json").write_text(json.dumps(config))
    code, err = cli(capsys, ["eval", str(run)])
    assert code == 0, err
    for doc in moved.iterdir():
        doc.write_text(doc.read_text() + "\nchanged\n")
    code, err = cli(capsys, ["eval", str(run)])
    assert code == 2 and f"the test split of {moved} is not the data this run was trained with (sha256 " in err
    assert "the data changed; point data.path (--data) at the original data, or start a new run" in err
    args = train_args(moved, run, STEPS, f"data.tokenizer={tokenizer_file}")
    code, err = cli(capsys, args)
    assert code == 2 and f"the test split of {moved} is not the data this run was trained with" in err


def test_a_data_path_spelled_relative_then_absolute_resumes(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    run = tmp_path / "run"
    assert main(train_args(Path(corpus.name), run, 2)) == 0
    assert main(train_args(corpus.resolve(), run, 4)) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 4


def test_every_writer_goes_through_the_atomic_helper():
    """Files are written by `mhmoe.io` (atomic_write and its friends) or inside a staging folder published by one
    rename; the few exceptions are listed with their reason."""
    allowed = {
        "io.py": "the helper itself",
        "train/metrics.py": "the append-only metrics logs, repaired on resume",
        "ops/triton_ahead.py": "a scratch file in a TemporaryDirectory",
        "data/corpus.py": "the built-in corpus, written in a staging folder renamed into place",
    }
    src = Path(mhmoe.__file__).parent
    pattern = r"\.write_text\(|\.write_bytes\(|shutil\.copy|\bopen\([^)]*[\"'][wax]b?\+?[\"']"
    found = []
    for path in sorted(src.rglob("*.py")):
        name = path.relative_to(src).as_posix()
        if name not in allowed and re.search(pattern, path.read_text()):
            found.append(name)
    assert found == [], f"write these through mhmoe.io.atomic_write: {found}"


def test_a_staged_folder_is_published_whole_or_not_at_all(tmp_path):
    from mhmoe.io import staged_dir

    with staged_dir(tmp_path / "done") as tmp:
        (tmp / "a.txt").write_text("a")
    assert [p.name for p in (tmp_path / "done").iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError, match="half-way"):
        with staged_dir(tmp_path / "failed") as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # no folder, no temporary left


# ---------------------------------------------------------------------- readers while the run trains (issue 25.1)


def test_readers_never_see_a_checkpoint_vanish_while_the_run_trains_and_prunes(corpus, tmp_path, capsys):
    """eval, generate and export-hf in a loop against a trainer (a real process) that checkpoints and prunes every
    step (train.keep_checkpoints=1): every call succeeds, on the `latest` of its moment, and pruning goes on."""
    run = tmp_path / "run"
    every_step = ["train.checkpoint_every=1", "train.keep_checkpoints=1", "train.eval_every=100000"]
    log = tmp_path / "trainer.err"
    with open(log, "w") as err:
        trainer = subprocess.Popen([sys.executable, "-m", "mhmoe", *train_args(corpus, run, 100_000, *every_step)],
                                   env=child_env(), stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        while not (run / "checkpoints" / "latest").exists():
            assert trainer.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        steps = []
        for i in range(3):
            code, err = cli(capsys, ["eval", str(run), "--max-batches", "1", "--no-progress"])
            assert code == 0, err
            code, err = cli(capsys, ["generate", str(run), "--prompt", "The", "--max-new-tokens", "3"])
            assert code == 0, err
            code, err = cli(capsys, ["export-hf", str(run), str(tmp_path / f"hf{i}")])
            assert code == 0, err
            steps.append(json.loads((tmp_path / f"hf{i}" / "config.json").read_text())["mhmoe_run"]["step"])
        assert trainer.poll() is None
        assert steps == sorted(steps) and steps[-1] > steps[0], steps  # the readers followed a training run
        end = time.monotonic() + 120  # saves with no reader: the trainer prunes what the readers held
        while len([p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]) > 2:
            assert time.monotonic() < end and trainer.poll() is None
            time.sleep(0.1)
    finally:
        trainer.kill()
        trainer.wait()


def test_a_held_checkpoint_outlives_pruning_and_one_pruned_before_it_is_held_is_passed_over(tmp_path, monkeypatch):
    import mhmoe.train.checkpoint as checkpoint
    from mhmoe.train.checkpoint import reading, save_checkpoint, verify

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "checkpoints"

    def save(step: int) -> None:
        save_checkpoint(folder, step, model, optimizer, {}, keep=1)

    def steps() -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.name != "latest")

    save(1)
    with reading(folder) as held:
        assert held is not None and held.name == "step-00000001"
        save(2)
        save(3)
        assert steps() == ["step-00000001", "step-00000003"]  # held: left to a later save; step 2 pruned
        verify(held)
    save(4)
    assert steps() == ["step-00000004"]

    lock = checkpoint._lock_folder
    raced = []

    def pruned_first(path, shared, wait):  # type: ignore[no-untyped-def]
        if shared and not raced:  # a save lands between reading `latest` and holding what it named
            raced.append(path.name)
            save(5)
        return lock(path, shared, wait)

    monkeypatch.setattr(checkpoint, "_lock_folder", pruned_first)
    with reading(folder) as held:
        assert raced == ["step-00000004"] and held is not None and held.name == "step-00000005"
        verify(held)


# ------------------------------------------------------------------ a run whose checkpoints are gone (issue 25.4)


def test_a_run_whose_checkpoints_are_gone_is_not_started_again_over_its_record(corpus, reference, tmp_path, capsys):
    """summary.json, or metrics past the first scheduled checkpoint, with no checkpoint: refused, nothing changed.
    Metrics up to the first checkpoint are what a run killed before it leaves: that run starts (and ends) as ever."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    code, err = cli(capsys, train_args(corpus, run))
    assert code == 2 and err.splitlines()[-1] == (
        f"mhmoe: error: {run} holds the record of an earlier run (summary.json, metrics.jsonl up to step 6) but no "
        f"checkpoint to resume from in {run / 'checkpoints'}; training would start at step 0 and replace it: pass "
        "another --out, or move those files away to start afresh in this folder"
    )
    (run / "summary.json").unlink()
    code, err = cli(capsys, train_args(corpus, run))
    assert code == 2 and "(metrics.jsonl up to step 6) but no checkpoint" in err
    kept = {k: v for k, v in before.items() if k not in ("summary.json", ".lock")}
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == kept

    metrics = (run / "metrics.jsonl").read_text().splitlines(keepends=True)  # killed before its step-2 checkpoint
    (run / "metrics.jsonl").write_text("".join(line for line in metrics if json.loads(line)["step"] <= 2))
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


# ------------------------------------------------------------------------------ a stop that saves (issue 25.2)


def last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_a_signal_finishes_the_step_saves_it_and_the_rerun_ends_bit_for_bit(corpus, reference, tmp_path, name):
    """SIGTERM (a cluster's stop) or SIGINT (Ctrl-C) from outside, while the run trains: the current step is
    finished and saved (whatever train.checkpoint_every says), one line says which and how to resume, and the
    rerun ends where an uninterrupted run ends, bit for bit."""
    run, signum = tmp_path / "run", getattr(signal, name)
    child = subprocess.Popen([sys.executable, str(DRIVER), "0", "--slow", "0.4", "--", *train_args(corpus, run)],
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while not (run / "metrics.jsonl").exists() or '"step": 1,' not in (run / "metrics.jsonl").read_text():
        assert child.poll() is None and time.sleep(0.05) is None, child.communicate()[1][-2000:]
    child.send_signal(signum)
    err = child.communicate(timeout=300)[1]
    assert child.returncode == 128 + signum, err[-2000:]
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 2 <= step < STEPS, err[-2000:]
    assert f"mhmoe: {name}: finishing the current step and saving it" in err
    assert last_line(err) == (
        f"mhmoe: stopped by {name} after step {step}, saved in {run / 'checkpoints' / f'step-{step:08d}'}: "
        "run the same command to resume"
    )
    assert temporaries(run) == [] and not (run / "summary.json").exists()
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_last_complete_checkpoint(corpus, reference, tmp_path):
    """The first Ctrl-C (during step 3) asks for a stop; the second, while step 3 is being saved, stops at once:
    the half-written checkpoint is removed, step 2 stays `latest`, and the rerun ends bit for bit."""
    run = tmp_path / "run"
    child = subprocess.run([sys.executable, str(DRIVER), "0", "--signal", "SIGINT@3", "--again", "--",
                            *train_args(corpus, run)], env=child_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == 128 + signal.SIGINT, child.stderr[-2000:]
    assert "mhmoe: SIGINT: finishing the current step and saving it; Ctrl-C again to stop at once" in child.stderr
    assert last_line(child.stderr) == (
        f"mhmoe: stopped by SIGINT; the last complete checkpoint is {run / 'checkpoints' / 'step-00000002'}: "
        "run the same command to resume from it"
    )
    assert temporaries(run) == [] and not (run / "checkpoints" / "step-00000003").exists()
    assert main(train_args(corpus, run)) == 0
    assert_same_run(run, reference)


def test_under_torchrun_every_rank_stops_after_the_same_step_and_saves_it(corpus, tmp_path):
    """Two gloo processes as torchrun runs them; only rank 1 (which writes no file) gets SIGTERM, in its step 3.
    Both stop after the same step, the distributed checkpoint of that step is published, rank 0 alone prints
    the line, and the resumed run ends bit for bit where an uninterrupted run on two processes ends."""
    from distributed_workers import launch, stop_job

    cache, run, ref = tmp_path / "cache", tmp_path / "run", tmp_path / "reference"
    results = launch(stop_job, 2, tmp_path, 240, str(corpus), str(cache), str(run), str(ref))
    assert [r["stopped"]["signum"] for r in results] == [signal.SIGTERM] * 2, results
    assert results[0]["latest"] == results[1]["latest"] == "step-00000003", results
    assert results[0]["stopped"]["message"] == (
        f"stopped by SIGTERM after step 3, saved in {run / 'checkpoints' / 'step-00000003'}: run the same command "
        "to resume"
    )
    assert results[1]["stopped"]["message"] == ""
    assert results[0]["losses"] == results[0]["reference_losses"] and len(results[0]["losses"]) == 11


# ------------------------------------------------------------------- temporaries of `data prepare` (issue 25.6)


def test_data_prepare_cleans_up_on_sigterm_and_after_a_kill(tmp_path, capsys, monkeypatch):
    """`mhmoe data prepare` (with the stand-in packages of tests/test_prepare.py) killed in a child process while it
    writes its first file. SIGTERM: the temporary file and the working folder are removed before it exits, with
    one line. SIGKILL: the next run into the same --out removes both, with a line, and finishes."""
    from test_prepare import make_fake_clients

    from mhmoe.data import prepare

    def killed(out: Path, how: str) -> subprocess.CompletedProcess:
        tmpdir = tmp_path / f"tmpdir-{how}"  # the child's $TMPDIR: nothing may be left there either
        tmpdir.mkdir()
        command = [sys.executable, str(DRIVER), "1", "--kill-with", how, "--fake-clients", "--", "data", "prepare",
                   "english", "--out", str(out)]  # fmt: skip
        child = subprocess.run(command, env={**child_env(), "TMPDIR": str(tmpdir)}, capture_output=True, text=True,
                               timeout=300)  # fmt: skip
        assert list(tmpdir.iterdir()) == []
        return child

    out = tmp_path / "terminated"
    child = killed(out, "SIGTERM")
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-2000:]
    assert child.stderr.strip().splitlines()[-1] == "mhmoe: stopped by SIGTERM"
    assert sorted(p.name for p in out.rglob("*")) == [".lock", "english"]  # no temporary, no working folder

    out = tmp_path / "killed"
    child = killed(out, "SIGKILL")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if ".tmp-" in p.name)
    assert [name.split(".tmp-")[0] for name in left] == [".work", "english/.documents.jsonl.gz"], left
    packages, run, _ = make_fake_clients()
    monkeypatch.setattr(prepare, "PACKAGES", packages)
    monkeypatch.setattr(prepare, "run_client", run)
    monkeypatch.setattr(prepare.shutil, "which", lambda tool: tool)
    capsys.readouterr()
    assert main(["data", "prepare", "english", "--out", str(out)]) == 1  # (the stand-ins differ from the pack)
    err = capsys.readouterr().err
    for name in left:
        where = f"{(out / name).parent}: {Path(name).name}"
        assert f"removed 1 unfinished temporary file(s) an interrupted `mhmoe data prepare` left in {where}" in err
    assert [p for p in out.rglob("*") if ".tmp-" in p.name] == []
    assert (out / "english" / "train.txt.gz").is_file()


# ------------------------------------------------------------- imports that build a different model (issue 25, 3)


@pytest.fixture(scope="module")
def export(pristine, tmp_path_factory) -> Path:
    """`mhmoe export-hf` of the pristine run: a folder with a manifest, to be copied and altered."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export-hf", str(pristine), str(folder)]) == 0
    return folder


def unsealed(export: Path, folder: Path) -> Path:
    """A copy of the export without its manifest (as `save_pretrained` writes a folder), to alter the weights."""
    shutil.copytree(export, folder)
    (folder / "mhmoe_manifest.json").unlink()
    return folder


def alter_weights(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_json(path: Path, **values: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def _drop_a_tensor(folder: Path) -> str:
    alter_weights(folder, lambda t: t.pop("model.norm.weight"))
    return "missing model.norm.weight"


def _add_a_tensor(folder: Path) -> str:
    alter_weights(folder, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    return "unexpected model.extra.weight"


def _reshape_a_tensor(folder: Path) -> str:
    d = load_file(str(folder / "model.safetensors"))["model.norm.weight"].shape[0]
    alter_weights(folder, lambda t: t.__setitem__("model.norm.weight", torch.ones(d + 1)))
    return f"model.norm.weight of shape ({d + 1},) where the model has ({d},)"


def _absurd_vocab_size(folder: Path) -> str:
    v, d = load_file(str(folder / "model.safetensors"))["model.embed.weight"].shape
    edit_json(folder / "config.json", vocab_size=10**12)
    return f"model.embed.weight of shape ({v}, {d}) where the model has ({10**12}, {d})"


@pytest.mark.parametrize("damage", [_drop_a_tensor, _add_a_tensor, _reshape_a_tensor, _absurd_vocab_size])
def test_weights_that_build_another_model_are_refused_by_every_load_path(export, tmp_path, capsys, damage):
    """import-hf and the transformers classes (ours, and the Auto class that dispatches to it) refuse, naming the
    tensor, where transformers alone initialises a missing tensor at random and ignores an unexpected one; an
    absurd vocab_size is compared on the meta device, before any memory is taken for it."""
    from transformers import AutoModelForCausalLM

    from mhmoe.errors import UserError
    from mhmoe.hf import MHMoEForCausalLM

    folder = unsealed(export, tmp_path / "hf")
    named = damage(folder)
    message = f"{folder}: the weights do not build the model its config.json describes ({named}); the folder was "
    code, err = cli(capsys, ["import-hf", str(folder), str(tmp_path / "run")])
    assert code == 2 and err.splitlines()[-1].startswith(f"mhmoe: error: {message}"), err
    assert not (tmp_path / "run").exists()
    for loader in (MHMoEForCausalLM, AutoModelForCausalLM):
        with pytest.raises(UserError, match=re.escape(message)):
            loader.from_pretrained(folder)


def test_an_export_without_a_manifest_imports_with_a_line(export, tmp_path, capsys):
    folder = unsealed(export, tmp_path / "hf")
    code, err = cli(capsys, ["import-hf", str(folder), str(tmp_path / "run")])
    assert code == 0 and f"mhmoe: {folder} has no mhmoe_manifest.json (it was not written by `mhmoe export-hf`)" in err


@pytest.mark.parametrize("edit,named", [
    (lambda f: edit_json(f / "generation_config.json", temperature=9.0), "generation_config.json missing or changed"),
    (lambda f: alter_weights(f, lambda t: t["model.norm.weight"].mul_(2)), "model.safetensors missing or changed"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json missing or changed"),
    (lambda f: (f / "extra_config.json").write_text("{}"), "extra_config.json added"),
])  # fmt: skip
def test_an_edited_export_is_refused_naming_the_files(export, tmp_path, capsys, edit, named):
    folder = tmp_path / "hf"
    shutil.copytree(export, folder)
    manifest = json.loads((folder / "mhmoe_manifest.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_mhmoe.py"} <= set(manifest["files"])
    edit(folder)
    code, err = cli(capsys, ["import-hf", str(folder), str(tmp_path / "run")])
    assert code == 2 and err == (
        f"mhmoe: error: {folder} differs from what `mhmoe export-hf` wrote ({named}; mhmoe_manifest.json has the "
        "sha256 of each file): export it again, or delete mhmoe_manifest.json to import the edited folder unchecked"
    )
    assert not (tmp_path / "run").exists()


def test_load_moeified_refuses_weights_of_another_shape(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from mhmoe.convert import load_moeified, moeify_pretrained
    from mhmoe.errors import UserError

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    moeify_pretrained(tmp_path / "gpt2", tmp_path / "out", "smoe", num_experts=2, top_k=1)
    weights = tmp_path / "out" / "moeified.safetensors"
    tensors = load_file(str(weights))
    tensors["transformer.ln_f.weight"] = torch.ones(17)
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match=re.escape("transformer.ln_f.weight of shape (17,) where the model has (16,)")):
        load_moeified(tmp_path / "out")


# ---------------------------------------------------------------- comparisons that compare (issue 25, 5)


def test_compare_reports_bits_per_byte_and_says_when_tokenizers_differ(pristine, corpus, tmp_path, capsys):
    """Bits per byte divide the summed loss by the UTF-8 bytes of exactly the tokens predicted: counted here by
    decoding those tokens, not through the per-token byte table mhmoe uses."""
    from mhmoe.analysis.runs import load_run

    bpe = tmp_path / "bpe"
    assert main(train_args(corpus, bpe, 2, "data.tokenizer=bpe", "data.vocab_size=300")) == 0
    for run in (pristine, bpe):
        s = json.loads((run / "summary.json").read_text())
        loaded = load_run(run)
        targets = loaded.splits["valid"][1 : 1 + s["val_tokens"]].tolist()
        nbytes = len(loaded.tokenizer.decode(targets).encode("utf-8"))
        assert s["val_bytes"] == nbytes and nbytes > s["val_tokens"] * (run == bpe)
        assert s["val_bpb"] == pytest.approx(s["val_loss"] * s["val_tokens"] / (nbytes * math.log(2)), rel=1e-12)
    capsys.readouterr()
    assert main(["compare", str(pristine), str(bpe)]) == 0
    out = capsys.readouterr().out
    assert "| val bits/byte | test bits/byte |" in out
    assert f"| {json.loads((bpe / 'summary.json').read_text())['val_bpb']:.4f} |" in out
    assert "The runs use different tokenizers (" in out and "compare bits per byte." in out
    assert main(["compare", str(pristine), str(pristine)]) == 0
    assert "different tokenizers" not in capsys.readouterr().out


# ------------------------------------------------------------------ every foreseeable error is one line (issue 25, 7)


def test_generate_with_a_nan_temperature_or_a_prompt_that_is_not_text(pristine, capsys):
    code, err = cli(capsys, ["generate", str(pristine), "--prompt", "To be", "--temperature", "nan"])
    assert code == 2 and err == "mhmoe: error: temperature must be a finite number >= 0, got nan"
    code, err = cli(capsys, ["generate", str(pristine), "--prompt", "a\udcffb"])  # a non-UTF-8 byte in argv
    assert code == 2 and err.startswith("mhmoe: error: --prompt is not valid text (give UTF-8 text) (")


@pytest.mark.parametrize("summary,says", [
    ('{"step": 4,', "is not valid JSON ("),
    ("[1, 2]", "is not a JSON object: it is damaged"),
    ('{"step": 4}', "is damaged (tokens_seen, train_seconds, params_total, params_active: not a number)"),
    ('{"step": 4, "tokens_seen": 1, "train_seconds": 1, "params_total": 1, "params_active": "x"}',
     "is damaged (params_active: not a number)"),
])  # fmt: skip
def test_compare_with_a_damaged_summary(pristine, tmp_path, capsys, summary, says):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    (run / "summary.json").write_text(summary)
    code, err = cli(capsys, ["compare", str(pristine), str(run)])
    assert code == 2 and err.startswith(f"mhmoe: error: {run / 'summary.json'} {says}"), err


def test_export_onto_a_full_disk_leaves_nothing(pristine, tmp_path, capsys, monkeypatch):
    """The safetensors writer inside transformers' save_pretrained reports a full disk as its own error (as it
    does for real, see the next test): one line naming the file, and neither the folder nor a temporary left."""
    transformers = pytest.importorskip("transformers")
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "hf"
    code, err = cli(capsys, ["export-hf", str(pristine), str(out)])
    line = err.splitlines()[-1]
    assert code == 2 and line.startswith("mhmoe: error: no space left on device: ") and "/model.safetensors; " in line
    assert line.endswith("free some space and run the command again (a run resumes from its last complete checkpoint)")
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_export_under_a_real_file_size_limit_leaves_nothing(pristine, tmp_path):
    """A real failure of the safetensors writer inside transformers' save_pretrained (RLIMIT_FSIZE below the
    weights' size): one line naming the file, and neither the folder nor a temporary left."""
    pytest.importorskip("transformers")
    size = (pristine / "checkpoints" / "step-00000004" / "model.safetensors").stat().st_size

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    out = tmp_path / "hf"
    child = subprocess.run([sys.executable, "-m", "mhmoe", "export-hf", str(pristine), str(out)], env=child_env(),
                           capture_output=True, text=True, timeout=300, preexec_fn=limit)  # fmt: skip
    assert child.returncode == 2, child.stderr[-2000:]
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith("mhmoe: error: file too large for this process's file-size limit (ulimit -f): ")
    assert last.endswith("/model.safetensors; raise the limit") and not out.exists() and os.listdir(tmp_path) == []


def _safetensors_header(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = change(json.loads(data[8 : 8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _past_the_end(header: dict) -> dict:
    header["model.norm.weight"]["data_offsets"][1] += 10**9
    return header


def _linked_config(folder: Path) -> None:
    outside = folder.parent / "elsewhere.json"
    outside.write_text((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)


HOSTILE_IMPORTS = [  # (alteration, the refusal's start after the folder's path)
    (lambda f: _safetensors_header(f, lambda h: b'{"a": 1,'), "/model.safetensors has a damaged safetensors header ("),
    (lambda f: _safetensors_header(f, _past_the_end), "/model.safetensors has a damaged safetensors header (tensor "
     "'model.norm.weight' lies at bytes"),
    (lambda f: (f / "config.json").write_text('{"a": ' * 5000 + "1" + "}" * 5000), "/config.json is not a JSON file "
     "of a model folder ("),
    (lambda f: (f / "config.json").write_text('{"a": ' * 100 + "1" + "}" * 100), "/config.json is not a JSON file "
     "of a model folder (nested more than 64 levels deep); replace it"),
    (_linked_config, "/config.json is a symbolic link to "),
]  # fmt: skip


@pytest.mark.parametrize("alter,says", HOSTILE_IMPORTS)
def test_import_of_a_hostile_or_damaged_folder_is_one_line(export, tmp_path, capsys, alter, says):
    folder = unsealed(export, tmp_path / "hf")
    alter(folder)
    code, err = cli(capsys, ["import-hf", str(folder), str(tmp_path / "run")])
    assert code == 2 and err.splitlines()[-1].startswith(f"mhmoe: error: {folder}{says}"), err
    assert not (tmp_path / "run").exists()


def saved_dataset(folder: Path, texts: list) -> Path:  # type: ignore[type-arg]
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(folder))
    return folder


def test_damaged_empty_or_unnamed_datasets_are_one_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    texts = [f"document {i} " * 40 for i in range(30)]
    damaged = saved_dataset(tmp_path / "damaged", texts)
    arrow = next(damaged.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    code, err = cli(capsys, train_args(damaged, tmp_path / "run"))
    assert code == 2 and err.startswith(f"mhmoe: error: cannot load the dataset {damaged}: "), err
    empty = saved_dataset(tmp_path / "empty", [])
    code, err = cli(capsys, train_args(empty, tmp_path / "run"))
    assert code == 2 and err == f"mhmoe: error: {empty} is a saved dataset with no rows (no .arrow file); give a " \
        "dataset with text"  # fmt: skip
    code, err = cli(capsys, ["train", "--preset", "cpu-tiny", "--data", "hf:", "--out", str(tmp_path / "run")])
    assert code == 2 and err.startswith("mhmoe: error: data.path 'hf:' names no dataset; write hf:NAME")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_each_command_maps_its_foreseeable_errors_in_one_place():
    """The rule is structural: one table of each command's foreseeable exception types; any other error is a
    bug and keeps its traceback."""
    from mhmoe.cli import FORESEEABLE, user_message

    assert user_message(ValueError("top_k must be >= 1, got 0"), "generate") == "top_k must be >= 1, got 0"
    assert user_message(UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"), "generate") == (
        "--prompt is not valid text (give UTF-8 text) ('utf-8' codec can't encode character '\\udcff' in position "
        "0: surrogates not allowed)"
    )
    assert user_message(ValueError("a bug"), "train") is None and user_message(KeyError("x"), "generate") is None
    from mhmoe.models.cost import SizeMatchError

    no_size = "flops_matched_mhmoe: no size within 5% of the target"
    assert user_message(SizeMatchError(no_size), "reproduce") == no_size
    assert set(FORESEEABLE) <= {
        "generate", "compare", "import-hf", "export-hf", "moeify", "train", "eval", "data", "reproduce"
    }  # fmt: skip


# -------------------------------------------------------------------------- inputs users really have (issue 25, 8)


def test_null_text_rows_are_skipped_like_empty_ones(tmp_path):
    from mhmoe.data.hf_datasets import HFSource, load_hf_corpus

    texts = [f"document {i} " * 40 for i in range(30)]
    with_nulls = saved_dataset(tmp_path / "nulls", texts[:10] + [None, ""] + texts[10:] + [None])
    plain = saved_dataset(tmp_path / "plain", texts)
    a, b = (load_hf_corpus(HFSource(str(p))) for p in (with_nulls, plain))
    assert (a.train, a.valid, a.test) != ([], [], []) and len(a.train) + len(a.valid) + len(a.test) == 30
    assert sorted(a.train + a.valid + a.test) == sorted(b.train + b.valid + b.test)


@pytest.mark.parametrize("kind", ["smoe", "mhmoe"])
def test_layers_take_numpy_integers_as_ints(kind):
    import numpy as np

    from mhmoe.layers.moe import SparseMoE
    from mhmoe.layers.multihead import MHMoE

    def make(n):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        sizes = dict(d_model=n(16), num_experts=n(4), top_k=n(2), expert_hidden=n(8))
        return SparseMoE(**sizes) if kind == "smoe" else MHMoE(num_heads=n(2), **sizes)

    plain, numpy = make(int), make(np.int64)
    assert all(type(v) is int for v in vars(numpy.config).values() if isinstance(v, (int, np.integer)) and
               not isinstance(v, bool))  # fmt: skip
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert torch.equal(plain.double()(x).y, numpy.double()(x).y)
    from mhmoe.layers.routers import SigmoidRouter, SoftmaxRouter, XMoERouter

    for router in (SoftmaxRouter, SigmoidRouter, XMoERouter):  # built directly, too
        assert type(router(np.int64(16), np.int64(4), np.int64(2)).top_k) is int


def test_a_capacity_factor_that_overflows_is_refused():
    from mhmoe.layers.moe import SparseMoE

    sizes = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
    with pytest.raises(ValueError, match=r"capacity_factor=1e\+308 overflows the capacity c·K·S/E; c = E/K = 2 "):
        SparseMoE(capacity_factor=1e308, **sizes)
    layer = SparseMoE(capacity_factor=1e300, **sizes)  # finite times K, but ceil(c·K·S/E) no int64 holds
    with pytest.raises(ValueError, match=r"capacity_factor=1e\+300 overflows the capacity \(K=2, S=6, E=4\)"):
        layer(torch.randn(2, 3, 8))
    big = SparseMoE(capacity_factor=1e9, **sizes)  # huge but computable: nothing dropped
    assert big(torch.randn(2, 3, 8)).stats.dropped_fraction == 0


@pytest.mark.parametrize("kind", ["smoe", "mhmoe"])
def test_a_meta_tensor_is_refused_naming_the_device(kind):
    from mhmoe.layers.moe import SparseMoE
    from mhmoe.layers.multihead import MHMoE

    sizes = dict(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
    layer = SparseMoE(**sizes) if kind == "smoe" else MHMoE(num_heads=2, **sizes)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} cannot run on the meta device \(input on meta, weights on meta\)"):
        layer.to("meta")(torch.randn(2, 3, 8, device="meta"))


@pytest.mark.slow
def test_the_standalone_loader_refuses_a_missing_tensor_too(export, tmp_path):
    """Where mhmoe is not installed, the model code the folder carries runs the same weights check."""
    folder = unsealed(export, tmp_path / "hf")
    _drop_a_tensor(folder)
    code = "import sys; from transformers import AutoModelForCausalLM; " \
        "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)"  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    child = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)  # fmt: skip
    assert child.returncode != 0 and "No module named 'mhmoe'" not in child.stderr
    assert f"{folder}: the weights do not build the model its config.json describes (missing model.norm.weight)" in (
        child.stderr
    )
