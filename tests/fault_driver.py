"""Runs `mhmoe train` in a child process and kills it with SIGKILL at a chosen fault point (tests/test_reliability.py).

A fault point is any of the moments a crash can hurt: an fsync or a rename (every file and folder mhmoe writes
goes through them: checkpoint files, the manifest, `latest`, config.json, the token cache), an optimiser step
and a metrics line. The child counts them as they happen and kills itself at number `kill_at` (0: never, and it
prints the total), so a test can pick points at random yet reproducibly.

    python tests/fault_driver.py KILL_AT [--kill-with NAME] [--signal NAME@STEP [--again]] [--slow SECONDS]
                                 [--fake-clients] -- mhmoe arguments (train ..., data prepare ...)

--kill-with sends another signal than SIGKILL at the fault point (SIGTERM: what a cluster sends). --fake-clients
makes `data prepare` fetch the stand-in packages of tests/test_prepare.py instead of running npm and apt-get.

--signal NAME@STEP sends the signal NAME (SIGINT, SIGTERM) to the child itself during its optimiser step STEP
(counted from 1 in this process); --again sends it a second time at the first fsync after that, a little more
than `mhmoe.io.REPEAT_S` later (a second Ctrl-C while the stop is being saved). --slow makes every optimiser
step last that much longer, so that a signal from outside lands in training.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main() -> None:
    split = sys.argv.index("--")
    options = argparse.ArgumentParser()
    options.add_argument("kill_at", type=int)
    options.add_argument("--signal")
    options.add_argument("--again", action="store_true")
    options.add_argument("--slow", type=float, default=0.0)
    options.add_argument("--kill-with", default="SIGKILL")
    options.add_argument("--fake-clients", action="store_true")
    args = options.parse_args(sys.argv[1:split])
    argv = sys.argv[split + 1 :]
    import torch

    from mhmoe.cli import main as mhmoe
    from mhmoe.io import REPEAT_S
    from mhmoe.train.metrics import MetricsLog

    seen, kill_with = [0], getattr(signal, args.kill_with)
    name, at = args.signal.split("@") if args.signal else ("SIGINT", "0")
    signum, signal_step, steps, sent = getattr(signal, name), int(at), [0], [0]

    def counted(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), kill_with)
            return fn(*args, **kwargs)

        return wrapper

    def stepped(fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            steps[0] += 1
            time.sleep(args.slow)
            if steps[0] == signal_step:
                sent[0] = 1
                os.kill(os.getpid(), signum)
            return fn(*a, **kw)

        return wrapper

    def synced(fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            if args.again and sent[0] == 1:
                sent[0] = 2
                time.sleep(REPEAT_S + 0.2)
                os.kill(os.getpid(), signum)
            return fn(*a, **kw)

        return wrapper

    kill_at = args.kill_at
    if args.fake_clients:
        from test_prepare import make_fake_clients

        from mhmoe.data import prepare

        prepare.PACKAGES, prepare.run_client, _ = make_fake_clients()
        prepare.shutil.which = lambda tool: f"/usr/bin/{tool}"  # type: ignore[assignment]
    os.fsync = counted(synced(os.fsync))
    os.replace = counted(os.replace)
    torch.optim.AdamW.step = counted(stepped(torch.optim.AdamW.step))
    MetricsLog.write = counted(MetricsLog.write)
    code = mhmoe(argv)
    print(f"fault points: {seen[0]}", flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
