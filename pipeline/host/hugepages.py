"""Back the loaded weights with 2 MiB pages (Linux with transparent huge pages; elsewhere a no-op).

Decoding one sequence reads every weight once per token, so its speed is the speed at which
one core streams the weights from memory. With 4 KiB pages that stream takes a TLB miss every
4 KiB (dear in a virtual machine, where each miss walks two page tables); with 2 MiB pages
one miss covers 512 times as much. Measured on a 2-core AMD EPYC VM (1 core per rank,
bench-qwen2-200m float32): one-sequence decode +8-11% on 1 and on 2 ranks; 32 sequences and
prefill, which are compute-bound, unchanged (docs/benchmarks.md).

MLX allocates its buffers with plain 4 KiB pages. Linux lets a process ask for huge pages on
a range it owns: madvise(MADV_HUGEPAGE) marks the range, and madvise(MADV_COLLAPSE) (Linux
6.1+) moves its pages onto huge pages at once, keeping addresses and contents. Only the
2 MiB-aligned middle of each weight's own buffer is advised, never memory beyond it.
PIPELINE_HUGE_PAGES=0 turns it off (for side-by-side benchmarks).
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def wanted() -> bool:
    return sys.platform == "linux" and os.environ.get("PIPELINE_HUGE_PAGES", "1") != "0"


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def anon_huge_bytes() -> int:
    """Bytes of this process's anonymous memory on huge pages (from /proc/self/smaps_rollup)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _aligned_range(array) -> tuple[int, int]:
    """The 2 MiB-aligned [start, end) inside an evaluated mx.array's buffer."""
    view = np.frombuffer(array, dtype=np.uint8)  # the array's own memory, not a copy
    start = view.ctypes.data
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + view.nbytes) // HUGE_PAGE * HUGE_PAGE
    return lo, hi


def advise(arrays) -> int:
    """Ask for huge pages under each (evaluated) array; returns the bytes collapsed onto huge
    pages now (0 where the platform, the kernel or PIPELINE_HUGE_PAGES says no). Where the
    kernel has MADV_HUGEPAGE but not MADV_COLLAPSE, its background daemon may still move
    the marked ranges later."""
    if not wanted() or thp_mode() in (None, "never"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    can_collapse = True
    for a in arrays:
        lo, hi = _aligned_range(a)
        if hi - lo < HUGE_PAGE:
            continue
        if libc.madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
            return collapsed  # not allowed here (seccomp, old kernel): nothing more to gain
        if can_collapse:
            if libc.madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
                collapsed += hi - lo
            elif ctypes.get_errno() == 22:  # EINVAL: kernel before 6.1
                can_collapse = False
    return collapsed
