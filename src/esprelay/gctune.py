"""Garbage-collector settings for a long-running relay.

A full collection walks every object the process holds.  Right after start-up that is
~50,000 objects (the imported modules of the email package, aiohttp, httpx, pydantic...),
none of which will ever be garbage, and each full collection paused the event loop for
tens of milliseconds: the benchmark's p99 accept latency.  ``gc.freeze()`` moves what
start-up allocated out of the collector's sight, so later collections walk only what
serving allocates.  Per-message garbage is freed by reference counting where we control
it (a native SMTP session leaves no reference cycle behind; aiosmtpd's sessions do,
and are left to the collector).
"""

from __future__ import annotations

import gc

#: See :func:`return_large_blocks_to_the_system`.
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory glibc keeps at the top of the heap (see below).
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_for_serving() -> None:
    """Collect once, then freeze everything start-up allocated."""
    gc.collect()
    gc.freeze()


def return_large_blocks_to_the_system() -> bool:
    """Serve allocations of ``MMAP_THRESHOLD`` (8 MiB) and more with their own mappings
    (glibc only).

    glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, so
    after the first few big messages every 10 MB buffer comes from the heap, where freed
    blocks fragment and the peak RSS grows well beyond the bytes in use (measured: 40
    sessions x 10 MB peaked at 1090 MB instead of 889 MB with a fixed threshold).  A
    fixed threshold keeps the biggest buffers in their own mappings, returned to the
    system as soon as they are freed.

    Not lower: a block in a mapping of its own is a fresh one each time, and touching
    it costs a page fault per page (~2.4 ms per 5 MB on a VM), for every copy of a
    message on its way through.  With the threshold at 1 MiB a 5 MB message cost ~48 ms
    of CPU and a 1 MB one ~12; at 8 MiB, 33-40 and 8-10, and the peak RSS of 200 x 5 MB
    fell from 1112 to 762 MB, of 200 x 10 MB from 2128 to 1831 MB (faster messages, fewer
    of them in RAM at once).  Small objects are unaffected.  Returns whether the setting
    was applied.

    Setting the mmap threshold also fixes glibc's trim threshold at its default, 128
    KiB: each time a message's buffers were freed at the top of the heap, the heap was
    shrunk, and the next message's buffers (below 8 MiB, so on the heap) were fresh
    pages again, a fault per page for every copy: a quarter of the CPU of a 5 MB message
    (``perf``).  Up to ``TRIM_THRESHOLD`` (64 MiB) of free memory now stays at the top of
    the heap for the next messages; blocks of 8 MiB and more are unaffected.
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
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, TRIM_THRESHOLD)
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD))
