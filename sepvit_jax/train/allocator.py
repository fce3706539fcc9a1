"""Keep freed host memory for reuse: a large speed-up of JAX (and PyTorch) on CPU.

XLA:CPU allocates every executable's buffers (activations, gradients, temporaries) with
`malloc` on each call and frees them after. glibc serves blocks above its mmap threshold
(128 KiB to 32 MiB, adaptive) with fresh anonymous mappings and unmaps them on free, so every
training step faults all of its working memory in again, page by page, and the kernel zeroes each
page. On the 2-core benchmark machine that is about 0.4 ms per MB: a quarter of a `digits`
training step (batch 64: ~74 -> ~56 ms per step, measured with `benchmarks.digits_training`'s
recipe, interleaved runs).

`reuse_freed_memory()` tells glibc to serve every block from its heaps and never give freed
memory back to the system, so the next step finds its pages mapped and warm. The cost: the
process keeps its peak heap size until it exits, which a training or benchmark process reaches
in its first step anyway. A no-op without glibc (macOS, musl) or when `SEPVIT_KEEP_MALLOC=1`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_done = False


def reuse_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse; True when it took effect."""
    global _done
    if _done:
        return True
    if os.environ.get("SEPVIT_KEEP_MALLOC") == "1":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    # mallopt returns 1 on success. No mmap'd blocks; never trim the heap's top.
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
