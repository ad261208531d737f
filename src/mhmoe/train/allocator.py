"""CPU memory allocator settings for training processes (glibc Linux).

Why: a training step on the CPU allocates and frees the same large activation tensors again and
again. With glibc's defaults a block above the (adaptive, at most 32 MiB) mmap threshold gets its
own mapping, returned to the kernel when freed, and free memory at the top of the heap past the
trim threshold is returned too; the next step page-faults all of it back in, zero-filling every
page. On the `cpu` preset that was about a third of the step (`benchmarks/README.md`,
"allocator"). Serving every block from the heap and trimming only past 1 GiB keeps freed memory
in the process for reuse, which is what jemalloc / tcmalloc do by design.

`tune_cpu_allocator` is called once by the `mhmoe` command line; library code never changes process
settings on its own. Call it yourself at the start of your own CPU training script, or preload
jemalloc / tcmalloc instead. Set MHMOE_TUNE_MALLOC=0 to keep glibc's defaults; explicit glibc
MALLOC_*_ environment settings are respected (nothing is changed then).
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

TRIM_THRESHOLD = 1 << 30

_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

# What the last `tune_cpu_allocator` call did in this process (None: never called); a process
# setting, so benchmarks can record it next to their numbers.
state: dict | None = None


def tune_cpu_allocator(trim_threshold: int = TRIM_THRESHOLD) -> dict:
    """Keep freed memory for reuse instead of returning it to the kernel. Returns what was done.

    Every block comes from the heap (no per-block mmap), and up to `trim_threshold` bytes of free
    heap stay mapped. The cost: the process may keep up to about `trim_threshold` more resident
    memory than it uses, and memory freed below the heap's top returns to the kernel only when the
    process ends. A no-op (with the reason in the result) off glibc, with MHMOE_TUNE_MALLOC=0, or
    when glibc's MALLOC_*_ variables or malloc tunables are set.
    """
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) or trim_threshold < 0:
        raise ValueError(f"trim_threshold must be a non-negative integer of bytes, got {trim_threshold!r}")
    global state
    state = _tune(trim_threshold)
    return state


def _tune(trim_threshold: int) -> dict:
    if os.environ.get("MHMOE_TUNE_MALLOC", "1") == "0":
        return dict(tuned=False, reason="MHMOE_TUNE_MALLOC=0")
    preset = [name for name in _GLIBC_ENV if name in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        preset.append("GLIBC_TUNABLES")
    if preset:
        return dict(tuned=False, reason=f"{', '.join(preset)} set in the environment")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return dict(tuned=False, reason=f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'})")
    libc = ctypes.CDLL(None)  # the process's own symbols; mallopt is glibc's unless another malloc is preloaded
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return dict(tuned=False, reason="no mallopt in this process")
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        return dict(tuned=False, reason="mallopt refused the settings")
    return dict(tuned=True, mmap_max=0, trim_threshold=trim_threshold)
