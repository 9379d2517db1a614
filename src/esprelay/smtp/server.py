"""The SMTP listeners: :func:`smtp_factory`, and the aiosmtpd engine.

``smtp_factory`` makes the protocol factory of a listener for either engine: the native
one (:mod:`esprelay.smtp.engine`, the default) or aiosmtpd's protocol
(``ESPRELAY_SMTP_ENGINE=aiosmtpd``), described here.  Both obey one
:class:`~esprelay.smtp.session_policy.SessionPolicy` and answer from one catalogue,
:mod:`esprelay.smtp.replies`.

:class:`RelaySMTP` is the conservative alternative: aiosmtpd's own dialogue, DATA
reader (it holds a message as a list of lines: more memory than the native engine's one
buffer) and AUTH exchange, extended only through aiosmtpd's public API (constructor
options, ``smtp_*`` and ``auth_*`` methods, ``push``, ``challenge_auth``,
``check_helo_needed``, the ``session`` and ``transport`` attributes) and asyncio's
protocol methods, so it works on any aiosmtpd 1.4.x.  On top of aiosmtpd it adds what
the policy asks: connection limits, the error and junk-command budgets, the session
lifetime, ``421`` on timeouts with a deadline for the whole DATA phase (its own timer;
aiosmtpd's is only a backstop), case-insensitive AUTH mechanism names, failed-login
limits and AUTH over plaintext only from allowlisted networks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, AuthResult, syntax

from esprelay.intake import IntakeState
from esprelay.smtp import dsnparams
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.engine import IDENT, Listener, SMTPSession
from esprelay.smtp.guards import Guards
from esprelay.smtp.handler import Connection, RelayHandler, client_address
from esprelay.smtp.policy import RelayPolicy
from esprelay.smtp.proxy import ProxiedSession, ProxyConfig, gated
from esprelay.smtp.replies import (
    AUTH_BAD_BASE64,
    AUTH_CANNOT_SPLIT,
    AUTH_NEEDS_TLS,
    AUTH_NOT_RECOGNIZED,
    CANNOT_VRFY,
    TLS_ACTIVE,
    UNKNOWN_COMMAND,
    VRFY_SYNTAX,
)
from esprelay.smtp.session_policy import (
    NOT_LOGGED,
    PolicyConnection,
    SessionBudget,
    SessionPolicy,
    SessionTimer,
    loggable_line,
)
from esprelay.smtp.tls import TLSContextSource

log = logging.getLogger("esprelay.smtp")


class _HideAuthDetails(logging.Filter):
    """Keep secrets out of aiosmtpd's log records, and drop noise.

    At DEBUG aiosmtpd logs every line a client sends and every line of message content.
    A client that sends its base64 credentials after AUTH was refused (454, 503, 538)
    makes them "unrecognised commands": a command line is shown as
    :func:`~esprelay.smtp.session_policy.loggable` shows it to the native engine's log
    (AUTH data masked, what is not a command not logged), and message content and
    undecodable AUTH replies never.
    """

    _DROP = ("can't decode base64", "login_data is deprecated", "DATA readline")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if any(text in message for text in self._DROP):
            return False
        args = record.args
        if isinstance(args, tuple) and args:
            if message in ("_handle_client readline: %r", "%r >> %r"):
                if isinstance(args[-1], bytes):
                    record.args = (*args[:-1], loggable_line(args[-1]))
            elif message == "%r unrecognised: %s":
                record.args = (*args[:-1], NOT_LOGGED.decode())
            elif (
                message == "%r << %r"
                and isinstance(args[-1], bytes)
                and b"not recognized" in args[-1]
            ):
                record.args = (*args[:-1], b"500 (reply not logged)")
        return True


_filter = _HideAuthDetails()


class RelaySMTP(PolicyConnection, SMTP):
    """aiosmtpd's SMTP under esprelay's session policy."""

    # Set per listener by smtp_factory (a subclass each).
    policy: SessionPolicy
    users: UserDB
    limiter: FailureLimiter
    verify_slots: asyncio.Semaphore
    idle_timeout: float
    data_timeout: float

    def __init__(self, handler: Any, **options: Any) -> None:
        super().__init__(handler, **options)
        # aiosmtpd keeps these in a class-wide dict that every EHLO grows; keep our own.
        # (The default is bound to a local, not to self: no reference cycle.)
        default_limit = self.command_size_limit
        self.command_size_limits = collections.defaultdict(lambda: default_limit)
        self._client = ""
        self._admitted = False
        self._refused = False
        self._auth_needs_tls = True
        self._budget = SessionBudget(self.policy.guards)
        self._stage: str | None = None  # the transaction stage a reply answers (metrics)
        self._in_data = False
        self._handshaking = False
        self._timer: SessionTimer | None = None
        self._busy = 0  # inside DATA, AUTH or STARTTLS: the lifetime waits for its end
        #: The DSN parameters of the MAIL or RCPT being answered (the handler reads them).
        self.dsn_parameters: list[str] = []

    # region what the handler may ask (esprelay.smtp.handler.Connection)

    @property
    def tls(self) -> bool:
        return self.session is not None and self.session.ssl is not None

    def close(self) -> None:
        # Not at once: the reply being made is written first.
        transport = self.transport
        if transport is not None:
            asyncio.get_running_loop().call_soon(transport.close)

    # endregion

    # region connection: admission, slot, timers

    @property
    def in_transaction(self) -> bool:
        envelope = self.envelope
        return envelope is not None and bool(envelope.mail_from)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted:
            super().connection_made(transport)  # the same connection after STARTTLS
            self._proxied(transport)
            return
        client = self._client = client_address(self.peer_of(transport))
        refusal = self.policy.admit(self, client)
        if refusal is not None:
            # aiosmtpd never hears of this connection.
            self._refused = True
            cast(asyncio.Transport, transport).write(refusal.encode() + b"\r\n")
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._proxied(transport)
        policy = self.policy
        self._auth_needs_tls = policy.auth_requires_tls(client)
        if policy.implicit_tls:
            assert self.session is not None
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
        self._timer = SessionTimer(self, policy.max_session_seconds)
        self._timer.arm(self.idle_timeout)

    def _proxied(self, transport: asyncio.BaseTransport) -> None:
        """aiosmtpd sets ``session.peer`` from the socket; behind a load balancer it is
        the client the PROXY header named (only aiosmtpd's "Peer:" log line, written
        before, shows the balancer)."""
        if self.proxied_peer is not None and self.session is not None:
            self.session.peer = self.peer_of(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._release()
        super().connection_lost(error)

    def _release(self) -> None:
        """Free this connection's slot and timers (idempotent): from connection_lost, and
        after a STARTTLS whose handshake never completed (no connection_lost comes)."""
        if self._admitted:
            self._admitted = False
            self.policy.release(self, self._client)
        if self._timer is not None:
            self._timer.cancel()

    def _write_and_close(self, reply: str) -> None:
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    def _arm(self, seconds: float) -> None:
        """Close with 421 after ``seconds`` without a reply (DATA: for the whole phase)."""
        if self._timer is not None:
            self._timer.arm(seconds)

    def session_timed_out(self) -> None:
        self._write_and_close(self.policy.timed_out(self._client, handshaking=self._handshaking))

    def session_expired(self) -> bool:
        if self._busy:
            return False
        self._write_and_close(self.policy.lifetime_over(self._client))
        return True

    async def _busy_with(self, command: Awaitable[None]) -> None:
        """Run a command the session lifetime does not interrupt; close after it if over."""
        self._busy += 1
        try:
            await command
        finally:
            self._busy -= 1
            if self._timer is not None and self._timer.expired:
                self.session_expired()

    # endregion

    # region replies: one place sees them all (budgets, metrics, idle timer)

    async def push(self, status: AnyStr) -> None:
        stage = self._stage
        if isinstance(status, str):
            if status.startswith('500 Error: command "'):
                # aiosmtpd echoes the unknown line back; it may be a credential.
                status = UNKNOWN_COMMAND
            if stage is not None and status[:1] in ("4", "5"):
                self.policy.observe(stage, status)
            # Undecodable client bytes (kept as surrogates) must not make the reply fail.
            response = status.encode("utf-8", "surrogateescape")
        else:
            response = status
        if stage == "data" and response[:1] == b"2":
            self._budget.message_accepted()
        await super().push(response)
        if not self._in_data:
            self._arm(self.idle_timeout)
        if response[:1] == b"5" and self.transport is not None:
            goodbye = self._budget.count_error(self._client)
            if goodbye is not None:
                await super().push(goodbye)
                self.transport.close()

    # endregion

    # region commands

    async def _junk_command(self) -> bool:
        """Count a command that moves no mail; past the limit answer 421 and close (True)."""
        goodbye = self._budget.count_junk(self._client)
        if goodbye is None:
            return False
        await super().push(goodbye)
        if self.transport is not None:
            self.transport.close()
        return True

    async def _repeated_helo(self) -> bool:
        assert self.session is not None
        return self.session.host_name is not None and await self._junk_command()

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._repeated_helo():
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._repeated_helo():
            await super().smtp_EHLO(hostname)
            # aiosmtpd grows the MAIL limit for SIZE= and SMTPUTF8 (at every EHLO); the
            # DSN parameters need room on MAIL and RCPT.
            base = self.command_size_limit
            limits = self.command_size_limits
            limits["MAIL"] = base + (26 if self.data_size_limit else 0) + 10
            limits["MAIL"] += dsnparams.MAIL_LINE_EXTRA
            limits["RCPT"] = base + dsnparams.RCPT_LINE_EXTRA

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_RSET(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_EXPN(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_HELP(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if await self._junk_command():
            return
        await self.push(CANNOT_VRFY if arg else VRFY_SYNTAX)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._stage = "mail"
        try:
            arg = self._take_dsn(arg, "FROM:", dsnparams.MAIL_KEYWORDS)
            await super().smtp_MAIL(arg)
        finally:
            self._stage = None

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._stage = "rcpt"
        try:
            arg = self._take_dsn(arg, "TO:", dsnparams.RCPT_KEYWORDS)
            await super().smtp_RCPT(arg)
        finally:
            self._stage = None

    def _take_dsn(self, arg: str | None, keyword: str, keywords: frozenset[str]) -> str | None:
        """``arg`` without its DSN parameters, which go to ``dsn_parameters`` as the
        client wrote them: aiosmtpd upper-cases parameters (ENVID and ORCPT are
        case-sensitive) and refuses those it does not know.  The handler checks them."""
        self.dsn_parameters = []
        assert self.session is not None
        if not arg or not self.session.extended_smtp or arg[: len(keyword)].upper() != keyword:
            return arg
        text, self.dsn_parameters = dsnparams.trailing(arg[len(keyword) :], keywords)
        if not self.dsn_parameters:
            return arg  # aiosmtpd answers as it would
        return keyword + text

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # A deadline for the whole DATA phase: a client trickling its message (slowloris)
        # is cut off with 421.
        self._arm(self.data_timeout)
        self._in_data = True
        self._stage = "data"
        try:
            await self._busy_with(super().smtp_DATA(arg))
        finally:
            self._stage = None
            self._in_data = False
            self._arm(self.idle_timeout)

    # endregion

    # region STARTTLS

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await self._busy_with(self._starttls(arg))

    async def _starttls(self, arg: str) -> None:
        if self.tls and not self.policy.implicit_tls:
            await self.push(TLS_ACTIVE)
            return
        self._handshaking = True
        try:
            await super().smtp_STARTTLS(arg)
        except BaseException:
            # aiosmtpd closes the connection; asyncio may never call connection_lost.
            log.info("TLS handshake not completed: closing client=%s", self._client)
            self._release()
            raise
        finally:
            self._handshaking = False
        if not arg and self.tls_context and not self.tls:
            # The handshake ended without TLS (the client went away): aiosmtpd would go
            # on reading the plaintext sent after STARTTLS.  Close and end the session.
            log.info("TLS handshake not completed: closing client=%s", self._client)
            transport = cast(asyncio.Transport | None, self.transport)
            if transport is not None:
                transport.abort()
            self._release()
            raise asyncio.CancelledError

    # endregion

    # region AUTH

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await self._busy_with(self._auth(arg))

    async def _auth(self, arg: str) -> None:
        refusal = self.policy.auth_refusal(self._client)
        if refusal is not None:
            await self.push(refusal)
            return
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None
        if not self.session.extended_smtp:
            await self.push(AUTH_NOT_RECOGNIZED)
            return
        if self._auth_needs_tls and not self.tls:
            await self.push(AUTH_NEEDS_TLS)
            return
        if arg:
            # Some devices send "auth login": mechanism names are case-insensitive.
            mechanism, _, rest = arg.partition(" ")
            arg = f"{mechanism.upper()} {rest}".rstrip()
        await super().smtp_AUTH(arg)

    # aiosmtpd's own PLAIN/LOGIN check passwords synchronously; ours await a thread.
    # AuthResult(handled=True) means the reply (501...) was already sent.
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._client_blob(args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push(AUTH_CANNOT_SPLIT)
            return AuthResult(success=False, handled=True)
        return await self._check_login("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._client_blob(args, self.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._client_blob([], self.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check_login("LOGIN", login, password)

    async def _client_blob(self, args: list[str], challenge: str) -> bytes | None:
        """The initial response in ``args`` or the answer to a 334 challenge, decoded."""
        if len(args) > 1:
            return await self._decode_initial(args[1])
        answer = await self.challenge_auth(challenge)
        return answer if isinstance(answer, bytes) else None

    async def _decode_initial(self, text: str) -> bytes | None:
        try:
            return base64.b64decode(text.encode("utf-8", "surrogateescape"), validate=True)
        except (binascii.Error, ValueError):
            await self.push(AUTH_BAD_BASE64)
            return None

    async def _check_login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        assert self.session is not None
        result = await self.policy.login(self._client, mechanism, login, password)
        if result.user is None:
            return AuthResult(success=False, handled=False, message=result.refusal)
        return AuthResult(success=True, auth_data=result.user)

    # endregion


if TYPE_CHECKING:
    # The handler's hooks get the engine as their ``server``: both are Connections.
    _connections: tuple[type[Connection], ...] = (RelaySMTP, SMTPSession)


def smtp_factory(
    handler: RelayHandler,
    intake: IntakeState,
    *,
    hostname: str,
    data_size_limit: int,
    line_length_limit: int,
    timeout: float,
    policy: RelayPolicy | None = None,
    users: UserDB | None = None,
    limiter: FailureLimiter | None = None,
    guards: Guards | None = None,
    tls: TLSContextSource | None = None,
    implicit_tls: bool = False,
    command_size_limit: int = 512,
    sessions: set[Any] | None = None,
    engine: str = "native",
    proxy: ProxyConfig | None = None,
) -> tuple[Any, set[Any]]:
    """A protocol factory for ``loop.create_server`` and the set of live sessions.

    With ``implicit_tls`` the listener itself is TLS (SMTPS, the caller passes ``ssl=``):
    AUTH is offered at once and STARTTLS is not.  Otherwise ``tls`` enables STARTTLS.
    ``engine`` is ``native`` (:mod:`esprelay.smtp.engine`) or ``aiosmtpd``
    (:class:`RelaySMTP`); both speak the same dialogue.  With ``proxy`` every connection
    starts with a PROXY protocol header (:mod:`esprelay.smtp.proxy`), before any TLS:
    the SMTPS port's listener is then plain TCP (no ``ssl=``) and the gate starts TLS.
    """
    if engine not in ("native", "aiosmtpd"):
        raise ValueError(f"unknown SMTP engine {engine!r}")
    if sessions is None:
        sessions = set()
    session_policy = SessionPolicy(
        intake,
        guards if guards is not None else Guards(),
        policy if policy is not None else RelayPolicy.loopback(),
        users if users is not None else UserDB(),
        limiter if limiter is not None else FailureLimiter(5, 300.0),
        implicit_tls=implicit_tls,
        sessions=sessions,
    )
    tls_context = None if (tls is None or implicit_tls) else tls.listener_context()
    if engine == "native":
        listener = Listener(
            handler,
            hostname=hostname,
            data_size_limit=data_size_limit,
            line_length_limit=line_length_limit,
            command_size_limit=command_size_limit,
            timeout=timeout,
            policy=session_policy,
            tls_context=tls_context,
        )
        return _behind_proxy(
            functools.partial(SMTPSession, listener), proxy, tls, implicit_tls, timeout
        ), sessions
    mail_log = logging.getLogger("mail.log")
    if _filter not in mail_log.filters:
        mail_log.addFilter(_filter)
    # A subclass per listener carries the limits, rather than mutating aiosmtpd's class.
    protocol = type(
        "RelaySMTPListener",
        (RelaySMTP,),
        {
            "line_length_limit": line_length_limit,
            "command_size_limit": command_size_limit,
            "policy": session_policy,
            "users": session_policy.users,
            "limiter": session_policy.limiter,
            "verify_slots": session_policy.verify_slots,
            "idle_timeout": timeout,
            "data_timeout": session_policy.guards.data_timeout,
        },
    )
    # Our timer answers 421 first; aiosmtpd's own (it only closes) is a backstop.
    backstop = 2 * (timeout + session_policy.guards.data_timeout) + 60

    def factory() -> RelaySMTP:
        smtp: RelaySMTP = protocol(
            handler,
            hostname=hostname,
            ident=IDENT,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=backstop,
            tls_context=tls_context,
            auth_require_tls=False,  # per client address: RelaySMTP._auth checks it
        )
        return smtp

    return _behind_proxy(factory, proxy, tls, implicit_tls, timeout), sessions


def _behind_proxy(
    factory: Callable[[], ProxiedSession],
    proxy: ProxyConfig | None,
    tls: TLSContextSource | None,
    implicit_tls: bool,
    timeout: float,
) -> Callable[[], Any]:
    """``factory``, or with ``proxy`` a PROXY protocol gate in front of it."""
    if proxy is None:
        return factory
    context = tls.listener_context() if tls is not None and implicit_tls else None
    return gated(proxy, factory, tls_context=context, handshake_timeout=min(60.0, timeout or 60.0))
