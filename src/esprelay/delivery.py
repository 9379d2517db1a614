"""Delivery workers: lease due messages, hand them to a provider, record the outcome.

The mapping from an outcome to what happens next lives in one place,
:meth:`Deliverer._record`:

- success                 -> delivered, with the provider's message id
- PermanentDeliveryError  -> failed, never retried
- TransientDeliveryError  -> queued again after a backoff delay, or failed once the
                             message is older than the maximum queue lifetime
- ProviderConfigError     -> as transient, but slow, and logged as an operator problem
- anything unexpected     -> as transient (a bug must not lose mail), logged with a trace
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from esprelay.backoff import RetryPolicy, expired, next_delay
from esprelay.errors import (
    DeliveryError,
    PermanentDeliveryError,
    ProviderConfigError,
    SpoolError,
    TransientDeliveryError,
)
from esprelay.models import OutboundMessage, SendResult, SpooledMessage
from esprelay.providers.base import Provider
from esprelay.spool.base import Spool

log = logging.getLogger("esprelay.delivery")

#: Called after every attempt with (message, provider name, outcome, error or None,
#: seconds the attempt took).  ``outcome`` is delivered, deferred or failed.
OutcomeHook = Callable[[SpooledMessage, str, str, DeliveryError | None, float], None]


class Deliverer:
    """A bounded pool of delivery tasks fed from the spool."""

    def __init__(
        self,
        spool: Spool,
        providers: Mapping[str, Provider],
        *,
        default_provider: str,
        owner: str,
        concurrency: int,
        lease_time: float,
        poll_interval: float,
        policy: RetryPolicy,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        self._spool = spool
        self._providers = providers
        self._default = default_provider
        self._owner = owner
        self._concurrency = concurrency
        self._lease_time = lease_time
        self._poll_interval = poll_interval
        self._policy = policy
        self._on_outcome = on_outcome
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wake(self) -> None:
        """Look for due work now (a message was just spooled)."""
        self._wake.set()

    def start(self) -> None:
        if self._concurrency > 0:
            # Work committed by other instances sharing the spool wakes us too.
            self._spool.add_listener(self.wake)
            self._loop_task = asyncio.create_task(self._run(), name="esprelay-delivery")
        else:
            log.warning(
                "delivery paused: ESPRELAY_DELIVERY_CONCURRENCY=0, messages are only queued"
            )

    async def stop(self, grace: float) -> None:
        """Stop leasing; give deliveries in flight ``grace`` seconds, then cancel them.

        A cancelled delivery stays leased in the spool and is delivered again after
        a restart (or once its lease expires), so nothing is lost.
        """
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._inflight:
            log.info("waiting up to %.0fs for %d delivery(ies) in flight", grace, self.inflight)
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning(
                    "%d delivery(ies) cut short by shutdown; they will be retried", len(pending)
                )

    async def _run(self) -> None:
        while not self._stopping:
            free = self._concurrency - len(self._inflight)
            leased: list[SpooledMessage] = []
            if free > 0:
                try:
                    leased = await self._spool.lease(self._owner, free, self._lease_time)
                except SpoolError as exc:
                    log.error("cannot lease from spool: %s", exc)
            for message in leased:
                task = asyncio.create_task(self._deliver(message), name=f"deliver-{message.id}")
                self._inflight.add(task)
                task.add_done_callback(self._task_done)
            if leased and len(leased) == free:
                continue  # there may be more due work; look again at once
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _deliver(self, message: SpooledMessage) -> None:
        provider = self._providers.get(message.provider) or self._providers[self._default]
        assert message.raw is not None
        outbound = OutboundMessage(message.id, message.envelope, message.raw)
        started = time.monotonic()
        error: DeliveryError | None = None
        result: SendResult | None = None
        try:
            result = await provider.send(outbound)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            log.exception("unexpected error delivering id=%s via %s", message.id, provider.name)
            error = TransientDeliveryError(
                f"internal error: {type(exc).__name__}", provider=provider.name
            )
        elapsed = time.monotonic() - started
        try:
            outcome = await self._record(message, provider, result, error, elapsed)
        except SpoolError as exc:
            # The lease will expire and the message will be tried again.
            log.error("cannot record outcome of id=%s: %s", message.id, exc)
            return
        if self._on_outcome is not None:
            self._on_outcome(message, provider.name, outcome, error, elapsed)

    async def _record(
        self,
        message: SpooledMessage,
        provider: Provider,
        result: SendResult | None,
        error: DeliveryError | None,
        elapsed: float,
    ) -> str:
        attempt = message.attempts + 1
        common = (message.id, provider.name, attempt, elapsed * 1000)
        if error is None:
            assert result is not None
            await self._spool.mark_delivered(
                message.id,
                owner=self._owner,
                provider=provider.name,
                provider_message_id=result.provider_message_id,
            )
            log.info(
                "delivered id=%s provider=%s attempt=%d ms=%.0f rcpts=%d provider_id=%s",
                *common,
                len(message.envelope.rcpt_tos),
                result.provider_message_id,
            )
            for warning in result.warnings:
                log.warning(
                    "id=%s provider=%s changed the message: %s", message.id, provider.name, warning
                )
            return "delivered"

        now = time.time()
        if isinstance(error, PermanentDeliveryError) or expired(
            self._policy, message.created_at, now
        ):
            reason = str(error)
            if not isinstance(error, PermanentDeliveryError):
                reason = f"expired after {attempt} attempt(s) in the queue: {reason}"
            await self._spool.mark_failed(
                message.id, owner=self._owner, provider=provider.name, error=reason
            )
            log.warning("failed id=%s provider=%s attempt=%d ms=%.0f error=%s", *common, reason)
            return "failed"

        delay = next_delay(
            self._policy,
            attempt,
            retry_after=error.retry_after,
            config_error=isinstance(error, ProviderConfigError),
        )
        await self._spool.mark_retry(
            message.id,
            owner=self._owner,
            provider=provider.name,
            error=str(error),
            next_attempt_at=now + delay,
        )
        level = logging.ERROR if isinstance(error, ProviderConfigError) else logging.WARNING
        log.log(
            level,
            "deferred id=%s provider=%s attempt=%d ms=%.0f retry_in=%.0fs error=%s%s",
            *common,
            delay,
            error,
            " (configuration problem: operator action needed)"
            if isinstance(error, ProviderConfigError)
            else "",
        )
        return "deferred"
