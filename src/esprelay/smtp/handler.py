"""The aiosmtpd handler: relay and envelope checks at MAIL/RCPT, spooling at DATA.

Hooks return SMTP reply strings (aiosmtpd's contract).  Only an authenticated client
or one in the trusted networks may relay (530 otherwise, at MAIL, RCPT and DATA).  The
message bytes are kept as received (``decode_data=False``) except for the repairs in
:func:`esprelay.message.repair.prepare`: bare CR/LF become CRLF, a header line that
is not a field ends the header for every reader, and with ``repair`` missing
Date/Message-ID/From are prepended.  The sender rules then check the From and Sender
the providers will send.  An envelope-only recipient (Bcc) never shows up
in the headers.  A large message the engine wrote to a file (:mod:`esprelay.spill`) is
repaired and checked in its head, which holds its header, and handed on as its file;
one with bare line endings, or a header too long for its head, is read back first
(:meth:`esprelay.intake.Intake.read_back`).

The envelope's extensions: SMTPUTF8 is advertised only if every configured provider
carries UTF-8 addresses, and an address a provider of its route cannot carry is refused
(``553 5.6.7``); the DSN parameters (RFC 3461), which the engines hand over as
``server.dsn_parameters``, are checked here (:mod:`esprelay.smtp.dsnparams`) and kept
in the message's metadata for the bounce.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Protocol

from esprelay.errors import smtp_reply
from esprelay.intake import Client, Intake
from esprelay.message.dsn import EnvelopeDSN
from esprelay.message.idn import ascii_address
from esprelay.message.repair import RepairResult, prepare
from esprelay.models import Envelope
from esprelay.smtp import dsnparams
from esprelay.smtp.policy import RelayPolicy
from esprelay.smtp.replies import (
    AUTH_REQUIRED,
    DUPLICATE_RECIPIENT,
    HEADER_SENDER_NOT_ALLOWED_F,
    MALFORMED_ADDRESS,
    NEEDS_SMTPUTF8,
    NOT_UTF8,
    NULL_ADDRESS,
    RECIPIENT_OK,
    SENDER_NOT_ALLOWED_F,
    SENDER_OK,
    SHUTTING_DOWN,
    SOURCE_ROUTE,
    STARTTLS_AND_AUTH_REQUIRED,
    TOO_MANY_RECIPIENTS_F,
    UTF8_NOT_CARRIED,
)
from esprelay.spill import Spilled, Spiller

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

# The common reverse/forward path, "<local@domain>" (or "<>") and its parameters, with a
# plain dot-atom on both sides of the "@": for it, simple_path() answers what aiosmtpd's
# _getaddr (the email package's RFC 5322 parser) answers, ~20x cheaper.
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_SIMPLE_PATH = re.compile(rf"<((?:{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)?)>(.*)", re.DOTALL)


class Connection(Protocol):
    """What the handler may ask of the connection it serves, whatever the engine (the
    hooks' ``server`` argument); the rest (``session``, ``envelope``) is aiosmtpd's
    public :class:`~aiosmtpd.smtp.Session` and :class:`~aiosmtpd.smtp.Envelope`."""

    @property
    def client(self) -> str:
        """The client's IP address (behind a load balancer, the one its PROXY protocol
        header named: :meth:`~esprelay.smtp.session_policy.PolicyConnection.peer_of`)."""

    @property
    def tls(self) -> bool:
        """True once the connection is encrypted (STARTTLS or implicit TLS)."""

    @property
    def auth_offered(self) -> bool:
        """True if AUTH may be used on this connection as it is now."""

    @property
    def starttls_needed_for_auth(self) -> bool:
        """True if AUTH would first need STARTTLS (offered, not done yet)."""

    @property
    def dsn_parameters(self) -> list[str]:
        """The DSN parameters (RFC 3461) of the MAIL or RCPT being answered, as the
        client wrote them (:mod:`esprelay.smtp.dsnparams`)."""

    def close(self) -> None:
        """Close the connection once the replies given so far are written."""


def client_address(peer: Any) -> str:
    """The client's IP address from aiosmtpd's ``session.peer``."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def check_address(address: str, *, allow_null: bool, smtputf8: bool = False) -> str | None:
    """An SMTP error reply if ``address`` cannot be used, else None.

    ``address`` is the client's bytes decoded as UTF-8 with ``surrogateescape`` (both
    engines), so a byte that is not UTF-8 shows as a lone surrogate.  RFC 6531: a
    non-ASCII address (UTF-8 or not) needs the SMTPUTF8 parameter of MAIL (``553 5.6.7``
    without it), and even with it must be UTF-8: bytes that are not are a syntax error
    of the address (``501 5.1.3``; 5.6.7 would tell the client that SMTPUTF8 helps).
    Nothing with a surrogate may go on: it cannot be encoded, logged as UTF-8, spooled
    or sent to an ESP.
    """
    if address == "":
        return None if allow_null else NULL_ADDRESS
    if not address.isascii():
        if not smtputf8:
            return NEEDS_SMTPUTF8
        if not _valid_utf8(address):
            return NOT_UTF8
    if address.startswith("@") or "%" in address or "!" in address.rpartition("@")[0]:
        # Source routes (<@a:b@c>), percent hacks and UUCP bang paths ask us to forward.
        return SOURCE_ROUTE
    if len(address) > MAX_ADDRESS_LENGTH or not MAILBOX.fullmatch(address):
        return MALFORMED_ADDRESS
    return None


