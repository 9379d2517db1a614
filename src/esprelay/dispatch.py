"""Send one message through a route's providers in order: failover with breakers.

Used by both delivery modes: the queue workers and passthrough.

- A provider whose breaker is open is skipped.
- A transient error (timeout, 5xx, 429, bad credentials...) moves on to the next
  provider of the route.
- A permanent rejection is final: the next ESP would reject the same message.
- If every provider was skipped or failed transiently, the last error is raised
  (a TransientDeliveryError), and the spool schedules a retry.
- A provider's proactive limits (``ESPRELAY_<KIND>_RATE``, ``_CONCURRENCY``;
  :mod:`esprelay.ratelimit`) are kept around each send.  A wait that would last past
  ``max_wait`` (the lease, less one request's time) is not waited: the provider is
  passed over like an open breaker, without counting against it, and the message is
  deferred (RateLimited, retry after the wait) if no other provider takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from esprelay.breaker import CircuitBreaker
from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import (
    DeliveryError,
    PermanentDeliveryError,
    ProviderUnavailable,
    RateLimited,
    TransientDeliveryError,
)
from esprelay.message.idn import ascii_message
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import Provider
from esprelay.ratelimit import Throttled, prepaid

log = logging.getLogger("esprelay.delivery")


@dataclass(frozen=True, slots=True)
class Sent:
    provider: str
    result: SendResult


class ProviderSet:
    """The configured providers by name, each with its circuit breaker."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
        max_wait: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.providers = dict(providers)
        #: Longest wait for a provider's rate or concurrency limit (None: no bound).
        self.max_wait = max_wait
        self._monotonic = clock.monotonic
        self.breakers = {
            name: CircuitBreaker(
                name, threshold=breaker_threshold, cooldown=breaker_cooldown, clock=clock
            )
            for name in self.providers
        }

    def health(self) -> dict[str, dict[str, object]]:
        """Each provider's circuit breaker, for ``/healthz?detail=1``: its state, the
        seconds until it lets a call through again, and how often it has opened."""
        return {
            name: {
                "circuit": breaker.state.value,
                "retry_in": round(breaker.retry_in(), 1),
                "opens": breaker.opens,
            }
            for name, breaker in self.breakers.items()
        }

    def __getitem__(self, name: str) -> Provider:
        return self.providers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.providers

    def all_open(self) -> bool:
        """True when no provider would take a call now (for readiness checks)."""
        return all(b.state.value == "open" for b in self.breakers.values())

    async def send(self, message: OutboundMessage, chain: Iterable[str]) -> Sent:
        """Deliver through the first provider of ``chain`` that takes it."""
        last_error: DeliveryError | None = None
        skipped: list[CircuitBreaker] = []
        deadline = None if self.max_wait is None else self._monotonic() + self.max_wait
        for name in chain:
            provider = self.providers[name]
            breaker = self.breakers[name]
            if not breaker.allow():
                skipped.append(breaker)
                continue
            try:
                # An ESP that takes ASCII addresses only gets IDN domains as Punycode.
                result = await _limited_send(
                    provider,
                    message if provider.smtputf8 else ascii_message(message, name),
                    deadline,
                )
            except Throttled as exc:
                breaker.record_neutral()  # our own limit says nothing of the ESP's health
                last_error = RateLimited(str(exc), provider=name, retry_after=exc.wait)
                log.info("id=%s provider=%s not sent now: %s", message.id, name, exc)
                continue
            except PermanentDeliveryError:
                breaker.record_neutral()
                raise
            except TransientDeliveryError as exc:
                breaker.record_failure()
                last_error = exc
                log.warning(
                    "id=%s provider=%s transient failure, trying the next provider if any: %s",
                    message.id,
                    name,
                    exc,
                )
                continue
            except Exception as exc:
                breaker.record_neutral()
                log.exception("unexpected error delivering id=%s via %s", message.id, name)
                last_error = TransientDeliveryError(
                    f"internal error: {type(exc).__name__}", provider=name
                )
                continue
            breaker.record_success()
            return Sent(name, result)
        if last_error is not None:
            raise last_error
        wait = min((b.retry_in() for b in skipped), default=0.0)
        raise ProviderUnavailable(
            "every provider of the route is unavailable (circuit open)",
            provider=",".join(b.name for b in skipped),
            retry_after=wait or None,
        )


async def _limited_send(
    provider: Provider, message: OutboundMessage, deadline: float | None
) -> SendResult:
    """``provider.send(message)`` within the provider's concurrency and rate limits.

    The message's first token is taken here, where a wait past ``deadline`` can still
    be declined (Throttled); the provider's first request spends it (``prepaid``).
    """
    rate = provider.rate_limit
    if provider.concurrency is None:
        if rate is None:
            return await provider.send(message)
        await rate.acquire(deadline=deadline)
        with prepaid(rate):
            return await provider.send(message)
    # The slot first: a token taken while waiting for a slot would be wasted.
    async with provider.concurrency.slot(deadline=deadline):
        if rate is None:
            return await provider.send(message)
        await rate.acquire(deadline=deadline)
        with prepaid(rate):
            return await provider.send(message)
