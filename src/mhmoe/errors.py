"""Errors a user can fix. The command line prints their message on one line, without a traceback, and so it does
for the operating-system errors a user or their machine causes (`os_error_message`)."""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """Bad data, configuration or files: the message names the thing and says what to do."""


class DataError(UserError):
    """A data path or corpus that cannot be used."""


class ConfigError(UserError):
    """An unknown key or an out-of-range value in a run configuration."""


class CheckpointError(UserError):
    """A missing, truncated or foreign checkpoint."""


class Interrupted(KeyboardInterrupt):
    """A stop a user or a cluster asked for with SIGINT (Ctrl-C) or SIGTERM: not an error. The command line prints
    `message` (what was saved, how to go on) as its one line and exits with 128 + the signal's number, as a shell
    does for a process the signal ended."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message


# errno -> (what happened, what to do); the path, when the error names one, goes between them
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free some space and run the command again (a run resumes from its "
                   "last complete checkpoint)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run the command again (a run resumes from its last "
                   "complete checkpoint)"),
    errno.EFBIG: ("file too large for this process's file-size limit (ulimit -f)", "raise the limit"),
    errno.EACCES: ("permission denied", "fix its permissions, or choose a place you can write (--out, MHMOE_CACHE)"),
    errno.EPERM: ("operation not permitted", "fix its permissions, or choose another place (--out, MHMOE_CACHE)"),
    errno.EROFS: ("read-only file system", "choose a writable place (--out; MHMOE_CACHE for the token cache)"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("a folder where a file is needed", "choose another path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "choose another path, or remove what is there"),
    errno.ENAMETOOLONG: ("path too long", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the links"),
    errno.EIO: ("input/output error", "the disk or the network file system is failing; check it"),
}  # fmt: skip


def os_error_message(e: OSError) -> str | None:
    """One line for an operating-system error a user or their machine causes (a full disk, a read-only or
    missing folder, permissions), naming the path and the fix; None for any other (a bug keeps its traceback)."""
    not_files = (ConnectionError, BlockingIOError, ChildProcessError, ProcessLookupError, TimeoutError)
    if isinstance(e, not_files) or e.errno not in _OS_ERRORS:
        return None
    what, fix = _OS_ERRORS[e.errno]
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = f": {' -> '.join(os.fsdecode(p) for p in paths)}" if paths else ""
    return f"{what}{where}; {fix}"
