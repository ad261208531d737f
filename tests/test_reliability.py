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
