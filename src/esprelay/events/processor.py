"""What the ESP events do: the inbox's events applied to the messages they name.

:class:`EventProcessor` runs beside the events listener (started with it by
:func:`esprelay.events.service.start_events`).  It takes the pending events of the
inbox in bounded batches (oldest first), applies each batch
(:meth:`EventProcessor.apply_batch`) and only then marks it finished.  A batch costs
the spool a few operations whatever it holds: its messages read at once (without
their bodies, except those a DSN needs, read at once too), and all its events'
timeline and status rows and DSN claims written in one transaction
(``apply_events``: on PostgreSQL five round trips), with the outcome of applying them
one after the other; then its DSNs are queued one by one.  It is woken when the
listener stores events, and looks again every :data:`POLL_INTERVAL` seconds (events
stored by another instance sharing a PostgreSQL spool, or left by a crash).

Applying an event (in a batch, or alone with :meth:`EventProcessor.apply`):

1. find its message: by the spool id esprelay sent along (``Event.esprelay_id``, the
   inbox resolved it on the way in), else by the ESP's message id
   (``find_by_provider_message_id``).  None (purged, or never ours): finished, nothing
   else (the listener counted it as unknown at intake);
2. add it to the message's timeline and the recipient's status
   (:class:`~esprelay.events.status.MessageStatusStore`).  Idempotent: the timeline
   holds an event once, so the same event twice, or one applied again after a crash
   between applying and finishing, changes nothing;
3. a delivery status notification to the envelope sender (``ESPRELAY_BOUNCE_MODE``),
   built by :func:`esprelay.message.dsn.build_dsn` and queued like any bounce
   (:func:`esprelay.failures.queue_dsn`):

   - ``failed`` for a ``bounced`` or ``dropped`` event whose status is permanent
     (``5.x.x``, or none given) when the recipient's NOTIFY asks for failures (the
     default);
   - ``delivered`` for a ``delivered`` event when NOTIFY has ``SUCCESS``;
   - ``delayed`` for a ``deferred`` event ``ESPRELAY_DELAY_DSN_AFTER`` or more after
     intake when NOTIFY has ``DELAY``.

   At most one of each kind per recipient, however many events the ESP sends: the DSN
   is claimed in the transaction that applies the event (its batch), then queued (a
   crash between the two may lose the batch's DSNs not queued yet, and never sends one
   twice; one the spool cannot queue is given back with those of the batch after it,
   and those events tried again).  Never a bounce of a bounce:
   none for a null sender, ``Auto-Submitted`` mail (other than ``no``), a DSN, or a
   message from the bounce address itself (a loop).

4. with ``ESPRELAY_FAILURE_WEBHOOK_EVENTS``, a new event of those kinds is also POSTed
   to the failure webhook (:mod:`esprelay.events.forward`).

The DSN returns what the spool still holds of the message.  A delivered message's body
is dropped at its delivery, so a bounce reported later has the header section kept at
intake (``meta.headers``: kept whenever the events listener is on) and never the full
message, whatever ``RET`` asked; a failed or waiting message still has its body, and
``RET=FULL`` returns it whole.  A message spooled without kept headers (before the
listener was turned on) is reported with its Message-ID alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import SpoolError
from esprelay.events.forward import EventForwarder
from esprelay.events.model import Event, EventInbox, StoredEvent
from esprelay.events.status import Application, Applied, MessageStatusStore
from esprelay.failures import no_dsn_reason, notice_recipient, queue_dsn
from esprelay.message.dsn import build_dsn, from_meta
from esprelay.message.header import read_header
from esprelay.metrics import RelayMetrics
from esprelay.models import SpooledMessage

log = logging.getLogger("esprelay.events")

#: Events taken from the inbox at a time.
BATCH = 100
#: Seconds between looks at the inbox when nothing wakes the processor.
POLL_INTERVAL = 5.0
#: Seconds before trying again after the spool failed.
ERROR_PAUSE = 5.0
#: Seconds between purges of the processed events (as :mod:`esprelay.purge`).
PURGE_INTERVAL = 600.0
#: Processed events are kept at least this long (seconds): an ESP retrying a webhook
#: within it finds its event stored already.  (One retried after it is stored again and
#: applied again, which changes nothing: the message's timeline has it.)
MIN_INBOX_RETENTION = 86400.0

_ACTIONS = {"failure": "failed", "success": "delivered", "delay": "delayed"}


def is_permanent(event: Event) -> bool:
    """A ``bounced`` or ``dropped`` event that is a failure for good: status ``5.x.x``,
    or none given (the ESP gave up without saying how)."""
    if event.kind not in ("bounced", "dropped"):
        return False
    return event.smtp_status is None or event.smtp_status.startswith("5")


def header_section(message: SpooledMessage) -> bytes | None:
    """The message's header section: from its body while the spool has it, else as kept
    at intake (``meta.headers``), else None."""
    if message.raw is not None:
        return message.raw[: read_header(message.raw).end]
    kept = message.meta.get("headers")
    if isinstance(kept, str):
        return kept.encode("latin-1", "replace")
    return None


def diagnostic_code(event: Event) -> str | None:
    """``smtp; <reply>`` when the event's text is an SMTP reply, else None (the
    builder's ``X-ESP-API; <text>``)."""
    text = " ".join((event.diagnostic or "").split())
    if len(text) >= 3 and text[:3].isdigit() and text[0] in "245":
        return f"smtp; {text}"
    return None