def _dsn_of(envelope: Any) -> EnvelopeDSN:
    """The DSN parameters of the transaction (set at MAIL)."""
    dsn: EnvelopeDSN | None = getattr(envelope, "dsn", None)
    if dsn is None:
        dsn = envelope.dsn = EnvelopeDSN()
    return dsn


def _valid_utf8(text: str) -> bool:
    """False if ``text`` holds a lone surrogate (a byte that was not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def simple_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a plain ``<local@domain>`` or ``<>`` path, else None.

    The result is aiosmtpd's ``_getaddr(arg)`` for such paths (tests/test_smtp_fast.py
    checks it against that parser with hypothesis); None sends everything else (quoted
    local parts, source routes, comments, address literals, RFC 2047 words, UTF-8,
    missing ">"...) to that parser.
    """
    match = _SIMPLE_PATH.match(arg)
    if match is None:
        return None
    address, rest = match.groups()
    if not address:
        return "<>", rest  # the parser keeps what follows "<>" as it is
    if "=?" in address:
        return None  # may be an RFC 2047 encoded word, which the parser decodes
    if rest[:1] in (" ", "\t"):
        rest = rest.lstrip()  # the parser's folding white space: str.lstrip()
    if rest[:1] == "(":
        return None  # a comment
    return address, rest


