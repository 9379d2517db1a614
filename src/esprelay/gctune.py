"""Garbage-collector settings for a long-running relay.

A full collection walks every object the process holds.  Right after start-up that is
~50,000 objects (the imported modules of the email package, aiohttp, httpx, pydantic...),
none of which will ever be garbage, and each full collection paused the event loop for
tens of milliseconds: the benchmark's p99 accept latency.  ``gc.freeze()`` moves what
start-up allocated out of the collector's sight, so later collections walk only what
serving allocates.  Per-message garbage is freed by reference counting where we control
it (an SMTP session breaks its own reference cycles when it ends, see
``RelaySMTP._end_reached``).
"""

from __future__ import annotations

import gc


def tune_for_serving() -> None:
    """Collect once, then freeze everything start-up allocated."""
    gc.collect()
    gc.freeze()


def return_large_blocks_to_the_system() -> bool:
    """Serve allocations of 1 MiB and more with their own mappings (glibc only).

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, so
    after the first few big messages every 10 MB buffer comes from the heap, where freed
    blocks fragment and the peak RSS grows well beyond the bytes in use (measured: 40
    sessions x 10 MB peaked at 975 MB instead of 752 MB with a fixed threshold).  A
    fixed threshold keeps big message buffers in their own mappings, returned to the
    system as soon as they are freed.  Small objects are unaffected.  Returns whether
    the setting was applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 1024 * 1024))
