"""CPU thread settings for training processes: how torch's OpenMP threads wait (read before torch loads).

Why: torch runs the parallel part of each CPU op on an OpenMP team of `torch.get_num_threads()` threads (all
cores by default). GNU libgomp, the OpenMP runtime of torch's Linux wheels, lets a thread that has finished its
share spin up to 300,000 times before it sleeps; a training step of the `cpu` preset is thousands of small ops,
so the waiting threads spin nearly all the time. On an idle machine that only burns CPU time; beside another busy
process a spinning thread holds the core that the thread it waits for (or the neighbour) needs, and every op
waits for a time slice: the default job's step was several times slower than with one thread and used several
times the CPU time (`benchmarks/README.md`, "contention"). With `OMP_WAIT_POLICY=PASSIVE` a waiting thread
sleeps at once and gives its core back.

The wait policy is read once, when torch loads its OpenMP runtime (on `import torch`), so it must be in the
environment before that: `set_openmp_defaults` is called by the `mhmoe` command line first thing (the
`mhmoe` package imports torch only when a name of it is first used); library code never changes process
settings on its own. In your own script, set `OMP_WAIT_POLICY=PASSIVE` in the shell or in `os.environ` before
`import torch`. Any wait setting of your own (`WAIT_SETTINGS`) is respected (nothing is added then), and
MHMOE_OMP_PASSIVE=0 keeps the runtime's default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

# what decides how an OpenMP thread waits: the standard variable, libgomp's spin count, Intel libiomp's block time
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}

# What the last `set_openmp_defaults` call did in this process (None: never called), for benchmarks and env.json.
state: dict | None = None


def openmp_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings to add to `environ` so that idle OpenMP threads sleep: {} when the user chose a wait setting
    (or MHMOE_OMP_PASSIVE=0), else `PASSIVE`."""
    if environ.get("MHMOE_OMP_PASSIVE", "1") == "0":
        return {}
    if any(name in environ for name in WAIT_SETTINGS):
        return {}
    return dict(PASSIVE)


def set_openmp_defaults(
    environ: MutableMapping[str, str] = os.environ, modules: Mapping[str, Any] = sys.modules
) -> dict:
    """Add `openmp_defaults` to the environment (inherited by torchrun's and data workers' processes too) while
    torch is not loaded yet. Returns what was done, also kept in `state`."""
    global state
    state = _set(environ, modules)
    return state


def chosen(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The wait settings in `environ`."""
    return {name: environ[name] for name in WAIT_SETTINGS if name in environ}


def _set(environ: MutableMapping[str, str], modules: Mapping[str, Any]) -> dict:
    chosen_ = chosen(environ)
    if environ.get("MHMOE_OMP_PASSIVE", "1") == "0":
        return dict(set=False, reason="MHMOE_OMP_PASSIVE=0", environment=chosen_)
    if chosen_:
        return dict(set=False, reason=f"{', '.join(chosen_)} set in the environment", environment=chosen_)
    if "torch" in modules:  # its OpenMP runtime has read the environment already; a change would do nothing
        return dict(set=False, reason="torch was imported before the setting could be made", environment={})
    settings = openmp_defaults(environ)
    environ.update(settings)
    return dict(set=True, environment=settings)
