"""A small circuit breaker per provider, so a dead ESP does not slow every message.

closed     every call goes through; ``threshold`` transient failures in a row open it
open       calls are skipped (the next provider of the route is used) for ``cooldown``
half-open  after the cool-down one trial call goes through: success closes the
           breaker, failure opens it again for another cool-down
"""

from __future__ import annotations

import enum
import logging

from esprelay.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("esprelay.breaker")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.name = name
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self._clock = clock.monotonic
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        #: Times the breaker opened (or opened again after a failed trial), for metrics.
        self.opens = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until a call may go through again (0 when it may now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def allow(self) -> bool:
        """May a call go through now?  In half-open state, only one trial at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.warning("provider %s recovered: circuit closed", self.name)
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        was_open = self._opened_at is not None
        if self._trial_in_flight or self._failures >= self.threshold:
            self._opened_at = self._clock()
            if not was_open or self._trial_in_flight:
                self.opens += 1
                log.error(
                    "provider %s failing (%d transient failures in a row): circuit open for %.0fs",
                    self.name,
                    self._failures,
                    self.cooldown,
                )
        self._trial_in_flight = False

    def record_neutral(self) -> None:
        """A call ended without saying anything about the provider's health."""
        self._trial_in_flight = False
