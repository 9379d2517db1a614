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
