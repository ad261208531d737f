"""Runs `mhmoe train` in a child process and kills it with SIGKILL at a chosen fault point (tests/test_reliability.py).

A fault point is any of the moments a crash can hurt: an fsync or a rename (every file and folder mhmoe writes
goes through them: checkpoint files, the manifest, `latest`, config.json, the token cache), an optimiser step
and a metrics line. The child counts them as they happen and kills itself at number `kill_at` (0: never, and it
prints the total), so a test can pick points at random yet reproducibly.

    python tests/fault_driver.py KILL_AT -- mhmoe train arguments...
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    kill_at = int(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    import torch

    from mhmoe.cli import main as mhmoe
    from mhmoe.train.metrics import MetricsLog

    seen = [0]

    def counted(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapper

    os.fsync = counted(os.fsync)
    os.replace = counted(os.replace)
    torch.optim.AdamW.step = counted(torch.optim.AdamW.step)
    MetricsLog.write = counted(MetricsLog.write)
    code = mhmoe(argv)
    print(f"fault points: {seen[0]}", flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
