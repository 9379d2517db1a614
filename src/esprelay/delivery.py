"""Delivery workers: lease due messages, send them along their route, record the outcome.

The mapping from an outcome to what happens next lives in one place,
:meth:`Deliverer._record`:

- success                 -> delivered, with the provider's message id
- success for some recipients only (``SendResult.rejected``) -> partial: the recipients
                             refused for good are bounced, those refused for now are
                             queued again alone (``Spool.mark_partial``), and the
                             accepted ones are never sent to again; when no recipient
                             was accepted, the whole message is failed (every refusal
                             permanent) or deferred (every refusal transient)
- PermanentDeliveryError  -> failed, never retried (and a bounce, see app.py)
- TransientDeliveryError  -> queued again after a backoff delay, or failed once the
                             message is older than the maximum queue lifetime
- ProviderConfigError     -> as transient, but slow, and logged as an operator problem
- anything unexpected     -> as transient (a bug must not lose mail), logged with a trace

Each message carries its route's provider chain (``meta["providers"]``); failover
along it and the circuit breakers live in :mod:`esprelay.dispatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from esprelay.backoff import RetryPolicy, expired, next_delay
from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.dispatch import ProviderSet, Sent
from esprelay.errors import (
    DeliveryError,
    PermanentDeliveryError,
    ProviderConfigError,
    SpoolError,
    TransientDeliveryError,
)
from esprelay.message.idn import ascii_address
from esprelay.models import OutboundMessage, SpooledMessage
from esprelay.spool.base import Spool

log = logging.getLogger("esprelay.delivery")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to: delivered, deferred or failed."""

    message: SpooledMessage
    provider: str
    outcome: str
    error: DeliveryError | None
    elapsed: float
    expired: bool = False
    #: The recipients this attempt bounced, each with its own error: a permanent
    #: refusal, or a transient one of a message past its queue lifetime.  Set when a
    #: provider refused some recipients only (``SendResult.rejected``); empty, a
    #: ``failed`` outcome bounces every recipient with ``error``.
    bounced: tuple[tuple[str, DeliveryError], ...] = ()
    #: The recipients a ``partial`` outcome accepted, and those it queued again.
    accepted: tuple[str, ...] = ()
    retried: tuple[str, ...] = ()


#: Called after every recorded attempt.
OutcomeHook = Callable[[Outcome], None]


def provider_chain(message: SpooledMessage, default: tuple[str, ...]) -> tuple[str, ...]:
    """The providers to try for ``message``, in order."""
    chain = message.meta.get("providers")
    if isinstance(chain, list) and chain:
        return tuple(str(name) for name in chain)
    return (message.provider,) if message.provider else default


