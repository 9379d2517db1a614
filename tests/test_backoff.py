from __future__ import annotations

import random

from esprelay.backoff import RetryPolicy, expired, next_delay

POLICY = RetryPolicy(
    retry_initial=10, retry_max=100, retry_config_error=300, max_queue_lifetime=1000
)


def test_exponential_with_jitter_and_cap() -> None:
    rng = random.Random(1)
    delays = [next_delay(POLICY, n, rng=rng) for n in range(1, 8)]
    bases = [10, 20, 40, 80, 100, 100, 100]
    for delay, base in zip(delays, bases, strict=True):
        assert 0.8 * base <= delay <= 1.2 * base


def test_retry_after_wins_when_longer_and_is_capped() -> None:
    assert next_delay(POLICY, 1, retry_after=500, rng=random.Random(0)) == 500
    assert next_delay(POLICY, 1, retry_after=1, rng=random.Random(0)) < 13
    assert next_delay(POLICY, 1, retry_after=10**9) == 86400


def test_config_errors_wait_longer() -> None:
    assert next_delay(POLICY, 1, config_error=True) >= 300


def test_huge_attempt_counts_do_not_overflow() -> None:
    assert next_delay(POLICY, 10_000) <= 120


def test_expiry() -> None:
    assert not expired(POLICY, created_at=0, now=999)
    assert expired(POLICY, created_at=0, now=1000)
