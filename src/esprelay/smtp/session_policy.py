"""One SMTP session policy for both engines.

The engines (:mod:`esprelay.smtp.engine`, the native one, and
:mod:`esprelay.smtp.server`'s on aiosmtpd) speak the protocol; what a session may do
and how long is decided here, once:

- admission: connections in total and per client address (trusted networks are exempt
  from the per-client limit, as Postfix exempts ``$mynetworks``), a polite ``421`` while
  the bridge drains, and the release of the slot;
- AUTH: offered only with users, only over TLS outside the plaintext-allowed networks,
  refused while a client has too many recent failures; passwords checked a few at once;
- budgets per session: ``5xx`` replies (``ESPRELAY_MAX_ERRORS``), unrecognised commands
  (5, aiosmtpd's), commands that move no mail (``ESPRELAY_SMTP_JUNK_COMMAND_LIMIT``);
- the session lifetime (``ESPRELAY_SMTP_MAX_SESSION_SECONDS``) and idle timeouts, as
  replies and log lines (each engine keeps its own timer);
- what a command line may show in the logs.

Every reply comes from :mod:`esprelay.smtp.replies`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import ssl
from typing import Any, Protocol

from esprelay.intake import IntakeState
from esprelay.smtp import auth
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.guards import Guards
from esprelay.smtp.policy import RelayPolicy
from esprelay.smtp.replies import (
    AUTH_BLOCKED,
    AUTH_UNAVAILABLE,
    SESSION_TOO_LONG,
    SHUTTING_DOWN,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK_COMMANDS,
    TOO_MANY_UNKNOWN_COMMANDS,
)

log = logging.getLogger("esprelay.smtp")

# Password checks (scrypt, tens to hundreds of ms of CPU) run in threads, this many at
# once: a burst of logins from many addresses cannot stall the listener or the machine.
VERIFY_CONCURRENCY = 2
#: Unrecognised commands a session may send (aiosmtpd's BOGUS_LIMIT).
UNKNOWN_COMMAND_LIMIT = 5
KNOWN_COMMANDS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP"}
    | {"AUTH", "STARTTLS"}
)
NOT_LOGGED = b"<not a command: not logged>"


def loggable(verb: str, line: bytes) -> bytes:
    """A command line as DEBUG may show it: no AUTH data, nothing that is not a command
    (a client that sends its credentials after AUTH was refused makes them "commands")."""
    if verb not in KNOWN_COMMANDS:
        return NOT_LOGGED
    if verb == "AUTH":
        words = line.split(None, 2)
        return b" ".join(words[:2]) + (b" ********" if len(words) > 2 else b"")
    return line


def loggable_line(line: bytes) -> bytes:
    """:func:`loggable` of a whole line, its verb not yet known."""
    verb = line.strip().split(b" ", 1)[0].upper()
    return loggable(verb.decode("ascii", "replace"), line)


class SessionPolicy:
    """What every session of one listener shares and obeys, whatever the engine."""

    def __init__(
        self,
        intake: IntakeState,
        guards: Guards,
        relay: RelayPolicy,
        users: UserDB,
        limiter: FailureLimiter,
        *,
        implicit_tls: bool,
        sessions: set[Any],
    ) -> None:
        self.intake = intake
        self.guards = guards
        self.users = users
        self.limiter = limiter
        self.implicit_tls = implicit_tls
        self.sessions = sessions
        # Parsing the client's address costs ~20 us; the answers are kept per address.
        self.trusted = functools.lru_cache(maxsize=1024)(relay.trusted)
        self.plaintext_auth_allowed = functools.lru_cache(maxsize=1024)(
            relay.plaintext_auth_allowed
        )
        self.verify_slots = asyncio.Semaphore(VERIFY_CONCURRENCY)

    # region admission

    def admit(self, session: object, client: str) -> str | None:
        """Count ``session`` in and return None, or return the 421 that refuses it."""
        guards = self.guards
        if guards.total >= guards.max_connections or (
            guards.per_client[client] >= guards.max_connections_per_client
            and not self.trusted(client)
        ):
            log.warning("too many connections: refusing client=%s", client)
            return TOO_MANY_CONNECTIONS
        if self.intake.draining:
            # A 421 greeting rather than a refused connection: come back later.
            return SHUTTING_DOWN
        guards.total += 1
        guards.per_client[client] += 1
        self.sessions.add(session)
        return None

    def release(self, session: object, client: str) -> None:
        """Free the slot :meth:`admit` counted (call once per admitted session)."""
        self.sessions.discard(session)
        guards = self.guards
        guards.total -= 1
        guards.per_client[client] -= 1
        if guards.per_client[client] <= 0:
            del guards.per_client[client]

    # endregion

    # region AUTH

    def auth_requires_tls(self, client: str) -> bool:
        return not (self.implicit_tls or self.plaintext_auth_allowed(client))

    async def login(
        self, client: str, mechanism: str, name: bytes, password: bytes
    ) -> auth.LoginResult:
        """One AUTH attempt, decided by :func:`esprelay.smtp.auth.login`."""
        result = await auth.login(
            self.users,
            self.limiter,
            self.verify_slots,
            client=client,
            mechanism=mechanism,
            name=name,
            password=password,
        )
        if result.user is None:
            for callback in self.intake.on_auth_failure:
                callback(mechanism, result.refusal)
        return result

    def auth_refusal(self, client: str) -> str | None:
        """Why AUTH is not even tried (no users, too many failures), or None."""
        if not self.users:
            return AUTH_UNAVAILABLE
        if self.limiter.blocked(client):
            log.warning("AUTH refused: too many failures from client=%s", client)
            for callback in self.intake.on_auth_failure:
                callback("", AUTH_BLOCKED)  # refused before the mechanism is read
            return AUTH_BLOCKED
        return None

    # endregion

    # region time

    @property
    def max_session_seconds(self) -> float:
        return self.guards.max_session_seconds

    def timed_out(self, client: str, *, handshaking: bool = False) -> str:
        if handshaking:
            log.info("TLS handshake not completed: closing client=%s (timeout)", client)
        else:
            log.info("timeout: closing client=%s", client)
        return TIMEOUT

    def lifetime_over(self, client: str) -> str:
        log.warning("session lifetime exceeded: closing client=%s", client)
        return SESSION_TOO_LONG

    # endregion

    def observe(self, stage: str, reply: str) -> None:
        """Report a refusal (4xx, 5xx) to MAIL, RCPT or DATA (metrics)."""
        for callback in self.intake.on_reply:
            callback(stage, reply)


class SessionBudget:
    """One session's counters; each ``count_*`` returns the reply that ends the session
    once its limit is passed, else None."""

    __slots__ = ("_guards", "errors", "junk", "unknown")

    def __init__(self, guards: Guards) -> None:
        self._guards = guards
        self.errors = 0
        self.junk = 0
        self.unknown = 0

    def count_error(self, client: str) -> str | None:
        """A 5xx reply was sent."""
        self.errors += 1
        if self.errors < self._guards.max_errors:
            return None
        log.warning("too many errors: closing client=%s", client)
        return TOO_MANY_ERRORS

    def count_junk(self, client: str) -> str | None:
        """A command that moves no mail (NOOP, RSET, VRFY, EXPN, HELP, HELO/EHLO again)."""
        self.junk += 1
        if self.junk <= self._guards.junk_command_limit:
            return None
        log.warning("too many junk commands: closing client=%s", client)
        return TOO_MANY_JUNK_COMMANDS

    def count_unknown(self, client: str) -> str | None:
        """A command that is not one."""
        log.info("unrecognised command from client=%s", client)
        self.unknown += 1
        if self.unknown < UNKNOWN_COMMAND_LIMIT:
            return None
        log.warning("too many unrecognised commands: closing client=%s", client)
        return TOO_MANY_UNKNOWN_COMMANDS

    def message_accepted(self) -> None:
        """A client that sends mail is not idling: the junk count starts again."""
        self.junk = 0


class TimerOwner(Protocol):
    def session_timed_out(self) -> None:
        """No command (or no end of DATA) in time: answer 421 and close."""

    def session_expired(self) -> bool:
        """The lifetime is over: close now if between commands (True), else later."""


class SessionTimer:
    """One session's one timer, moved forward lazily: the idle timeout (or the DATA
    deadline) and the session lifetime.  Arming costs a clock read; the event loop's
    timer is only replaced when the new deadline comes earlier than the old one."""

    __slots__ = ("_handle", "_loop", "_owner", "deadline", "end", "expired")

    def __init__(self, owner: TimerOwner, lifetime: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._owner: TimerOwner | None = owner
        self._handle: asyncio.TimerHandle | None = None
        self.deadline = math.inf
        self.end = self._loop.time() + lifetime if lifetime else math.inf
        #: The lifetime is over; the owner closes the session once between commands.
        self.expired = False

    def arm(self, seconds: float) -> None:
        """The next timeout comes ``seconds`` from now."""
        deadline = self.deadline = self._loop.time() + seconds
        handle = self._handle
        if handle is not None:
            if handle.when() <= deadline:
                return  # it fires first and moves itself to the new deadline
            handle.cancel()
        elif self._owner is None:
            return
        self._handle = self._loop.call_at(self._wake_at(), self._fire)

    def cancel(self) -> None:
        """For good (the session ended): no callback, no reference to the owner."""
        self._owner = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _wake_at(self) -> float:
        return self.deadline if self.expired else min(self.deadline, self.end)

    def _fire(self) -> None:
        self._handle = None
        owner = self._owner
        if owner is None:
            return
        now = self._loop.time()
        if not self.expired and now >= self.end:
            self.expired = True
            if owner.session_expired():
                return
        if now < self.deadline:
            self._handle = self._loop.call_at(self._wake_at(), self._fire)
            return
        owner.session_timed_out()


class PolicyConnection:
    """What both engines answer alike of :class:`~esprelay.smtp.handler.Connection`;
    each engine says whether the connection is encrypted (``tls``) and closes it."""

    _client: str
    _auth_needs_tls: bool
    users: UserDB
    tls_context: ssl.SSLContext | None
    #: The client a PROXY protocol header named (esprelay.smtp.proxy), set before
    #: ``connection_made``; None when the client connected itself.
    proxied_peer: Any = None

    def peer_of(self, transport: asyncio.BaseTransport) -> Any:
        """The client's ``(host, port)``: the one place an engine reads it, so that
        behind a load balancer everything (admission, trust, AUTH limits, logs, the
        message's metadata) sees the client the PROXY header named."""
        if self.proxied_peer is not None:
            return self.proxied_peer
        return transport.get_extra_info("peername")

    @property
    def tls(self) -> bool:
        raise NotImplementedError

    @property
    def client(self) -> str:
        return self._client

    @property
    def auth_offered(self) -> bool:
        return bool(self.users) and (not self._auth_needs_tls or self.tls)

    @property
    def starttls_needed_for_auth(self) -> bool:
        return self._auth_needs_tls and self.tls_context is not None and not self.tls
