"""The SMTP listeners: :func:`smtp_factory`, and the aiosmtpd engine.

``smtp_factory`` makes the protocol factory of a listener for either engine: the native
one (:mod:`esprelay.smtp.engine`, the default) or aiosmtpd's protocol with our guards
(``ESPRELAY_SMTP_ENGINE=aiosmtpd``), described here.

On top of aiosmtpd, :class:`RelaySMTP` adds: connection limits (in total and per
client address, ``421`` beyond them), an error budget per session (``421`` and close
after ``max_errors`` 5xx replies), a total deadline for the DATA phase, ``421`` on
timeouts, case-insensitive AUTH mechanism names, failed-login rate limiting and AUTH
over plaintext only from allowlisted networks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import inspect
import logging
import socket
import ssl
import types
import warnings
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AnyStr, cast

import aiosmtpd
import aiosmtpd.smtp
from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    AuthResult,
    login_always_fail,
    make_loop,
    syntax,
)

from esprelay.errors import ShuttingDown
from esprelay.intake import IntakeState
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.data import CompactDataSMTP
from esprelay.smtp.engine import Listener, SMTPSession
from esprelay.smtp.guards import Guards
from esprelay.smtp.handler import RelayHandler, client_address, simple_path
from esprelay.smtp.hooks import HookDirCache
from esprelay.smtp.policy import RelayPolicy
from esprelay.smtp.replies import SESSION_TOO_LONG, TIMEOUT, TOO_MANY_JUNK_COMMANDS
from esprelay.smtp.tls import TLSContextSource

log = logging.getLogger("esprelay.smtp")

IDENT = "esprelay ESMTP"
# Password checks (scrypt, tens to hundreds of ms of CPU) run in threads, this many at
# once: a burst of logins from many addresses cannot stall the listener or the machine.
VERIFY_CONCURRENCY = 2


KNOWN_COMMANDS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP"}
    | {"AUTH", "STARTTLS"}
)
_NOT_LOGGED = b"<not a command: not logged>"


def _known_command(line: object) -> bool:
    if not isinstance(line, bytes):
        return True
    verb = line.strip().split(b" ", 1)[0].upper()
    return verb.decode("ascii", "replace") in KNOWN_COMMANDS


class _HideAuthDetails(logging.Filter):
    """Keep secrets out of aiosmtpd's log records, and drop noise.

    At DEBUG aiosmtpd logs every line a client sends and every line of message content.
    A client that sends its base64 credentials after AUTH was refused (454, 503, 538)
    makes them "unrecognised commands": a line whose first word is not an SMTP command
    is therefore never logged, nor is an undecodable AUTH reply or message content.
    """

    _DROP = ("can't decode base64", "login_data is deprecated", "DATA readline")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if any(text in message for text in self._DROP):
            return False
        args = record.args
        if isinstance(args, tuple) and args:
            if message in ("_handle_client readline: %r", "%r >> %r"):
                if not _known_command(args[-1]):
                    record.args = (*args[:-1], _NOT_LOGGED)
            elif message == "%r unrecognised: %s":
                record.args = (*args[:-1], _NOT_LOGGED.decode())
            elif (
                message == "%r << %r"
                and isinstance(args[-1], bytes)
                and b"not recognized" in args[-1]
            ):
                record.args = (*args[:-1], b"500 (reply not logged)")
        return True


_filter = _HideAuthDetails()

# region per-listener setup that aiosmtpd's SMTP.__init__ repeats on every connection
# RelaySMTP.__init__ sets exactly the attributes aiosmtpd 1.4.6's SMTP.__init__ sets
# (tests/test_smtp_fast.py compares the two), from what it learnt about the class once.
_MIRRORED_AIOSMTPD = aiosmtpd.__version__ == "1.4.6"
_mail_log = aiosmtpd.smtp.log
_AuthMechAttr = aiosmtpd.smtp._AuthMechAttr


@dataclass(frozen=True)
class _HookNames:
    """One protocol class's hook names, as (key, attribute) pairs in aiosmtpd's order."""

    smtp: tuple[tuple[str, str], ...]
    auth: tuple[str, ...]


# Weak keys: a listener makes its own subclass, and tests make many listeners.
_hook_names: weakref.WeakKeyDictionary[type, _HookNames] = weakref.WeakKeyDictionary()
_handler_hooks: weakref.WeakKeyDictionary[
    type, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]
] = weakref.WeakKeyDictionary()
_new_style_ehlo: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _names_of(cls: type, obj: object) -> _HookNames:
    names = _hook_names.get(cls)
    if names is None:
        found = dir(obj)  # HookDirCache: the hook names only, sorted
        names = _HookNames(
            smtp=tuple((m.replace("smtp_", ""), m) for m in found if m.startswith("smtp_")),
            auth=tuple(m for m in found if m.startswith("auth_")),
        )
        _hook_names[cls] = names
    return names


def _handler_names(handler: Any) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(auth_* names, (key, handle_* name) pairs) of ``handler``, sorted like dir()."""
    cls = type(handler)
    cacheable = isinstance(handler, HookDirCache)  # its dir() is per class, not per object
    names = _handler_hooks.get(cls) if cacheable else None
    if names is None:
        found = sorted(dir(handler))
        names = (
            tuple(m for m in found if m.startswith("auth_")),
            tuple((m.replace("handle_", ""), m) for m in found if m.startswith("handle_")),
        )
        if cacheable:
            _handler_hooks[cls] = names
    return names


