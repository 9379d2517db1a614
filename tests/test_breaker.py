from __future__ import annotations

from esprelay.breaker import BreakerState, CircuitBreaker
from tests.fakeclock import FakeClock


def test_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("esp", threshold=3, cooldown=30, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == 30

    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # one trial
    assert not breaker.allow()  # and only one at a time
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN

    clock.advance(31)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.opens == 2  # opened, then again after the failed trial


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker("esp", threshold=2, cooldown=30, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_neutral_outcome_frees_the_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("esp", threshold=1, cooldown=5, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    assert breaker.allow()
    breaker.record_neutral()
    assert breaker.allow()