class RelayHandler:
    def __init__(
        self,
        intake: Intake,
        *,
        max_recipients: int,
        policy: RelayPolicy | None = None,
        hostname: str = "esprelay",
        repair_headers: bool = False,
        force_from: str | None = None,
    ) -> None:
        self._intake = intake
        self._state = intake.state
        self._max_recipients = max_recipients
        self._policy = policy if policy is not None else RelayPolicy.loopback()
        # Parsing the client's address costs ~20 us, and MAIL, RCPT and DATA each ask;
        # the policy is immutable, so its answer per address can be kept.
        self._trusted = functools.lru_cache(maxsize=1024)(self._policy.trusted)
        self._hostname = hostname
        self._repair = repair_headers
        self._force_from = force_from

    def _relay_refusal(self, server: Connection, session: Any) -> str | None:
        """530 unless the client authenticated or is on a trusted network."""
        if session.authenticated or self._trusted(server.client):
            return None
        if server.starttls_needed_for_auth:
            return STARTTLS_AND_AUTH_REQUIRED
        return AUTH_REQUIRED

    @property
    def spiller(self) -> Spiller | None:
        """Where and from which size a message is written to a file as it arrives."""
        return self._intake.spiller

    @staticmethod
    def _user_rules(session: Any) -> tuple[str, ...] | None:
        user = session.auth_data if session.authenticated else None
        return getattr(user, "allowed_senders", None)

    # The hooks are coroutines (aiosmtpd's contract); the engine in engine.py calls the
    # synchronous methods behind them directly.
    async def handle_EHLO(
        self, server: Connection, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return self.ehlo(server, session, hostname, responses)

    def ehlo(
        self, server: Connection, session: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not server.auth_offered:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        if not self.utf8_everywhere():
            responses = [r for r in responses if r != "250-SMTPUTF8"]
        # aiosmtpd processes pipelined commands in order but does not say so.
        return [*responses[:-1], "250-PIPELINING", "250-DSN", responses[-1]]

    def utf8_everywhere(self) -> bool:
        """Can every configured provider carry UTF-8 addresses (``smtputf8``)?  Only
        then is SMTPUTF8 advertised: the route of a message is only known per recipient,
        after EHLO."""
        return all(p.smtputf8 for p in self._intake.providers.providers.values())

    def _utf8_refusal(self, envelope: Any, session: Any, address: str) -> str | None:
        """553 5.6.7 if ``address`` has no ASCII form (a UTF-8 local part, or a domain
        IDNA refuses) and a provider it may go through needs one: for the sender, any
        configured provider; for a recipient, those of its route.  A UTF-8 domain alone
        is always carried (as Punycode where the ESP needs ASCII, esprelay.message.idn)."""
        if address.isascii() or ascii_address(address) is not None:
            return None
        if not envelope.mail_from:  # the sender
            return None if self.utf8_everywhere() else UTF8_NOT_CARRIED
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
        auth_user = getattr(session.auth_data, "name", None) if session.authenticated else None
        [part] = self._intake.routing.plan(Envelope(mail_from, (address,)), auth_user)
        providers = self._intake.providers
        if all(providers[n].smtputf8 for n in part.providers if n in providers):
            return None
        return UTF8_NOT_CARRIED

    async def handle_MAIL(
        self, server: Connection, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        return self.mail(server, session, envelope, address, mail_options)

    def mail(
        self, server: Connection, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self._state.draining:
            server.close()
            return SHUTTING_DOWN
        refusal = self._relay_refusal(server, session)
        if refusal:
            log.warning("relay refused: client=%s not trusted, not authenticated", server.client)
            return refusal
        if address == "<>":
            address = ""
        error = check_address(address, allow_null=True, smtputf8=envelope.smtp_utf8)
        if error:
            return error
        dsn = dsnparams.mail_parameters(server.dsn_parameters)
        if isinstance(dsn, str):
            return dsn
        error = self._utf8_refusal(envelope, session, address)
        if error:
            return error
        if address:
            why = self._policy.sender_error(address, self._user_rules(session))
            if why:
                log.warning("sender refused: client=%s from=<%s>: %s", server.client, address, why)
                return SENDER_NOT_ALLOWED_F.format(why)
        # aiosmtpd treats an empty mail_from as "no MAIL yet"; keep "<>" for the null
        # sender while in the session and translate at DATA.
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(mail_options)
        envelope.dsn = EnvelopeDSN(ret=dsn[0], envid=dsn[1])
        return SENDER_OK

    async def handle_RCPT(
        self, server: Connection, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        return self.rcpt(server, session, envelope, address, rcpt_options)

    def rcpt(
        self, server: Connection, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = self._relay_refusal(server, session)
        if refusal:
            return refusal
        error = check_address(address, allow_null=False, smtputf8=envelope.smtp_utf8)
        if error:
            return error
        dsn = dsnparams.rcpt_parameters(server.dsn_parameters)
        if isinstance(dsn, str):
            return dsn
        error = self._utf8_refusal(envelope, session, address)
        if error:
            return error
        if address in envelope.rcpt_tos:
            return DUPLICATE_RECIPIENT
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return TOO_MANY_RECIPIENTS_F.format(self._max_recipients)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if dsn.notify is not None or dsn.orcpt is not None:
            _dsn_of(envelope).recipients[address] = dsn
        return RECIPIENT_OK

    async def handle_DATA(self, server: Connection, session: Any, envelope: Any) -> str:
        refusal = self._relay_refusal(server, session)
        content: bytes | Spilled = envelope.original_content
        # From here ``content`` is the only reference: when the message is normalised or
        # repaired below, the original copy is freed at once instead of being held
        # (with up to 200 sessions x 10 MB) until the spool's commit.
        envelope.content = envelope.original_content = None
        if refusal:
            if isinstance(content, Spilled):
                content.discard()
            return refusal
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
        message_envelope = Envelope(mail_from=mail_from, rcpt_tos=tuple(envelope.rcpt_tos))
        peer = server.client
        meta: dict[str, Any] = {"client": peer, "helo": session.host_name}
        if session.authenticated and session.auth_data is not None:
            meta["auth_user"] = getattr(session.auth_data, "name", None)
        if server.tls:
            meta["tls"] = True
        meta.update(_dsn_of(envelope).meta())
        client = Client(
            address=peer,
            helo=session.host_name,
            auth_user=meta.get("auth_user"),
            meta=meta,
        )
        user_rules = self._user_rules(session)
        if not isinstance(content, Spilled):
            return await self._accept(message_envelope, content, client, user_rules)
        try:
            if not content.bare_line_ends and content.header_in_head:
                # Every repair and check reads the header, which is in memory: the
                # message stays in its file (with its head replaced if repaired).
                prepared = self._prepare(content.head, mail_from)
                if prepared.changes:
                    meta["repairs"] = list(prepared.changes)
                content.replace_head(prepared.raw)
                why = self._sender_error(content.head, mail_from, user_rules, peer)
                if why:
                    return why
                return await self._intake.accept(message_envelope, content, client)
            async with self._intake.read_back(content) as raw:
                return await self._accept(message_envelope, raw, client, user_rules)
        finally:
            content.discard()

    def _prepare(self, raw: bytes, mail_from: str) -> RepairResult:
        return prepare(
            raw,
            mail_from=mail_from,
            hostname=self._hostname,
            repair=self._repair,
            force_from=self._force_from,
        )

    def _sender_error(
        self, raw: bytes, mail_from: str, user_rules: tuple[str, ...] | None, peer: str
    ) -> str | None:
        """The refusal of a message whose From the sender rules do not allow."""
        # The sender rules read the message as the providers will (after every repair).
        why = self._policy.message_sender_error(
            raw, mail_from=mail_from, user_rules=user_rules, force_from=self._force_from
        )
        if not why:
            return None
        log.warning("not accepted: client=%s: %s", peer, why)
        return HEADER_SENDER_NOT_ALLOWED_F.format(why)

    async def _accept(
        self, envelope: Envelope, raw: bytes, client: Client, user_rules: tuple[str, ...] | None
    ) -> str:
        prepared = self._prepare(raw, envelope.mail_from)
        del raw
        if prepared.changes:
            client.meta["repairs"] = list(prepared.changes)
        why = self._sender_error(prepared.raw, envelope.mail_from, user_rules, client.address)
        if why:
            return why
        return await self._intake.accept(envelope, prepared.raw, client)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error")
        return smtp_reply(error)