def _ehlo_hook_version(hook: Any) -> str:
    function = hook.__func__ if isinstance(hook, types.MethodType) else None
    if function is not None and function in _new_style_ehlo:
        return "new"
    parameters = inspect.signature(hook).parameters
    if len(parameters) == 4:
        warnings.warn(
            "Use the 5-argument handle_EHLO() hook instead of the 4-argument handle_EHLO()"
            " hook; support for the 4-argument handle_EHLO() hook will be removed in"
            " version 2.0",
            DeprecationWarning,
            stacklevel=1,
        )
        return "old"
    if len(parameters) == 5:
        if function is not None:
            _new_style_ehlo.add(function)
        return "new"
    raise RuntimeError("Unsupported EHLO Hook")


# endregion


class RelaySMTP(HookDirCache, CompactDataSMTP):
    """aiosmtpd's SMTP with session tracking, limits and a polite 421 while draining."""

    intake: IntakeState
    sessions: set[RelaySMTP]
    guards: Guards
    policy: RelayPolicy
    #: policy.trusted and policy.plaintext_auth_allowed, remembered per client address
    trusted: Callable[[str], bool]
    plaintext_auth_allowed: Callable[[str], bool]
    users: UserDB
    limiter: FailureLimiter
    verify_slots: asyncio.Semaphore
    implicit_tls: bool = False

    def __init__(
        self,
        handler: Any,
        *,
        data_size_limit: int | None = DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        decode_data: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        timeout: float = 300,
        **options: Any,
    ) -> None:
        if options or not _MIRRORED_AIOSMTPD:
            # Options smtp_factory never passes (AUTH callbacks, PROXY, call limits...):
            # aiosmtpd's own constructor.
            super().__init__(
                handler,
                data_size_limit=data_size_limit,
                enable_SMTPUTF8=enable_SMTPUTF8,
                decode_data=decode_data,
                hostname=hostname,
                ident=ident,
                tls_context=tls_context,
                require_starttls=require_starttls,
                timeout=timeout,
                **options,
            )
        else:
            self._setup(
                handler,
                data_size_limit,
                enable_SMTPUTF8,
                decode_data,
                hostname,
                ident,
                tls_context,
                require_starttls,
                timeout,
            )
        # aiosmtpd keeps these in a class-wide dict that every EHLO grows; keep our own.
        # (The default is bound to a local, not to self: no reference cycle.)
        default_limit = self.command_size_limit
        self.command_size_limits = collections.defaultdict(lambda: default_limit)
        self._counted_client: str | None = None
        self._refused = False
        self._errors = 0
        self._ends = 0
        self._junk = 0  # commands that moved no mail since the last accepted message
        self._busy = 0  # inside DATA, AUTH or STARTTLS: the lifetime waits for its end
        self._expired = False
        self._lifetime: asyncio.TimerHandle | None = None

    def _setup(
        self,
        handler: Any,
        data_size_limit: int | None,
        enable_SMTPUTF8: bool,
        decode_data: bool,
        hostname: str | None,
        ident: str | None,
        tls_context: ssl.SSLContext | None,
        require_starttls: bool,
        timeout: float,
    ) -> None:
        """aiosmtpd 1.4.6's ``SMTP.__init__`` with its other options left at their defaults.

        The same attributes with the same values, minus the per-connection costs:
        ``inspect.getmembers`` and ``dir()`` (hook names are learnt once per class),
        ``inspect.signature`` of the EHLO hook (once per function), ``make_loop()`` and
        its ``warnings.catch_warnings`` (the running loop is the one it would find),
        and the AUTH log line built when nobody logs it.  aiosmtpd's clearing of its
        class-wide ``command_size_limits`` is left out: we keep our own per session.
        """
        self.__ident__ = ident or aiosmtpd.smtp.__ident__
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = make_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.hostname = hostname if hostname else socket.getfqdn()
        self.tls_context = tls_context
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                _mail_log.warning(
                    "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                    "this might cause client connection problems"
                )
            elif tls_context.check_hostname:
                _mail_log.warning(
                    "tls_context.check_hostname == True; this might cause client "
                    "connection problems"
                )
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False

        names = _names_of(type(self), self)
        handler_auth, handler_hooks = _handler_names(handler)
        auth_methods: dict[str, Any] = {}
        for obj, auth_names in ((self, names.auth), (handler, handler_auth)):
            for name in auth_names:
                method = getattr(obj, name)
                mechanism = getattr(
                    method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")
                )
                auth_methods[mechanism] = _AuthMechAttr(method, obj is self)
        self._auth_methods = auth_methods
        if _mail_log.isEnabledFor(logging.INFO):
            _mail_log.info(
                "Available AUTH mechanisms: "
                + " ".join(
                    m + "(builtin)" if impl.is_builtin else m
                    for m, impl in sorted(auth_methods.items())
                )
            )
        self._handle_hooks = {key: getattr(handler, name) for key, name in handler_hooks}
        ehlo_hook = self._handle_hooks.get("EHLO")
        self._ehlo_hook_ver = None if ehlo_hook is None else _ehlo_hook_version(ehlo_hook)
        self._smtp_methods = {key: getattr(self, name) for key, name in names.smtp}
        self._enforce_call_limit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the same connection after STARTTLS
        assert self.session is not None
        self.sessions.add(self)
        client = client_address(self.session.peer)
        guards = self.guards
        # Like Postfix (smtpd_client_connection_limit_exceptions = $mynetworks), trusted
        # networks are exempt from the per-client limit: a local app or a load balancer
        # legitimately opens many sessions from one address.  The total limit still holds.
        if guards.total >= guards.max_connections or (
            guards.per_client[client] >= guards.max_connections_per_client
            and not self.trusted(client)
        ):
            log.warning("too many connections: refusing client=%s", client)
            self._refused = True
            return
        guards.total += 1
        guards.per_client[client] += 1
        self._counted_client = client
        if guards.max_session_seconds:
            self._lifetime = self.loop.call_later(guards.max_session_seconds, self._lifetime_over)
        if self.implicit_tls:
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
        self._auth_require_tls = not (self.implicit_tls or self.plaintext_auth_allowed(client))

    def _release(self) -> None:
        """Free this session's connection slot (idempotent).

        Called from connection_lost and when the session's coroutine ends: after a
        STARTTLS whose handshake never completed, asyncio never calls connection_lost.
        """
        self.sessions.discard(self)
        if self._lifetime is not None:
            self._lifetime.cancel()
            self._lifetime = None
        client = self._counted_client
        if client is not None:
            self._counted_client = None
            self.guards.total -= 1
            self.guards.per_client[client] -= 1
            if self.guards.per_client[client] <= 0:
                del self.guards.per_client[client]

    def connection_lost(self, error: Exception | None) -> None:
        self._release()
        super().connection_lost(error)
        self._end_reached()

    def _end_reached(self) -> None:
        """Once both the connection and the session's coroutine have ended, drop the
        references that point back at this object (bound methods in aiosmtpd's dispatch
        tables, the finished task and its traceback's frames).

        Without this every session is a reference cycle that only the garbage collector
        frees: about 140 objects per message, the message bytes among them, kept until the
        next collection, and a collector that ran several times per message.
        """
        self._ends += 1
        if self._ends < 2:
            return
        self._smtp_methods = {}
        self._auth_methods = {}
        self._handle_hooks = {}
        self._handler_coroutine = None
        self._timeout_handle = None  # its callback is a bound method of self
        # The writer holds this protocol.
        self._reader = self._writer = None  # type: ignore[assignment]
        self._client_connected_cb = None  # a bound method of self (StreamReaderProtocol)

    async def _handle_client(self) -> None:
        try:
            if self._refused:
                await self._say_goodbye("421 4.7.0 Too many connections, try again later")
                return
            # New sessions during shutdown get a 421 greeting instead of a refused
            # connection, so the client knows to come back (RFC 5321 3.8).
            if self.intake.draining:
                await self._say_goodbye(ShuttingDown.smtp_reply)
                return
            await super()._handle_client()
        finally:
            self._release()
            self._end_reached()

    # region session lifetime and junk commands

    def _lifetime_over(self) -> None:
        self._lifetime = None
        self._expired = True
        if not self._busy:
            self._end_expired()

    def _end_expired(self) -> None:
        """Past its lifetime and between commands: 421 and close."""
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is None or transport.is_closing():
            return
        assert self.session is not None
        log.warning(
            "session lifetime exceeded: closing client=%s", client_address(self.session.peer)
        )
        transport.write(SESSION_TOO_LONG.encode() + b"\r\n")
        transport.close()

    async def _busy_with(self, command: Awaitable[None]) -> None:
        """Run a command the session lifetime does not interrupt; close after it if over."""
        self._busy += 1
        try:
            await command
        finally:
            self._busy -= 1
            if self._expired and not self._busy:
                self._end_expired()

    async def _junk_command(self) -> bool:
        """Count a command that moves no mail; past the limit answer 421 and close (True)."""
        self._junk += 1
        if self._junk <= self.guards.junk_command_limit:
            return False
        assert self.session is not None
        log.warning("too many junk commands: closing client=%s", client_address(self.session.peer))
        await self.push(TOO_MANY_JUNK_COMMANDS)
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

    # endregion

    def _handshake_started(self) -> bool:
        return self._tls_protocol is not None

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await self._busy_with(self._starttls(arg))

    async def _starttls(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        assert self.session is not None
        if self._handshake_started() and self.session.ssl is None:
            # The handshake ended without TLS (timeout, garbage): aiosmtpd would go on
            # reading the plaintext the client sent after STARTTLS. Close instead.
            log.info(
                "TLS handshake not completed: closing client=%s",
                client_address(self.session.peer),
            )
            # Discard what the client pipelined (aiosmtpd does so only after success).
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            if isinstance(self._original_transport, asyncio.Transport):
                self._original_transport.abort()
            if self.transport is not None:
                self.transport.close()
            assert self._handler_coroutine is not None
            self._handler_coroutine.cancel()

    # region reply observation (metrics): which transaction stage a reply answers
    _stage: str | None = None

    def _observe(self, stage: str, status: Any) -> None:
        if self.intake.on_reply:
            text = status if isinstance(status, str) else bytes(status).decode(errors="replace")
            for callback in self.intake.on_reply:
                callback(stage, text)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._stage = "mail"
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._stage = None

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._stage = "rcpt"
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._stage = None

    # endregion

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common "<local@domain>" without the email package's parser; the result
        # is the same (see simple_path), the RFC 5321 checks come after, in the handler.
        path = simple_path(arg)
        if path is None:
            return super()._getaddr(arg)
        if self.local_part_limit and len(path[0].rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return path

    @property
    def in_transaction(self) -> bool:
        envelope = self.envelope
        return envelope is not None and bool(envelope.mail_from)

    async def _say_goodbye(self, reply: str) -> None:
        await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    _pending: bytes = b""  # the first lines of a multi-line reply, not yet written

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd's push (encode, write, debug log, drain) and our checks in one call,
        # and a multi-line reply (EHLO) in one write: the client acts on the last line.
        if self._stage is not None and status[:1] in ("4", "5", b"4", b"5"):
            self._observe(self._stage, status)
        elif self._stage == "data" and status[:1] in ("2", b"2"):
            self._junk = 0  # an accepted message: a client that sends mail is not idling
        if isinstance(status, str):
            if status.startswith('500 Error: command "'):
                # aiosmtpd echoes the unknown line back; it may be a credential.
                status = "500 5.5.2 Error: command not recognized"
            # Undecodable client bytes (kept as surrogates) must not make the reply fail.
            response = status.encode("utf-8", "surrogateescape")
        else:
            response = status
        if response[3:4] == b"-":
            self._pending += response + b"\r\n"
            self._log_reply(response)
        else:
            await self._write_reply(response)
        if response[:1] == b"5":
            self._errors += 1
            if self._errors >= self.guards.max_errors and self.transport is not None:
                assert self.session is not None
                log.warning("too many errors: closing client=%s", client_address(self.session.peer))
                await self._write_reply(b"421 4.7.0 Too many errors, closing connection")
                self.transport.close()

    def _log_reply(self, response: bytes) -> None:
        if _mail_log.isEnabledFor(logging.DEBUG):
            assert self.session is not None
            _mail_log.debug("%r << %r", self.session.peer, response)

    async def _write_reply(self, response: bytes) -> None:
        """Write one reply line (after the pending lines of its reply) and drain."""
        pending = self._pending
        if pending:
            self._pending = b""
            self._writer.write(pending + response + b"\r\n")
        else:
            self._writer.write(response + b"\r\n")
        self._log_reply(response)
        await self._writer.drain()

    def _timeout_cb(self) -> None:
        assert self.session is not None
        log.info("timeout: closing client=%s", client_address(self.session.peer))
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(TIMEOUT.encode() + b"\r\n")
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd resets the idle timer per command only, so this is a deadline for the
        # whole DATA phase: a client trickling its message (slowloris) is cut off with 421.
        self._reset_timeout(self.guards.data_timeout)
        self._stage = "data"
        try:
            await self._busy_with(super().smtp_DATA(arg))
        finally:
            self._stage = None
            if self.transport is not None:
                self._reset_timeout()

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if await self._junk_command():
            return
        # Never confirm or deny an address (RFC 5321 3.5.3 allows 252), never echo it.
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery")

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        await self._busy_with(self._auth(arg))

    async def _auth(self, arg: str) -> None:
        assert self.session is not None
        if not self.users:
            await self.push("502 5.5.1 AUTH not available")
            return
        client = client_address(self.session.peer)
        if self.limiter.blocked(client):
            log.warning("AUTH refused: too many failures from client=%s", client)
            await self.push("454 4.7.0 Too many failed logins, try again later")
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
            await self.push("501 5.5.2 Can't split auth value")
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
            await self.push("501 5.5.2 Can't decode base64")
            return None

    async def _check_login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        assert self.session is not None
        client = client_address(self.session.peer)
        async with self.verify_slots:
            user = await asyncio.to_thread(self.users.authenticate, login, password)
        # A name we do not know may be a password typed into the wrong field: not logged.
        shown = login.decode("utf-8", "replace") if self.users.known(login) else "(unknown)"
        if user is None:
            self.limiter.record(client)
            log.warning("AUTH failed: user=%r client=%s mechanism=%s", shown, client, mechanism)
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535
        log.info("AUTH ok: user=%r client=%s mechanism=%s", user.name, client, mechanism)
        return AuthResult(success=True, auth_data=user)


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
) -> tuple[Any, set[Any]]:
    """A protocol factory for ``loop.create_server`` and the set of live sessions.

    With ``implicit_tls`` the listener itself is TLS (SMTPS, the caller passes ``ssl=``):
    AUTH is offered at once and STARTTLS is not.  Otherwise ``tls`` enables STARTTLS.
    ``engine`` is ``native`` (:mod:`esprelay.smtp.engine`) or ``aiosmtpd``
    (:class:`RelaySMTP`); both speak the same dialogue.
    """
    if sessions is None:
        sessions = set()
    users = users if users is not None else UserDB()
    limiter = limiter if limiter is not None else FailureLimiter(5, 300.0)
    if engine == "native":
        listener = Listener(
            handler,
            intake,
            hostname=hostname,
            data_size_limit=data_size_limit,
            line_length_limit=line_length_limit,
            command_size_limit=command_size_limit,
            timeout=timeout,
            guards=guards if guards is not None else Guards(),
            trusted=functools.lru_cache(maxsize=1024)(
                (policy if policy is not None else RelayPolicy.loopback()).trusted
            ),
            plaintext_auth_allowed=functools.lru_cache(maxsize=1024)(
                (policy if policy is not None else RelayPolicy.loopback()).plaintext_auth_allowed
            ),
            users=users,
            limiter=limiter,
            tls_context=None if (tls is None or implicit_tls) else tls.listener_context(),
            implicit_tls=implicit_tls,
            sessions=sessions,
        )
        return functools.partial(SMTPSession, listener), sessions
    if engine != "aiosmtpd":
        raise ValueError(f"unknown SMTP engine {engine!r}")
    mail_log = logging.getLogger("mail.log")
    if _filter not in mail_log.filters:
        mail_log.addFilter(_filter)
    policy = policy if policy is not None else RelayPolicy.loopback()
    # A subclass per listener carries the limits, rather than mutating aiosmtpd's class.
    protocol = type(
        "RelaySMTPListener",
        (RelaySMTP,),
        {
            "line_length_limit": line_length_limit,
            "command_size_limit": command_size_limit,
            "intake": intake,
            "sessions": sessions,
            "guards": guards if guards is not None else Guards(),
            "policy": policy,
            "trusted": staticmethod(functools.lru_cache(maxsize=1024)(policy.trusted)),
            "plaintext_auth_allowed": staticmethod(
                functools.lru_cache(maxsize=1024)(policy.plaintext_auth_allowed)
            ),
            "users": users,
            "limiter": limiter,
            "implicit_tls": implicit_tls,
            "verify_slots": asyncio.Semaphore(VERIFY_CONCURRENCY),
        },
    )
    tls_context = None if (tls is None or implicit_tls) else tls.listener_context()

    def factory() -> RelaySMTP:
        smtp: RelaySMTP = protocol(
            handler,
            hostname=hostname,
            ident=IDENT,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=timeout,
            tls_context=tls_context,
        )
        return smtp

    return factory, sessions