class EventProcessor:
    """Applies the inbox's pending events (see the module doc)."""

    def __init__(
        self,
        *,
        inbox: EventInbox,
        store: MessageStatusStore,
        spool: Any,
        hostname: str,
        bounce_mode: str,
        bounce_from: str | None,
        delay_dsn_after: float,
        default_chain: tuple[str, ...],
        metrics: RelayMetrics | None = None,
        wake_delivery: Callable[[], None] | None = None,
        forwarder: EventForwarder | None = None,
        clock: Clock = SYSTEM_CLOCK,
        batch: int = BATCH,
        poll_interval: float = POLL_INTERVAL,
        inbox_retention: Callable[[], float] = lambda: MIN_INBOX_RETENTION,
    ) -> None:
        """``inbox_retention()``: how long processed events are kept (seconds, at least
        :data:`MIN_INBOX_RETENTION`), asked for at each purge."""
        self.inbox = inbox
        self.store = store
        self.spool = spool
        self.hostname = hostname
        self.bounce_mode = bounce_mode
        self.bounce_from = bounce_from or f"MAILER-DAEMON@{hostname}"
        self.delay_dsn_after = delay_dsn_after
        self.default_chain = default_chain
        self.metrics = metrics
        self.wake_delivery = wake_delivery
        self.forwarder = forwarder
        self.batch = batch
        self.poll_interval = poll_interval
        self._clock = clock
        self._inbox_retention = inbox_retention
        self._next_purge = 0.0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # region lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="esprelay-events")

    def wake(self) -> None:
        """New events are in the inbox."""
        self._wakeup.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.forwarder is not None:
            await self.forwarder.wait(timeout=2.0)

    async def _run(self) -> None:
        while True:
            try:
                await self.process_pending()
                await self._purge()
            except SpoolError as exc:
                log.error("events: cannot process the inbox now: %s", exc)
                await asyncio.sleep(ERROR_PAUSE)
                continue
            except Exception:
                log.exception("events: processing failed")
                await asyncio.sleep(ERROR_PAUSE)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)
            self._wakeup.clear()

    async def _purge(self) -> None:
        now = self._clock.time()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL
        keep = max(self._inbox_retention(), MIN_INBOX_RETENTION)
        removed = await self.inbox.purge_events(processed_before=now - keep)
        if removed:
            log.info("events: purged %d processed event(s) from the inbox", removed)

    # endregion
    # region processing

    async def process_pending(self) -> int:
        """Apply and finish the pending events, a batch at a time; how many."""
        done = 0
        while True:
            self._wakeup.clear()
            pending = await self.inbox.pending_events(self.batch)
            if not pending:
                return done
            applied: list[int] = []
            try:
                await self.apply_batch(pending, applied)
            except SpoolError:
                # The events not in ``applied`` stay pending, tried again; those in it
                # are finished (finishing fails too when the spool is down).
                await self.inbox.finish_events(applied)
                raise
            await self.inbox.finish_events(applied)
            done += len(applied)

    async def apply_batch(self, pending: Sequence[StoredEvent], applied: list[int]) -> None:
        """Apply ``pending`` (in order) with a bounded number of spool operations, adding
        to ``applied`` the ``seq`` of each event that may be finished.

        The messages the batch names are read at once, without their bodies (those a
        DSN needs are read again, with theirs, at once); every event's timeline and
        status rows and DSN claims are written in one transaction
        (:meth:`~esprelay.events.status.MessageStatusStore.apply_events`: the same
        outcome as applying them one after the other).  Then the new events are
        forwarded and the claimed DSNs queued, in order.  A DSN the spool cannot queue
        stops there: it and the claims of the events after it are given back, those
        events stay pending (:class:`SpoolError`), and are applied again later, which
        changes nothing but claiming their DSNs again.
        """
        messages = await self._messages(pending)
        jobs: list[tuple[StoredEvent, SpooledMessage | None, str, str | None]] = []
        for stored in pending:
            message = messages.get(stored.seq)
            recipient, kind = "", None
            if message is not None:
                try:
                    recipient = self._recipient(message, stored.event)
                    kind = self._wanted_dsn(message, recipient, stored.event)
                except Exception:  # a bug must not hold the inbox up: logged, finished
                    log.exception("events: cannot apply event seq=%d", stored.seq)
                    applied.append(stored.seq)
                    continue
            jobs.append((stored, message, recipient, kind))
        # A DSN's checks read the message's own header section while it has a body.
        wanted = [message.id for _, message, _, kind in jobs if message and kind is not None]
        bodies = await self.store.get_messages(wanted, with_body=True) if wanted else {}
        batch: list[Application] = []
        checked: list[tuple[StoredEvent, SpooledMessage | None, str, str | None]] = []
        for stored, message, recipient, kind in jobs:
            if message is not None:
                if kind is not None:
                    message = bodies.get(message.id, message)
                    try:
                        kind = self._allowed_dsn(message, recipient, kind)
                    except Exception:  # a bug must not hold the inbox up: logged, finished
                        log.exception("events: cannot apply event seq=%d", stored.seq)
                        applied.append(stored.seq)
                        continue
                batch.append(Application(message.id, recipient, stored.event, kind))
            checked.append((stored, message, recipient, kind))
        jobs = checked
        try:
            results = iter(await self.store.apply_events(batch))
        except SpoolError:
            raise
        except Exception:  # a bug must not hold the inbox up: one at a time, as before
            log.exception("events: cannot apply a batch of %d event(s)", len(batch))
            await self._apply_each([stored for stored, *_ in jobs], applied)
            return
        sends: list[tuple[StoredEvent, SpooledMessage, str, str]] = []
        new = changed = unknown = 0
        for stored, message, recipient, kind in jobs:
            if message is None:
                unknown += 1
                self._log_unknown(stored.event)
                applied.append(stored.seq)
                continue
            result = next(results)
            if result is None:  # purged meanwhile
                unknown += 1
                applied.append(stored.seq)
                continue
            new += result.new
            changed += result.changed
            self._applied(message, recipient, stored.event, result)
            if kind is not None and result.dsn:
                sends.append((stored, message, recipient, kind))
            else:
                applied.append(stored.seq)
        for index, (stored, message, recipient, kind) in enumerate(sends):
            try:
                await self._send_dsn(message, recipient, stored.event, kind)
            except SpoolError:
                for _, later, rcpt, later_kind in sends[index + 1 :]:
                    await self.store.release_dsn(later.id, rcpt, later_kind)
                raise
            except Exception:  # a bug must not hold the inbox up: logged, finished
                log.exception("events: cannot send the DSN of event seq=%d", stored.seq)
            applied.append(stored.seq)
        log.info(
            "events: applied %d event(s): %d new, %d status change(s), %d DSN(s),"
            " %d of no message in the spool",
            len(pending),
            new,
            changed,
            len(sends),
            unknown,
        )

    async def _apply_each(self, pending: Sequence[StoredEvent], applied: list[int]) -> None:
        for stored in pending:
            try:
                await self.apply(stored)
            except SpoolError:
                raise
            except Exception:  # a bug must not hold the inbox up: logged, finished
                log.exception("events: cannot apply event seq=%d", stored.seq)
            applied.append(stored.seq)

    async def _messages(self, pending: Sequence[StoredEvent]) -> dict[int, SpooledMessage]:
        """The message (without its body) each of ``pending`` names, by ``seq``: read at
        once by the spool ids; the ESP's message id looked up for the others."""
        ids = [id for stored in pending if (id := stored.message_id or stored.event.esprelay_id)]
        found: dict[str, SpooledMessage] = await self.store.get_messages(ids) if ids else {}
        named: dict[int, SpooledMessage] = {}
        for stored in pending:
            event = stored.event
            message = found.get(stored.message_id or event.esprelay_id or "")
            if message is None and event.esp_message_id:
                message = await self.store.find_by_provider_message_id(
                    event.provider, event.esp_message_id
                )
            if message is not None:
                named[stored.seq] = message
        return named

    async def apply(self, stored: StoredEvent) -> None:
        """Apply one event on its own (see :meth:`apply_batch` for the usual way)."""
        event = stored.event
        message = await self._message(stored)
        if message is None:
            self._log_unknown(event)
            return
        recipient = self._recipient(message, event)
        kind = self._dsn_kind(message, recipient, event)
        applied = await self.store.apply_event(message.id, recipient, event, dsn=kind)
        if applied is None:  # purged meanwhile
            return
        self._applied(message, recipient, event, applied)
        if kind is not None and applied.dsn:
            await self._send_dsn(message, recipient, event, kind)

    @staticmethod
    def _log_unknown(event: Event) -> None:
        log.debug(
            "events %s: event %s names no message in the spool",
            event.provider,
            event.provider_event_id,
        )

    def _applied(
        self, message: SpooledMessage, recipient: str, event: Event, applied: Applied
    ) -> None:
        """What follows an event's application: counted, logged, forwarded if new."""
        if applied.changed and self.metrics is not None:
            self.metrics.events_status_changes.labels(event.kind).inc()
        log.debug(
            "event id=%s rcpt=<%s> kind=%s status=%s provider=%s%s",
            message.id,
            recipient,
            event.kind,
            event.smtp_status or "-",
            event.provider,
            "" if applied.new else " (applied before)",
        )
        if applied.new and self.forwarder is not None:
            self.forwarder.forward(message, recipient, event)

    async def _message(self, stored: StoredEvent) -> SpooledMessage | None:
        event = stored.event
        id = stored.message_id or event.esprelay_id
        if id is not None:
            message: SpooledMessage | None = await self.spool.get(id, with_body=True)
            if message is not None:
                return message
        if event.esp_message_id:
            found: SpooledMessage | None = await self.store.find_by_provider_message_id(
                event.provider, event.esp_message_id
            )
            if found is not None:
                with_body: SpooledMessage | None = await self.spool.get(found.id, with_body=True)
                return with_body
        return None

    @staticmethod
    def _recipient(message: SpooledMessage, event: Event) -> str:
        """The envelope recipient the event is about, as the envelope spells it; the
        event's own address when it names another; the only recipient when it names
        none, else ``""`` (the whole message)."""
        if event.recipient:
            wanted = event.recipient.lower()
            for address in message.envelope.rcpt_tos:
                if address.lower() == wanted:
                    return address
            return event.recipient
        if len(message.envelope.rcpt_tos) == 1:
            return message.envelope.rcpt_tos[0]
        return ""

    def _dsn_kind(self, message: SpooledMessage, recipient: str, event: Event) -> str | None:
        """The kind of DSN this event asks for (see the module doc), or None."""
        kind = self._wanted_dsn(message, recipient, event)
        return None if kind is None else self._allowed_dsn(message, recipient, kind)

    def _wanted_dsn(self, message: SpooledMessage, recipient: str, event: Event) -> str | None:
        """The kind of DSN the event and the recipient's NOTIFY ask for, or None."""
        if not recipient or self.bounce_mode == "off":
            return None
        notify = from_meta(message.meta).recipients.get(recipient)
        words = notify.notify if notify is not None else None
        if is_permanent(event):
            return "failure" if words is None or "FAILURE" in words else None
        if event.kind == "delivered":
            return "success" if words is not None and "SUCCESS" in words else None
        if event.kind == "deferred":
            old_enough = event.at - message.created_at >= self.delay_dsn_after
            return "delay" if words is not None and "DELAY" in words and old_enough else None
        return None

    def _allowed_dsn(self, message: SpooledMessage, recipient: str, kind: str) -> str | None:
        """``kind``, unless no DSN may be sent about ``message`` (logged)."""
        why = no_dsn_reason(message, header_section(message), self.bounce_from)
        if why is not None:
            log.info("no %s DSN for id=%s rcpt=<%s>: %s", kind, message.id, recipient, why)
            return None
        return kind

    async def _send_dsn(
        self, message: SpooledMessage, recipient: str, event: Event, kind: str
    ) -> None:
        to = notice_recipient(self.bounce_mode, message.envelope.mail_from)
        if to is None:
            return
        parameters = from_meta(message.meta)
        raw = message.raw
        if raw is None or kind != "failure":
            # Headers only: the body is gone (delivered), or a report of success or delay.
            parameters = replace(parameters, ret="HDRS" if parameters.ret else None)
            raw = header_section(message) or self._known_headers(message)
        reason = (
            event.diagnostic
            or {
                "failure": f"the ESP reported the message {event.kind}",
                "success": "delivered",
                "delay": "delivery is being retried by the ESP",
            }[kind]
        )
        status = (
            event.smtp_status or {"failure": "5.0.0", "success": "2.0.0", "delay": "4.0.0"}[kind]
        )
        dsn = build_dsn(
            raw=raw,
            failed_recipients=[recipient],
            original_sender=message.envelope.mail_from,
            reason=reason,
            status=status,
            reporting_mta=self.hostname,
            from_address=self.bounce_from,
            to_address=to,
            arrival_date=message.created_at,
            message_id=message.id,
            parameters=parameters,
            action=_ACTIONS[kind],
            remote_mta=event.remote_mta,
            diagnostic_code=diagnostic_code(event),
            last_attempt=event.at,
        )
        queued = await queue_dsn(
            self.spool,
            message,
            dsn,
            recipient=to,
            default_chain=self.default_chain,
            kind=kind,
        )
        if queued is None:
            await self.store.release_dsn(message.id, recipient, kind)
            raise SpoolError("cannot queue a DSN")  # the event stays pending: tried again
        log.info("dsn id=%s kind=%s for=%s to=<%s> size=%d", queued, kind, message.id, to, len(dsn))
        if self.metrics is not None:
            self.metrics.events_dsns.labels(kind).inc()
        if self.wake_delivery is not None:
            self.wake_delivery()

    @staticmethod
    def _known_headers(message: SpooledMessage) -> bytes:
        """What is known of a message's header section when none was kept."""
        message_id = message.meta.get("message_id_header")
        if isinstance(message_id, str):
            return f"Message-ID: <{message_id}>\r\n".encode("ascii", "replace")
        return b""

    # endregion
