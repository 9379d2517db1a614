"""A message that failed for good: a bounce (DSN) to its sender and a POST to the webhook.

:class:`FailureNotifier` is the deliverer's ``on_failed`` hook.  Both notices run in
background tasks so that the delivery worker is not held; :meth:`FailureNotifier.wait`
gives them their time at shutdown.

- The bounce (``ESPRELAY_BOUNCE_MODE``) is built by :func:`esprelay.message.dsn.build_dsn` and
  queued in the spool like any message, on the failed message's provider chain.  None is
  sent for a null sender or for a message that is itself a bounce.  The client's DSN
  parameters (RFC 3461, in the message's metadata) are honoured: a recipient whose
  ``NOTIFY`` lacks ``FAILURE`` (``NEVER`` included) is not reported, and no bounce is
  sent if that leaves none; ``RET``, ``ENVID`` and ``ORCPT`` shape the report.
- A provider that accepted a message for some recipients only (``SendResult.rejected``)
  has the others that it refused for good bounced the same way, in one DSN that names
  only them, each with its own error (:attr:`esprelay.delivery.Outcome.bounced`).
- The webhook (``ESPRELAY_FAILURE_WEBHOOK_URL``) gets one JSON record per failure; a
  webhook that fails is logged, not retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

import httpx

from esprelay.delivery import Outcome, provider_chain
from esprelay.errors import PermanentDeliveryError, SpoolError
from esprelay.message.dsn import (
    EnvelopeDSN,
    build_dsn,
    from_meta,
    is_dsn,
    status_for,
    wants_failure_report,
)
from esprelay.message.header import raw_value, read_header, unfolded
from esprelay.models import Envelope, SpooledMessage
from esprelay.spool import NewPart, Spool

log = logging.getLogger("esprelay")


class FailureNotifier:
    """Tells a failed message's sender (a bounce) and the failure webhook."""

    def __init__(
        self,
        *,
        spool: Spool,
        client: httpx.AsyncClient,
        hostname: str,
        bounce_mode: str,
        bounce_from: str | None,
        webhook_url: str | None,
        default_chain: tuple[str, ...],
        wake: Callable[[], None],
    ) -> None:
        """``default_chain``: providers for a bounce of a message spooled without a chain
        (a routes reload replaces it); ``wake``: the deliverer's, to send a bounce now."""
        self._spool = spool
        self._client = client
        self._hostname = hostname
        self._bounce_mode = bounce_mode
        self._bounce_from = bounce_from or f"MAILER-DAEMON@{hostname}"
        self._webhook_url = webhook_url
        self.default_chain = default_chain
        self._wake = wake
        self._background: set[asyncio.Task[None]] = set()
        #: Called with the kind (bounce_kind) of every bounce queued (metrics).
        self.on_bounce: list[Callable[[str], None]] = []

    def on_failed(self, outcome: Outcome) -> None:
        """A message answered 250 failed for good, for every recipient or for those of
        ``outcome.bounced``: tell its sender and the webhook."""
        if self._webhook_url:
            self._in_background(self._post_failure(outcome, self._webhook_url))
        message = outcome.message
        recipient = notice_recipient(self._bounce_mode, message.envelope.mail_from)
        if recipient is None:
            return
        if message.raw is None:  # delivered or purged: nothing to bounce
            return
        why = no_dsn_reason(message, message.raw[: read_header(message.raw).end], self._bounce_from)
        if why is not None:
            log.info("no bounce for id=%s: %s", message.id, why)
            return
        parameters = from_meta(message.meta)
        failed = [r for r, _ in outcome.bounced] if outcome.bounced else message.envelope.rcpt_tos
        reported = [r for r in failed if wants_failure_report(parameters.recipients.get(r))]
        if not reported:
            log.info("no bounce for id=%s: NOTIFY asks for none (RFC 3461)", message.id)
            return
        self._in_background(self._send_bounce(outcome, recipient, reported, parameters))

    async def wait(self, timeout: float) -> None:
        """Give the notices under way up to ``timeout`` seconds (at shutdown)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    def _in_background(self, coroutine: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_bounce(
        self, outcome: Outcome, recipient: str, reported: list[str], parameters: EnvelopeDSN
    ) -> None:
        assert outcome.message.raw is not None
        message = outcome.message
        # Each recipient a provider refused alone has its own error; a transient one
        # is bounced only once its message has expired.
        each = {
            rcpt: (
                status_for(error, expired=not isinstance(error, PermanentDeliveryError)),
                str(error),
            )
            for rcpt, error in outcome.bounced
        }
        if outcome.error is not None:
            reason = str(outcome.error)
        elif outcome.bounced:
            reason = "; ".join(f"<{r}>: {each[r][1]}" for r in reported)
        else:
            reason = "delivery failed"
        dsn = build_dsn(
            raw=outcome.message.raw,
            failed_recipients=reported,
            original_sender=message.envelope.mail_from,
            reason=reason,
            status=status_for(outcome.error, expired=outcome.expired),
            recipient_status=each or None,
            reporting_mta=self._hostname,
            from_address=self._bounce_from,
            to_address=recipient,
            arrival_date=message.created_at,
            message_id=message.id,
            parameters=parameters,
        )
        bounce_id = await queue_dsn(
            self._spool, message, dsn, recipient=recipient, default_chain=self.default_chain
        )
        if bounce_id is None:
            return
        log.info(
            "bounce id=%s for=%s to=<%s> size=%d rcpts=%d",
            bounce_id,
            message.id,
            recipient,
            len(dsn),
            len(reported),
        )
        for callback in self.on_bounce:
            callback(bounce_kind(outcome))
        self._wake()

    async def _post_failure(self, outcome: Outcome, url: str) -> None:
        message = outcome.message
        error = outcome.error or (outcome.bounced[0][1] if outcome.bounced else None)
        summary = "; ".join(f"<{r}>: {e}" for r, e in outcome.bounced) or None
        record = {
            "event": "failed",
            "id": message.id,
            "mail_from": message.envelope.mail_from,
            "rcpt_tos": [r for r, _ in outcome.bounced]
            if outcome.bounced
            else list(message.envelope.rcpt_tos),
            "size": message.size,
            "provider": outcome.provider,
            "status_code": error.status_code if error else None,
            "error": str(outcome.error) if outcome.error else summary,
            "expired": outcome.expired,
            "attempts": message.attempts + 1,
            "accepted_at": message.created_at,
            "failed_at": time.time(),
            "route": message.meta.get("route"),
            # The message was delivered to its other recipients (a partial outcome).
            "partial": outcome.outcome != "failed",
        }
        try:
            response = await self._client.post(url, json=record, timeout=10.0)
        except httpx.HTTPError as exc:
            log.error("failure webhook for id=%s not delivered: %s", message.id, type(exc).__name__)
            return
        if not response.is_success:
            log.error(
                "failure webhook for id=%s answered HTTP %d", message.id, response.status_code
            )


def bounce_kind(outcome: Outcome) -> str:
    """What a bounce reports (for metrics): ``failed`` (refused for good), ``expired``
    (past the queue lifetime) or ``partial`` (refused recipients of a message the
    provider took for the others)."""
    if outcome.outcome != "failed":
        return "partial"
    return "expired" if outcome.expired else "failed"


# region DSNs made from ESP events (esprelay.events.processor)


def no_dsn_reason(message: SpooledMessage, headers: bytes | None, bounce_from: str) -> str | None:
    """Why no DSN may be sent about ``message`` (never a bounce of a bounce), or None."""
    if not message.envelope.mail_from:
        return "null sender"
    if message.meta.get("dsn_for"):
        return "it is itself a DSN"
    if message.envelope.mail_from.lower() == bounce_from.lower():
        return "it comes from the bounce address (a loop)"
    if headers is not None:
        if is_dsn(headers):
            return "it is itself a bounce"
        header = read_header(headers)
        auto = header.first(b"auto-submitted")
        if auto is not None:
            value = unfolded(raw_value(headers, auto)).split(";", 1)[0].strip().lower()
            if value != "no":
                return f"Auto-Submitted: {value}"
    return None


def notice_recipient(bounce_mode: str, mail_from: str) -> str | None:
    """Where a DSN for a message from ``mail_from`` goes under ``ESPRELAY_BOUNCE_MODE``:
    the sender, the configured address, or nowhere (``off``)."""
    if bounce_mode == "off":
        return None
    return mail_from if bounce_mode == "sender" else bounce_mode.split(":", 1)[1]


async def queue_dsn(
    spool: Spool,
    message: SpooledMessage,
    dsn: bytes,
    *,
    recipient: str,
    default_chain: tuple[str, ...],
    kind: str = "failure",
) -> str | None:
    """Queue ``dsn`` (about ``message``) to ``recipient`` with the null sender, on the
    message's provider chain; its spool id, or None when the spool cannot take it
    (logged).  Every DSN esprelay writes is queued here."""
    chain = provider_chain(message, default_chain)
    part = NewPart(
        Envelope("", (recipient,)),
        chain[0],
        {
            "route": message.meta.get("route", "default"),
            "providers": list(chain),
            "dsn_for": message.id,
            "dsn_kind": kind,
        },
    )
    try:
        [dsn_id] = await spool.put_parts(dsn, [part])
    except SpoolError as exc:
        log.error("cannot queue the %s DSN for id=%s: %s", kind, message.id, exc)
        return None
    return dsn_id


# endregion
