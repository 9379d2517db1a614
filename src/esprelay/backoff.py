"""When to try a message again: pure functions, no clock, no I/O.

The delay after attempt ``n`` (1-based) is::

    min(retry_max, retry_initial * 2 ** (n - 1)) * uniform(1 - JITTER, 1 + JITTER)

A provider's own hint (Retry-After, X-RateLimit-Reset, "try again after N seconds")
wins when it asks for longer.  Configuration errors (a bad key) wait at least
``retry_config_error`` so a broken setup does not hammer the ESP.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

JITTER = 0.2


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_initial: float = 15.0
    retry_max: float = 3600.0
    retry_config_error: float = 300.0
    max_queue_lifetime: float = 5 * 86400.0


def next_delay(
    policy: RetryPolicy,
    attempt: int,
    *,
    retry_after: float | None = None,
    config_error: bool = False,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next attempt, after ``attempt`` attempts so far."""
    exponent = max(0, attempt - 1)
    # Cap the exponent so a huge attempt count cannot overflow a float.
    base = min(policy.retry_max, policy.retry_initial * 2.0 ** min(exponent, 60))
    jitter = (rng or random).uniform(1.0 - JITTER, 1.0 + JITTER)
    delay = base * jitter
    if config_error:
        delay = max(delay, policy.retry_config_error)
    if retry_after is not None and retry_after > delay:
        # Honour the provider's hint, but never beyond a day: a broken header
        # must not park a message forever.
        delay = min(retry_after, 86400.0)
    return delay


def expired(policy: RetryPolicy, created_at: float, now: float) -> bool:
    """True once a message has been queued longer than the maximum lifetime."""
    return now - created_at >= policy.max_queue_lifetime
