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
from esprelay.errors import SpoolError
from esprelay.message.dsn import (
    EnvelopeDSN,
    build_dsn,
    from_meta,
    is_dsn,
    status_for,
    wants_failure_report,
)
from esprelay.models import Envelope
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
        #: Called with the kind ("failed", "expired") of every bounce queued (metrics).
        self.on_bounce: list[Callable[[str], None]] = []

    def on_failed(self, outcome: Outcome) -> None:
        """A message answered 250 failed for good: tell its sender and the webhook."""
        if self._webhook_url:
            self._in_background(self._post_failure(outcome, self._webhook_url))
        message = outcome.message
        mode = self._bounce_mode
        if mode == "off":
            return
        if not message.envelope.mail_from:
            log.info("no bounce for id=%s: null sender", message.id)
            return
        if message.raw is None or is_dsn(message.raw):
            log.info("no bounce for id=%s: it is itself a bounce", message.id)
            return
        parameters = from_meta(message.meta)
        reported = [
            r
            for r in message.envelope.rcpt_tos
            if wants_failure_report(parameters.recipients.get(r))
        ]
        if not reported:
            log.info("no bounce for id=%s: NOTIFY asks for none (RFC 3461)", message.id)
            return
        recipient = message.envelope.mail_from if mode == "sender" else mode.split(":", 1)[1]
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
        dsn = build_dsn(
            raw=outcome.message.raw,
            failed_recipients=reported,
            original_sender=message.envelope.mail_from,
            reason=str(outcome.error) if outcome.error else "delivery failed",
            status=status_for(outcome.error, expired=outcome.expired),
            reporting_mta=self._hostname,
            from_address=self._bounce_from,
            to_address=recipient,
            arrival_date=message.created_at,
            message_id=message.id,
            parameters=parameters,
        )
        chain = provider_chain(message, self.default_chain)
        part = NewPart(
            Envelope("", (recipient,)),
            chain[0],
            {
                "route": message.meta.get("route", "default"),
                "providers": list(chain),
                "dsn_for": message.id,
            },
        )
        try:
            [bounce_id] = await self._spool.put_parts(dsn, [part])
        except SpoolError as exc:
            log.error("cannot queue the bounce for id=%s: %s", message.id, exc)
            return
        log.info("bounce id=%s for=%s to=<%s> size=%d", bounce_id, message.id, recipient, len(dsn))
        for callback in self.on_bounce:
            callback("expired" if outcome.expired else "failed")
        self._wake()

    async def _post_failure(self, outcome: Outcome, url: str) -> None:
        message = outcome.message
        record = {
            "event": "failed",
            "id": message.id,
            "mail_from": message.envelope.mail_from,
            "rcpt_tos": list(message.envelope.rcpt_tos),
            "size": message.size,
            "provider": outcome.provider,
            "status_code": outcome.error.status_code if outcome.error else None,
            "error": str(outcome.error) if outcome.error else None,
            "expired": outcome.expired,
            "attempts": message.attempts + 1,
            "accepted_at": message.created_at,
            "failed_at": time.time(),
            "route": message.meta.get("route"),
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
