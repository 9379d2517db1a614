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


#: Allocations (net of frees) between two young-generation collections; CPython's own is 700.
YOUNG_THRESHOLD = 5000


def tune_for_serving() -> None:
    """Collect once, freeze everything start-up allocated, and collect the young
    generation every ``YOUNG_THRESHOLD`` allocations instead of every 700.

    At 700, what twenty sessions and their deliveries hold while in flight (a few
    thousand objects) was walked by nearly every young collection and then again in the
    older generations, though reference counting frees it a moment later: in 6000 2 KB
    messages over 20 sessions, ~540 young collections (~125 us each), ~50 middle and 4-5
    full ones (~7 ms each, pauses of the event loop), ~16 us of CPU per message.  At
    5000: ~20 young, 2 middle and no full collection after start-up, ~4 us per message.
    Only garbage in reference cycles waits for the collector, and it waits a few
    messages longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


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
