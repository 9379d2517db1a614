"""The SMTP listener: aiosmtpd's protocol on our own event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from esprelay.errors import ShuttingDown
from esprelay.intake import IntakeState
from esprelay.smtp.data import CompactDataSMTP
from esprelay.smtp.handler import RelayHandler
from esprelay.smtp.hooks import HookDirCache

log = logging.getLogger("esprelay.smtp")

IDENT = "esprelay ESMTP"


class RelaySMTP(HookDirCache, CompactDataSMTP):
    """aiosmtpd's SMTP with session tracking and a polite 421 while draining."""

    intake: IntakeState
    sessions: set[RelaySMTP]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # New sessions during shutdown get a 421 greeting instead of a refused
        # connection, so the client knows to come back (RFC 5321 3.8).
        if self.intake.draining:
            await self.push(ShuttingDown.smtp_reply)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    @property
    def in_transaction(self) -> bool:
        envelope = self.envelope
        return envelope is not None and bool(envelope.mail_from)


def smtp_factory(
    handler: RelayHandler,
    intake: IntakeState,
    *,
    hostname: str,
    data_size_limit: int,
    line_length_limit: int,
    timeout: float,
) -> tuple[Any, set[RelaySMTP]]:
    """A protocol factory for ``loop.create_server`` and the set of live sessions."""
    sessions: set[RelaySMTP] = set()
    # A subclass per listener carries the limits, rather than mutating aiosmtpd's class.
    protocol = type(
        "RelaySMTPListener",
        (RelaySMTP,),
        {"line_length_limit": line_length_limit, "intake": intake, "sessions": sessions},
    )

    def factory() -> RelaySMTP:
        smtp: RelaySMTP = protocol(
            handler,
            hostname=hostname,
            ident=IDENT,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=timeout,
        )
        return smtp

    return factory, sessions
