"""The aiosmtpd handler: envelope checks at MAIL/RCPT, durable spooling at DATA.

Hooks return SMTP reply strings (aiosmtpd's contract).  The message bytes are kept
exactly as received (``decode_data=False``); nothing is added to the headers, so an
envelope-only recipient (Bcc) never shows up in them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from esprelay.errors import ShuttingDown
from esprelay.intake import Client, Intake
from esprelay.models import Envelope
from esprelay.smtp.hooks import HookDirCache

log = logging.getLogger("esprelay.smtp")

# RFC 5321 4.1.2 Mailbox syntax, with RFC 6531's UTF-8 allowed where SMTPUTF8 allows it.
# Control characters (CR, LF, NUL...) match nowhere, so header injection through the
# envelope is impossible.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = (
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?"
)
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
MAILBOX = re.compile(
    rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:{_DOMAIN}|{_ADDRESS_LITERAL})", re.ASCII
)
MAX_ADDRESS_LENGTH = 254


def check_address(address: str, *, allow_null: bool) -> str | None:
    """An SMTP error reply if ``address`` cannot be used, else None."""
    if address == "":
        return None if allow_null else "553 5.1.3 Error: null address not allowed here"
    if len(address) > MAX_ADDRESS_LENGTH or not MAILBOX.fullmatch(address):
        return "553 5.1.3 Error: malformed address (expected local-part@domain)"
    return None


class RelayHandler(HookDirCache):
    def __init__(self, intake: Intake, *, max_recipients: int) -> None:
        self._intake = intake
        self._state = intake.state
        self._max_recipients = max_recipients

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd processes pipelined commands in order but does not say so.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self._state.draining:
            server.transport.close()
            return ShuttingDown.smtp_reply
        if address == "<>":
            address = ""
        error = check_address(address, allow_null=True)
        if error:
            return error
        # aiosmtpd treats an empty mail_from as "no MAIL yet"; keep "<>" for the null
        # sender while in the session and translate at DATA.
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        error = check_address(address, allow_null=False)
        if error:
            return error
        if address in envelope.rcpt_tos:
            return "250 2.1.5 Recipient OK (duplicate ignored)"
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self._max_recipients} per message)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        client = Client(address=peer, helo=session.host_name, auth_user=auth_user(session))
        return await self._intake.accept(
            Envelope(mail_from=mail_from, rcpt_tos=tuple(envelope.rcpt_tos)), raw, client
        )

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error")
        return "451 4.3.0 Requested action aborted: local error in processing"


def auth_user(session: Any) -> str | None:
    """The authenticated SMTP user of a session, if any."""
    if not getattr(session, "authenticated", False):
        return None
    data = getattr(session, "auth_data", None)
    login = getattr(data, "login", data)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return login if isinstance(login, str) else None
