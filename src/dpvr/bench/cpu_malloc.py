"""CPU timing runs: keep freed tensor memory in the process, and count the page faults a call takes.

glibc's malloc hands large blocks back to the OS when they are freed (blocks above its mmap threshold,
and the top of a heap once enough of it is free: for a thread other than the main one, such as an
intra-op worker, on every reuse in tests/test_bench.py), so the next forward faults the same pages in
again, one fault per 4 KiB. The thresholds adapt to the blocks seen so far, so how much a forward pays
depends on what ran before it. In `dpvr bench --no-keep-freed-memory` on the CPU preset, the first
prefill shape took ~189,000 minor faults per vanilla prefill and ~109,000 per LF prefill, the later
shapes none: LF's ratio in that shape gained from vanilla's extra faults, not from its own work. With both
thresholds fixed, freed memory is reused and no prefill faults at all (docs/bench.md has both runs).
The GPU analogue is PyTorch's caching allocator, which never gives memory back between forwards;
PyTorch's CPU launcher (`python -m torch.backends.xeon.run_cpu`) swaps in jemalloc or tcmalloc for
the same reason. Fixing glibc's thresholds needs nothing installed.

    keep_freed_memory()   # once, early; `dpvr bench` does this on CPU unless --no-keep-freed-memory
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_memory() -> str | None:
    """Fix glibc's mmap threshold at its maximum and turn heap trimming off, for this process. Returns
    what was set (for the record of a run), or None where the C library is not glibc (macOS, Windows,
    musl): there nothing changes. Blocks above 32 MiB are still mapped and unmapped each time."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    # mallopt returns 1 on success; -1 for M_TRIM_THRESHOLD turns trimming off altogether (mallopt(3))
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) != 1 or libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:
        return None
    return f"glibc {version().decode()}: mmap threshold {MMAP_THRESHOLD_MAX >> 20} MiB, heap trimming off"


def minor_faults() -> int | None:
    """Minor page faults this process has taken so far (all threads), or None where not counted."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