class Deliverer:
    """A bounded pool of delivery tasks fed from the spool."""

    def __init__(
        self,
        spool: Spool,
        providers: ProviderSet,
        *,
        default_chain: tuple[str, ...],
        owner: str,
        concurrency: int,
        lease_time: float,
        poll_interval: float,
        policy: RetryPolicy,
        on_outcome: OutcomeHook | None = None,
        on_failed: OutcomeHook | None = None,
        clock: Clock = SYSTEM_CLOCK,
        memory_budget: int = 0,
    ) -> None:
        self._spool = spool
        self._providers = providers
        self._default_chain = default_chain
        self._owner = owner
        self._concurrency = concurrency
        self._lease_time = lease_time
        self._poll_interval = poll_interval
        self._policy = policy
        self._on_outcome = on_outcome
        self._on_failed = on_failed
        # Retry times are wall-clock (stored in the spool), attempt durations monotonic;
        # the poll interval and the shutdown grace are waited for on the same clock.
        self._time = clock.time
        self._monotonic = clock.monotonic
        self._timeout = clock.timeout
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[Outcome | None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        # Ids whose SMTP client is still waiting for an inline attempt: a permanent
        # failure is then told to the client (5xx) instead of bounced.
        self._client_waiting: set[str] = set()
        # Worker slots promised to messages being spooled for a direct hand-off.
        self._reserved = 0
        # The bytes of the messages being delivered (or promised a slot) may add up to
        # ``memory_budget`` (0: no limit), plus one message: the spool is asked for no
        # more than what is left, and a message that does not fit is not handed off.
        # (Each costs a few times its size while its request is built and sent.)
        self._memory_budget = memory_budget
        self._bytes_in_flight = 0
        self._task_bytes: dict[asyncio.Task[Outcome | None], int] = {}
        # The spool may hold due work for us (see _run); true at start: recovery.
        self._due = True

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def lease_time(self) -> float:
        return self._lease_time

    def set_default_chain(self, chain: tuple[str, ...]) -> None:
        """The providers for messages spooled without a chain (a routes reload)."""
        self._default_chain = chain

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wake(self) -> None:
        """Look for due work now (a message was just spooled for the workers to lease)."""
        self._due = True
        self._wake.set()

    def start(self) -> None:
        if self._concurrency > 0:
            # Work committed by other instances sharing the spool wakes us too.
            self._spool.add_listener(self.wake)
            self._loop_task = asyncio.create_task(self._run(), name="esprelay-delivery")
        else:
            log.warning(
                "delivery paused (ESPRELAY_DELIVERY_CONCURRENCY=0): messages are only queued"
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
            tasks = set(self._inflight)
            with contextlib.suppress(TimeoutError):
                async with self._timeout(grace):
                    await asyncio.wait(tasks)
            pending = {task for task in tasks if not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning(
                    "%d delivery(ies) cut short by shutdown; they will be retried", len(pending)
                )

    async def attempt_inline(self, message: SpooledMessage, timeout: float) -> Outcome | None:
        """Deliver ``message`` (already leased to us) while its SMTP client waits.

        Returns the outcome if it came within ``timeout``, else None; the delivery
        then goes on in the background like any other.
        """
        self._client_waiting.add(message.id)
        task = self._spawn(message)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        finally:
            self._client_waiting.discard(message.id)
        return task.result() if task in done else None

    @property
    def bytes_in_flight(self) -> int:
        """The sizes of the messages being delivered or promised a slot, added up."""
        return self._bytes_in_flight

    def reserve(self, count: int, size: int = 0) -> bool:
        """Hold ``count`` worker slots for messages of ``size`` bytes each about to be
        spooled already leased.

        False when the pool is stopped, paused or has no room (slots, or memory for
        their bytes): spool them as usual, for the workers to lease when there is.
        """
        if self._stopping or self._loop_task is None:
            return False
        if self._concurrency - len(self._inflight) - self._reserved < count:
            return False
        budget = self._memory_budget
        if budget and self._bytes_in_flight + count * size > budget:
            return False
        self._reserved += count
        self._bytes_in_flight += count * size
        return True

    def release(self, count: int, size: int = 0) -> None:
        """Give back reserved slots (for messages of ``size`` bytes each) whose messages
        were not spooled."""
        self._reserved = max(0, self._reserved - count)
        self._bytes_in_flight = max(0, self._bytes_in_flight - count * size)

    def dispatch_reserved(self, message: SpooledMessage) -> None:
        """Deliver a message spooled already leased to us, in a slot reserved for it."""
        self.release(1, message.size)
        if self._stopping:
            return  # stays leased in the spool: recovered at the next start
        self._spawn(message)

    def _spawn(self, message: SpooledMessage) -> asyncio.Task[Outcome | None]:
        task = asyncio.create_task(self._deliver(message), name=f"deliver-{message.id}")
        self._inflight.add(task)
        self._task_bytes[task] = message.size
        self._bytes_in_flight += message.size
        task.add_done_callback(self._task_done)
        return task

    def _room(self) -> int | None:
        """The bytes the spool may lease now (None: no limit)."""
        if not self._memory_budget:
            return None
        return self._memory_budget - self._bytes_in_flight

    async def _run(self) -> None:
        # The spool is asked for due work when it may hold some (``_due``): after a
        # wake-up (a message spooled without a hand-off, another instance's work, an
        # admin retry), after each poll interval (retries come due), and while a lease
        # filled every free slot.  A message handed off at intake needs no query, nor
        # does a finished delivery unless work is waiting for its slot.
        while not self._stopping:
            self._wake.clear()  # before the query: a wake-up during it is kept
            free = self._concurrency - len(self._inflight) - self._reserved
            room = self._room()
            if free > 0 and self._due and (room is None or room > 0):
                self._due = False
                leased: list[SpooledMessage] = []
                try:
                    if room is None:
                        leased = await self._spool.lease(self._owner, free, self._lease_time)
                    else:
                        leased = await self._spool.lease(
                            self._owner, free, self._lease_time, max_bytes=room
                        )
                except SpoolError as exc:
                    log.error("cannot lease from spool: %s", exc)
                for message in leased:
                    self._spawn(message)
                if leased and len(leased) == free:
                    self._due = True
                    continue  # there may be more due work; look again at once
                if leased and room is not None:
                    # Perhaps as many as the memory left allowed: look again once a
                    # delivery ends and gives some back (at once, the spool would hand
                    # over one more message past the budget).
                    self._due = True
            try:
                async with self._timeout(self._poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                self._due = True

    def _task_done(self, task: asyncio.Task[Outcome | None]) -> None:
        self._inflight.discard(task)
        self._bytes_in_flight -= self._task_bytes.pop(task, 0)
        if self._due:
            self._wake.set()  # a slot is free for work that is waiting

    async def _deliver(self, message: SpooledMessage) -> Outcome | None:
        chain = tuple(
            name for name in provider_chain(message, self._default_chain) if name in self._providers
        )
        if not chain:
            log.warning(
                "id=%s names no configured provider (%s); using the default route",
                message.id,
                ",".join(provider_chain(message, ())),
            )
            chain = self._default_chain
        assert message.raw is not None
        outbound = OutboundMessage(message.id, message.envelope, message.raw)
        started = self._monotonic()
        error: DeliveryError | None = None
        sent: Sent | None = None
        try:
            sent = await self._providers.send(outbound, chain)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:
            log.exception("unexpected error delivering id=%s", message.id)
            error = TransientDeliveryError(f"internal error: {type(exc).__name__}")
        elapsed = self._monotonic() - started
        provider = (
            sent.provider if sent else (error.provider if error and error.provider else chain[0])
        )
        try:
            outcome = await self._record(message, provider, sent, error, elapsed)
        except SpoolError as exc:
            # The lease will expire and the message will be tried again.
            log.error("cannot record outcome of id=%s: %s", message.id, exc)
            return None
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        if self._on_failed is not None:
            if outcome.outcome == "failed":
                # A client still waiting is told instead (5xx), as an MTA refusing DATA.
                if message.id not in self._client_waiting:
                    self._on_failed(outcome)
            elif outcome.bounced:
                # Some recipients refused after the message was accepted for others: the
                # client gets 250 for the message, so these are bounced like any failure.
                self._on_failed(outcome)
        return outcome

    async def _record(
        self,
        message: SpooledMessage,
        provider: str,
        sent: Sent | None,
        error: DeliveryError | None,
        elapsed: float,
    ) -> Outcome:
        attempt = message.attempts + 1
        common = (message.id, provider, attempt, elapsed * 1000)
        fields = {
            "message_id": message.id,
            "provider": provider,
            "attempt": attempt,
            "ms": round(elapsed * 1000),
        }
        if error is None:
            assert sent is not None
            result = sent.result
            if result.rejected:
                rejected = self._matched(message, provider, result.rejected)
                if rejected:
                    return await self._record_partial(message, provider, sent, rejected, elapsed)
            recorded = await self._spool.mark_delivered(
                message.id,
                owner=self._owner,
                provider=provider,
                provider_message_id=result.provider_message_id,
            )
            log.info(
                "delivered id=%s provider=%s attempt=%d ms=%.0f rcpts=%d provider_id=%s",
                *common,
                len(message.envelope.rcpt_tos),
                result.provider_message_id,
                extra={
                    **fields,
                    "event": "delivered",
                    "provider_message_id": result.provider_message_id,
                },
            )
            if not recorded:
                log.warning("id=%s: lease was lost before the outcome was recorded", message.id)
            for warning in result.warnings:
                log.warning(
                    "id=%s provider=%s changed the message: %s", message.id, provider, warning
                )
            return Outcome(message, provider, "delivered", None, elapsed)

        now = self._time()
        too_old = not isinstance(error, PermanentDeliveryError) and expired(
            self._policy, message.created_at, now
        )
        if isinstance(error, PermanentDeliveryError) or too_old:
            reason = str(error)
            if too_old:
                reason = f"expired after {attempt} attempt(s) in the queue: {reason}"
            await self._spool.mark_failed(
                message.id, owner=self._owner, provider=provider, error=reason
            )
            log.warning(
                "failed id=%s provider=%s attempt=%d ms=%.0f error=%s",
                *common,
                reason,
                extra={**fields, "event": "failed", "error": reason},
            )
            return Outcome(message, provider, "failed", error, elapsed, expired=too_old)

        delay = self._delay(attempt, (error,))
        await self._spool.mark_retry(
            message.id,
            owner=self._owner,
            provider=provider,
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
            extra={**fields, "event": "deferred", "retry_in": round(delay), "error": str(error)},
        )
        return Outcome(message, provider, "deferred", error, elapsed)

    def _delay(self, attempt: int, errors: Sequence[DeliveryError]) -> float:
        """Seconds until the next attempt after ``errors``: the longest any asks for."""
        hints = [e.retry_after for e in errors if e.retry_after is not None]
        return next_delay(
            self._policy,
            attempt,
            retry_after=max(hints) if hints else None,
            config_error=any(isinstance(e, ProviderConfigError) for e in errors),
        )

    @staticmethod
    def _matched(
        message: SpooledMessage, provider: str, rejected: Sequence[tuple[str, DeliveryError]]
    ) -> dict[str, DeliveryError]:
        """The envelope recipients a provider refused, in envelope order, each with the
        first error given for it.  A provider may give an address in another case, or
        with its domain in Punycode (an ASCII-only ESP gets it so, see dispatch.py); one
        that names no envelope recipient at all is logged and left out."""
        rcpts = message.envelope.rcpt_tos
        folded: dict[str, str] = {}
        for envelope_rcpt in reversed(rcpts):
            folded[envelope_rcpt.casefold()] = envelope_rcpt
            folded[(ascii_address(envelope_rcpt) or envelope_rcpt).casefold()] = envelope_rcpt
        found: dict[str, DeliveryError] = {}
        for address, error in rejected:
            rcpt = address if address in rcpts else folded.get(address.casefold())
            if rcpt is None:
                log.warning(
                    "id=%s provider=%s refused <%s>, which is not an envelope recipient: ignored",
                    message.id,
                    provider,
                    address,
                )
                continue
            found.setdefault(rcpt, error)
        return {rcpt: found[rcpt] for rcpt in dict.fromkeys(rcpts) if rcpt in found}

    async def _record_partial(
        self,
        message: SpooledMessage,
        provider: str,
        sent: Sent,
        rejected: dict[str, DeliveryError],
        elapsed: float,
    ) -> Outcome:
        """The provider took the message for all recipients but ``rejected``."""
        attempt = message.attempts + 1
        result = sent.result
        fields: dict[str, Any] = {
            "message_id": message.id,
            "provider": provider,
            "attempt": attempt,
            "ms": round(elapsed * 1000),
        }
        now = self._time()
        too_old = expired(self._policy, message.created_at, now)
        accepted = tuple(r for r in dict.fromkeys(message.envelope.rcpt_tos) if r not in rejected)
        # A transient refusal is retried for its recipient alone, until the message is
        # past its queue lifetime: then it is bounced as a deferred message would be.
        bounced = tuple(
            (r, e) for r, e in rejected.items() if isinstance(e, PermanentDeliveryError) or too_old
        )
        bounced_now = {r for r, _ in bounced}
        retried = tuple((r, e) for r, e in rejected.items() if r not in bounced_now)
        expired_now = too_old and any(not isinstance(e, PermanentDeliveryError) for _, e in bounced)
        delay = self._delay(attempt, [e for _, e in retried]) if retried else 0.0

        if not accepted and not retried:
            # Every recipient refused for good: the message failed, as a whole.
            error = _one_error([e for _, e in bounced], provider)
            reason = str(error)
            if expired_now:
                reason = f"expired after {attempt} attempt(s) in the queue: {reason}"
            await self._spool.mark_failed(
                message.id, owner=self._owner, provider=provider, error=reason
            )
            self._log_rejections(message, provider, bounced, retried, fields)
            log.warning(
                "failed id=%s provider=%s attempt=%d ms=%.0f error=%s",
                message.id,
                provider,
                attempt,
                elapsed * 1000,
                reason,
                extra={**fields, "event": "failed", "error": reason},
            )
            return Outcome(
                message, provider, "failed", error, elapsed, expired=expired_now, bounced=bounced
            )
        if not accepted and not bounced:
            # Every recipient refused for now: the message is deferred, as a whole.
            error = _one_error([e for _, e in retried], provider)
            await self._spool.mark_retry(
                message.id,
                owner=self._owner,
                provider=provider,
                error=str(error),
                next_attempt_at=now + delay,
            )
            self._log_rejections(message, provider, bounced, retried, fields)
            log.warning(
                "deferred id=%s provider=%s attempt=%d ms=%.0f retry_in=%.0fs error=%s",
                message.id,
                provider,
                attempt,
                elapsed * 1000,
                delay,
                error,
                extra={
                    **fields,
                    "event": "deferred",
                    "retry_in": round(delay),
                    "error": str(error),
                },
            )
            return Outcome(message, provider, "deferred", error, elapsed)

        note = _partial_note(accepted, bounced, retried)
        recorded = await self._spool.mark_partial(
            message.id,
            owner=self._owner,
            provider=provider,
            provider_message_id=result.provider_message_id,
            note=note,
            rcpt_tos=[r for r, _ in retried],
            next_attempt_at=now + delay if retried else None,
        )
        log.info(
            # "delivered" to the accepted recipients; with none accepted, "partial".
            "%s id=%s provider=%s attempt=%d ms=%.0f rcpts=%d provider_id=%s rejected=%d",
            "delivered" if accepted else "partial",
            message.id,
            provider,
            attempt,
            elapsed * 1000,
            len(accepted),
            result.provider_message_id,
            len(rejected),
            extra={
                **fields,
                "event": "partial",
                "provider_message_id": result.provider_message_id,
                "accepted": len(accepted),
                "bounced": len(bounced),
                "retried": len(retried),
            },
        )
        self._log_rejections(message, provider, bounced, retried, fields)
        for warning in result.warnings:
            log.warning("id=%s provider=%s changed the message: %s", message.id, provider, warning)
        if retried:
            log.info(
                "deferred id=%s provider=%s attempt=%d retry_in=%.0fs rcpts=%d"
                " (the other recipients are done)",
                message.id,
                provider,
                attempt,
                delay,
                len(retried),
                extra={**fields, "event": "deferred", "retry_in": round(delay)},
            )
        if not recorded:
            # Another worker has the message now and sends it whole again (at least
            # once); its own outcome decides the bounces.
            log.warning("id=%s: lease was lost before the outcome was recorded", message.id)
            bounced = ()
        return Outcome(
            message,
            provider,
            "partial",
            None,
            elapsed,
            expired=expired_now,
            bounced=bounced,
            accepted=accepted,
            retried=tuple(r for r, _ in retried),
        )

    @staticmethod
    def _log_rejections(
        message: SpooledMessage,
        provider: str,
        bounced: Sequence[tuple[str, DeliveryError]],
        retried: Sequence[tuple[str, DeliveryError]],
        fields: dict[str, Any],
    ) -> None:
        for action, rejections in (("bounce", bounced), ("retry", retried)):
            for rcpt, error in rejections:
                log.warning(
                    "rejected id=%s provider=%s rcpt=<%s> action=%s error=%s",
                    message.id,
                    provider,
                    rcpt,
                    action,
                    error,
                    extra={
                        **fields,
                        "event": "rejected",
                        "rcpt": rcpt,
                        "action": action,
                        "error": str(error),
                    },
                )


def _one_error(errors: Sequence[DeliveryError], provider: str) -> DeliveryError:
    """The error of a message whose recipients were all refused: theirs if they share
    one, else one of the same kind that names each."""
    first = errors[0]
    if all(str(e) == str(first) for e in errors):
        return first
    kind = (
        PermanentDeliveryError
        if isinstance(first, PermanentDeliveryError)
        else (TransientDeliveryError)
    )
    said = "; ".join(str(e.args[0]) if e.args else str(e) for e in errors)
    return kind(
        f"every recipient refused: {said}",
        provider=provider,
        status_code=first.status_code,
    )


def _partial_note(
    accepted: Sequence[str],
    bounced: Sequence[tuple[str, DeliveryError]],
    retried: Sequence[tuple[str, DeliveryError]],
) -> str:
    """What a partial attempt did to each recipient, for the history and ``last_error``."""
    parts = []
    if accepted:
        parts.append("accepted " + " ".join(f"<{r}>" for r in accepted))
    for label, rejections in (("bounced", bounced), ("retried", retried)):
        if rejections:
            parts.append(f"{label} " + ", ".join(f"<{r}> ({e})" for r, e in rejections))
    return "; ".join(parts)
