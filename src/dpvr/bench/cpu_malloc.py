"""CPU timing runs: keep freed tensor memory in the process, and count the page faults a call takes.

glibc's malloc serves blocks above its mmap threshold with fresh mappings that go back to the OS when
freed, and trims the top of its heap once enough of it is free. Both thresholds adapt to the blocks
seen so far, so how much memory a forward gets back from the OS, and pays a page fault per 4 KiB for,
depends on what ran before it. On the CPU preset a batch-1 prefill took ~80,000 minor faults; in one
interleaved run the routed layers paid for ~10% more time than the same stock layers, in the next
none, and LF's time ratio to vanilla moved between 0.63 and 0.75 from run to run. With both thresholds
fixed, freed memory is reused, a prefill takes no faults at all, and routed and stock layers time the
same. PyTorch's CPU launcher (`python -m torch.backends.xeon.run_cpu`) swaps in jemalloc or tcmalloc
for the same reason; fixing glibc's thresholds needs nothing installed.

    keep_freed_memory()   # once, before the model is built; `dpvr bench` does this on CPU
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
