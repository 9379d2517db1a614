"""The native SMTP engine: one ``asyncio.Protocol`` per connection, no stream or task.

aiosmtpd runs a coroutine per connection that reads each line through a
``StreamReader`` and awaits every reply's ``drain()``: a task step, a future and a
timer handle per command.  Here ``data_received`` parses the lines it was given and
answers them at once, with one ``write()`` for all the replies to one read (a
pipelining client gets its replies in one segment).  Only what must wait runs as a
task: the end of DATA (the spool's commit or the ESP's answer), AUTH (the password
check runs in a thread) and STARTTLS (the handshake).  While such a step runs, later
input is kept in order and processed when it ends.

The dialogue is aiosmtpd 1.4's as :class:`esprelay.smtp.server.RelaySMTP` extends it:
the same replies in the same order (:mod:`esprelay.smtp.replies`), the same relay checks
(the handler's), and the same session policy
(:mod:`esprelay.smtp.session_policy`: connection limits, budgets of errors, unrecognised
and junk commands, timeouts and the session lifetime, AUTH rules); this module only
speaks the protocol (command and line length, message size, TLS: input pipelined after
STARTTLS is discarded).  ``ESPRELAY_SMTP_ENGINE=aiosmtpd`` selects aiosmtpd's engine
instead; tests/test_smtp_engines.py compares the two.

Differences, by choice: input that arrives while the message is being committed is
answered after the DATA reply (aiosmtpd too), but a client that half-closes its side
after sending ``QUIT`` still gets its DATA reply (aiosmtpd cancelled the message).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import Envelope, Session

from esprelay.errors import smtp_reply
from esprelay.smtp import dsnparams
from esprelay.smtp.dataread import MessageReader
from esprelay.smtp.handler import RelayHandler, client_address, simple_path
from esprelay.smtp.replies import (
    AUTH_ABORTED,
    AUTH_ALREADY,
    AUTH_BAD_BASE64,
    AUTH_CANNOT_SPLIT,
    AUTH_NEEDS_TLS,
    AUTH_NO_VALUE,
    AUTH_NOT_RECOGNIZED,
    AUTH_OK,
    AUTH_TOO_MANY_VALUES,
    AUTH_UNKNOWN_MECHANISM,
    BAD_BODY,
    BAD_SMTPUTF8,
    BAD_SYNTAX,
    BYE,
    CANNOT_VRFY,
    DATA_SYNTAX,
    EHLO_SYNTAX,
    EXTENDED_SYNTAX,
    HELO_SYNTAX,
    HELP_F,
    HELP_SYNTAX,
    LINE_TOO_LONG,
    MAIL_PARAMETERS,
    MAIL_SYNTAX,
    MALFORMED_PATH,
    NEED_MAIL,
    NEED_RCPT,
    NESTED_MAIL,
    NO_EXPN,
    NO_TLS,
    OK,
    QUIT_SYNTAX,
    RCPT_PARAMETERS,
    RCPT_SYNTAX,
    READY_FOR_TLS,
    RSET_SYNTAX,
    SEND_HELO_F,
    SIZE_TOO_LARGE,
    START_DATA,
    STARTTLS_SYNTAX,
    TLS_ACTIVE,
    UNKNOWN_COMMAND,
    VRFY_SYNTAX,
)
from esprelay.smtp.session_policy import (
    PolicyConnection,
    SessionBudget,
    SessionPolicy,
    SessionTimer,
    loggable,
)

log = logging.getLogger("esprelay.smtp")

IDENT = "esprelay ESMTP"
# Input kept while a step (DATA commit, AUTH, STARTTLS) runs, before reading pauses.
PAUSE_AT = 1 << 20

_COMMAND, _DATA, _LINE, _BUSY, _CLOSED = range(5)
_HELP = {
    "AUTH": "AUTH <mechanism>",
    "DATA": "DATA",
    "EHLO": "EHLO hostname",
    "HELO": "HELO hostname",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM: <address>",
    "NOOP": "NOOP [ignored]",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO: <address>",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY <address>",
}
_HELP_EXTENDED = {"MAIL": EXTENDED_SYNTAX, "RCPT": EXTENDED_SYNTAX}
_AUTH_MECHANISMS = ("LOGIN", "PLAIN")
_SUCCESS = AUTH_OK  # the name _check_login answers with
# aiosmtpd's LOGIN challenges (clients ignore the text; some tests compare it).
_USERNAME_CHALLENGE = "User Name\x00"
_PASSWORD_CHALLENGE = "Password\x00"
_getaddr_fallback = aiosmtpd.smtp.SMTP._getaddr


def _extended_limits(data_size_limit: int) -> dict[str, int]:
    """What a command line may have beyond the limit after EHLO: aiosmtpd's SIZE= (26,
    with a size limit) and SMTPUTF8 (10) on MAIL, and the DSN parameters."""
    return {
        "MAIL": (26 if data_size_limit else 0) + 10 + dsnparams.MAIL_LINE_EXTRA,
        "RCPT": dsnparams.RCPT_LINE_EXTRA,
    }


def _options(tokens: list[str], dsn: frozenset[str]) -> tuple[list[str], list[str]]:
    """(the upper-cased parameters, the DSN ones as written) of MAIL or RCPT."""
    others, taken = dsnparams.take(tokens, dsn)
    return [o.upper() for o in others], taken


def _params(options: list[str]) -> dict[str, str | bool] | None:
    """RFC 1869 ``keyword[=value]`` parameters, or None if one is malformed."""
    result: dict[str, str | bool] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not name.isalnum() or (eq and not value):
            return None
        result[name] = value if eq else True
    return result


class Listener:
    """What every session of one listening socket shares."""

    def __init__(
        self,
        handler: RelayHandler,
        *,
        hostname: str,
        data_size_limit: int,
        line_length_limit: int,
        command_size_limit: int,
        timeout: float,
        policy: SessionPolicy,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.handler = handler
        self.policy = policy
        self.intake = policy.intake
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.extended_limits = _extended_limits(data_size_limit)
        self.line_length_limit = line_length_limit
        self.command_size_limit = command_size_limit
        self.timeout = timeout
        self.guards = policy.guards
        self.users = policy.users
        self.limiter = policy.limiter
        self.verify_slots = policy.verify_slots
        self.tls_context = tls_context
        self.implicit_tls = policy.implicit_tls
        self.greeting = f"220 {hostname} {IDENT}\r\n".encode()


class SMTPSession(PolicyConnection, asyncio.Protocol):
    """One SMTP connection, the handler's :class:`~esprelay.smtp.handler.Connection`."""

    local_part_limit = 0  # aiosmtpd's default, read by its address parser

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.handler = listener.handler
        self.users = listener.users
        self.tls_context = None if listener.implicit_tls else listener.tls_context
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.envelope = Envelope()
        self._tls_protocol: object | None = None
        self._auth_needs_tls = True
        self._state = _COMMAND
        self._input = bytearray()
        self._out: list[bytes] = []
        self._stage: str | None = None
        self._budget = SessionBudget(listener.guards)
        self._discarding = False  # inside a command line longer than the line limit
        self._counted = False  # admitted: holds a connection slot
        self._client = ""
        self._step: asyncio.Task[None] | None = None
        self._line_waiter: asyncio.Future[bytes | None] | None = None
        self._paused = False
        self._handshaking = False
        self._writing_paused = False
        self._eof = False
        self._timer = SessionTimer(self, listener.policy.max_session_seconds)
        self._loop = asyncio.get_running_loop()
        self._message: MessageReader | None = None  # in DATA
        #: The DSN parameters of the MAIL or RCPT being answered (the handler reads them).
        self.dsn_parameters: list[str] = []

    # region what the handler may ask (esprelay.smtp.handler.Connection)

    @property
    def tls(self) -> bool:
        return self._tls_protocol is not None or (
            self.session is not None and bool(self.session.ssl)
        )

    def close(self) -> None:
        # Not at once: the reply being made, and those before it, are written first.
        if self._state != _CLOSED:
            self._state = _CLOSED
            self._loop.call_soon(self._close_transport)

    def _close_transport(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # endregion

    # region connection

    @property
    def in_transaction(self) -> bool:
        return bool(self.envelope.mail_from) or self._state == _DATA or self._step is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not registered as asyncio.Transport subclasses.)
        self.transport = transport = cast(asyncio.Transport, transport)
        listener = self.listener
        session = self.session = Session(self._loop)
        session.peer = self.peer_of(transport)
        client = self._client = client_address(session.peer)
        policy = listener.policy
        refusal = policy.admit(self, client)
        if refusal is not None:
            self._goodbye(refusal)
            return
        self._counted = True
        if listener.implicit_tls:
            session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}
        self._auth_needs_tls = policy.auth_requires_tls(client)
        transport.write(listener.greeting)
        self._timer.arm(listener.timeout)

    def _goodbye(self, reply: str) -> None:
        self._state = _CLOSED
        assert self.transport is not None
        self.transport.write(reply.encode() + b"\r\n")
        self.transport.close()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.listener.policy.release(self, self._client)
        self._timer.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._release()
        if self._line_waiter is not None and not self._line_waiter.done():
            self._line_waiter.set_result(None)
        if self._step is not None:
            # As aiosmtpd: a message whose client went away is not answered (nor kept,
            # unless the spool had already committed it: then it is delivered).
            self._step.cancel()
        self.transport = None
        if self._message is not None:
            self._message.discard()  # the file of a message cut off in DATA
            self._message = None
        self._input = bytearray()

    def eof_received(self) -> bool | None:
        self._eof = True
        waiter = self._line_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # an AUTH answer will not come
        if self._step is None and self._state != _CLOSED:
            self._close()
        # On TLS, keeping the transport half-open is not possible (and warns).
        return self._tls_protocol is None and self.session is not None and not self.session.ssl

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self._writing_paused or (self._step is not None and len(self._input) > PAUSE_AT)
        if pause and not self._paused:
            self._paused = True
            transport.pause_reading()
        elif not pause and self._paused:
            self._paused = False
            transport.resume_reading()

    def _close(self) -> None:
        self._flush()
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    # endregion

    # region timeouts (esprelay.smtp.session_policy.SessionTimer)

    def session_timed_out(self) -> None:
        if self._state == _CLOSED or self.transport is None:
            return
        reply = self.listener.policy.timed_out(self._client, handshaking=self._handshaking)
        self._out.append(reply.encode() + b"\r\n")
        if self._step is not None:
            self._step.cancel()
        self._close()

    def session_expired(self) -> bool:
        return self._state == _CLOSED or self._end_if_expired()

    def _end_if_expired(self) -> bool:
        """Past its lifetime and between commands: 421 and close (True)."""
        if not self._timer.expired or self._state != _COMMAND or self._step is not None:
            return False
        self._out.append(self.listener.policy.lifetime_over(self._client).encode() + b"\r\n")
        self._close()
        return True

    # endregion

    # region input

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        if self._state == _DATA and not self._input:
            self._data_received(data)
        else:
            self._input += data
        if self._state == _LINE:
            self._feed_line()
        elif self._step is None:
            self._process()
        else:
            self._update_reading()

    def _feed_line(self) -> None:
        """Hand the next complete line to the step waiting for it (AUTH)."""
        line = self._next_line()
        if line is None:
            return
        waiter = self._line_waiter
        self._state = _BUSY
        if waiter is not None and not waiter.done():
            waiter.set_result(line)

    def _process(self) -> None:
        """Handle the buffered input until it runs out or a step has to wait."""
        try:
            while self._step is None and self._state != _CLOSED:
                if self._state == _DATA:
                    if not self._input:
                        break
                    data = bytes(self._input)
                    self._input.clear()
                    self._data_received(data)
                    continue
                line = self._next_line()
                if line is None:
                    break
                self._command(line)
        finally:
            self._flush()
        if self._eof and self._step is None and self._state != _CLOSED:
            self._close()

    def _next_line(self) -> bytes | None:
        """The next line with its line ending, None if incomplete, b"" if too long."""
        buffer = self._input
        end = buffer.find(b"\n")
        limit = self.listener.line_length_limit
        if end < 0:
            if len(buffer) > limit:
                # A line longer than the limit: drop it as it comes, answer at its end.
                self._discarding = True
                buffer.clear()
            return None
        if self._discarding or end > limit:
            self._discarding = False
            del buffer[: end + 1]
            return b""
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        return line

    def _command(self, raw: bytes) -> None:
        if not raw:
            self._reply(LINE_TOO_LONG)
            return
        line = raw.rstrip(b"\r\n")
        if not line:
            self._reply(BAD_SYNTAX)
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self._reply(BAD_SYNTAX)
            return
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
        listener = self.listener
        assert self.session is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%r >> %r", self.session.peer, loggable(verb, line))
        limit = listener.command_size_limit
        if self.session.extended_smtp:
            limit += listener.extended_limits.get(verb, 0)
        if len(line) > limit:
            self._reply(LINE_TOO_LONG)
            return
        method = _COMMANDS.get(verb)
        if method is None:
            goodbye = self._budget.count_unknown(self._client)
            if goodbye is not None:
                self._reply(goodbye)
                self._close()
                return
            self._reply(UNKNOWN_COMMAND)
            return
        self._timer.arm(listener.timeout)
        try:
            method(self, arg)
        except Exception as error:  # a bug in a hook: answer as aiosmtpd does
            log.exception("SMTP session error")
            self._stage = None
            self._reply(smtp_reply(error))

    # endregion

    # region output

    def _reply(self, status: str) -> None:
        if self._stage is not None and status[:1] in "45" and self.listener.intake.on_reply:
            self.listener.policy.observe(self._stage, status)
        self._out.append(status.encode("utf-8", "surrogateescape") + b"\r\n")
        if status[:1] == "5":
            goodbye = self._budget.count_error(self._client)
            if goodbye is not None and self._state != _CLOSED:
                self._out.append(goodbye.encode() + b"\r\n")
                self._close()

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _start(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` (it ends by replying); input waits until it is done."""
        self._state = _BUSY
        self._flush()
        task = self._loop.create_task(step)
        self._step = task
        task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[None]) -> None:
        self._step = None
        if task.cancelled() or self._state == _CLOSED:
            self._flush()
            return
        error = task.exception()
        if error is not None:
            log.error("SMTP session error", exc_info=error)
            self._reply(smtp_reply(error))
        if self._state == _BUSY:
            self._state = _COMMAND
        if self._end_if_expired():
            return
        self._update_reading()
        self._process()

    # endregion

    # region commands

    def _helo_needed(self, verb: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            self._reply(SEND_HELO_F.format(verb))
            return True
        return False

    def _rset(self) -> None:
        self.envelope = Envelope()

    def _junk_command(self) -> bool:
        """Count a command that moves no mail; past the limit answer 421 and close (True)."""
        goodbye = self._budget.count_junk(self._client)
        if goodbye is None:
            return False
        self._reply(goodbye)
        self._close()
        return True

    def _repeated_helo(self) -> bool:
        assert self.session is not None
        return self.session.host_name is not None and self._junk_command()

    def smtp_HELO(self, arg: str | None) -> None:
        if self._repeated_helo():
            return
        if not arg:
            self._reply(HELO_SYNTAX)
            return
        self._rset()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = arg
        self._reply(f"250 {self.listener.hostname}")

    def smtp_EHLO(self, arg: str | None) -> None:
        if self._repeated_helo():
            return
        if not arg:
            self._reply(EHLO_SYNTAX)
            return
        listener = self.listener
        self._rset()
        assert self.session is not None
        self.session.extended_smtp = True
        lines = [f"250-{listener.hostname}"]
        if listener.data_size_limit:
            lines.append(f"250-SIZE {listener.data_size_limit}")
        lines += ["250-8BITMIME", "250-SMTPUTF8"]
        if self.tls_context and not self._tls_protocol:
            lines.append("250-STARTTLS")
        if not self._auth_needs_tls or self._tls_protocol:
            lines.append("250-AUTH " + " ".join(_AUTH_MECHANISMS))
        lines.append("250 HELP")
        lines = self.handler.ehlo(self, self.session, arg, lines)
        self._out.append("\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n")

    def smtp_NOOP(self, arg: str | None) -> None:
        if self._junk_command():
            return
        self._reply(OK)

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self._reply(QUIT_SYNTAX)
            return
        self._reply(BYE)
        self._close()

    def smtp_RSET(self, arg: str | None) -> None:
        if self._junk_command():
            return
        if arg:
            self._reply(RSET_SYNTAX)
            return
        self._rset()
        self._reply(OK)

    def smtp_VRFY(self, arg: str | None) -> None:
        if self._junk_command():
            return
        # Never confirm or deny an address (RFC 5321 3.5.3 allows 252), never echo it.
        if not arg:
            self._reply(VRFY_SYNTAX)
            return
        self._reply(CANNOT_VRFY)

    def smtp_EXPN(self, arg: str | None) -> None:
        if self._junk_command():
            return
        self._reply(NO_EXPN)

    def smtp_HELP(self, arg: str | None) -> None:
        if self._junk_command():
            return
        assert self.session is not None
        available = sorted(v for v in _HELP if v != "STARTTLS" or self.tls_context)
        code = 250
        if arg:
            verb = arg.upper()
            if verb in available:
                text = _HELP[verb]
                if self.session.extended_smtp:
                    text += _HELP_EXTENDED.get(verb, "")
                self._reply(HELP_SYNTAX + text)
                return
            code = 501
        self._reply(HELP_F.format(code, " ".join(available)))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        path = simple_path(arg)
        if path is not None:
            return path
        return _getaddr_fallback(self, arg)  # type: ignore[arg-type]

    def _path(self, arg: str | None, keyword: str, syntax: str) -> tuple[str, list[str]] | None:
        """The address and upper-cased parameters of MAIL/RCPT, or None (answered)."""
        assert self.session is not None
        extended = self.session.extended_smtp
        if extended:
            syntax += EXTENDED_SYNTAX
        if arg is None or arg[: len(keyword)].upper() != keyword:
            self._reply(syntax)
            return None
        address, rest = self._getaddr(arg[len(keyword) :].strip())
        if address is None:
            self._reply(MALFORMED_PATH)
            return None
        if not address or (not extended and rest):
            self._reply(syntax)
            return None
        return address, (rest or "").split()

    def _staged(self, stage: str, command: Callable[[str | None], None], arg: str | None) -> None:
        """Run ``command`` with its replies observed as answers to ``stage`` (metrics)."""
        self._stage = stage
        try:
            command(arg)
        finally:
            self._stage = None

    def smtp_MAIL(self, arg: str | None) -> None:
        self._staged("mail", self._mail, arg)

    def _mail(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        syntax = MAIL_SYNTAX
        path = self._path(arg, "FROM:", syntax)
        if path is None:
            return
        if self.envelope.mail_from:
            self._reply(NESTED_MAIL)
            return
        address, tokens = path
        options, self.dsn_parameters = _options(tokens, dsnparams.MAIL_KEYWORDS)
        params = _params(options)
        if params is None:
            self._reply(self._syntax(syntax))
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            self._reply(BAD_BODY)
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            self._reply(BAD_SMTPUTF8)
            return
        self.envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not size.isdigit():
                self._reply(self._syntax(syntax))
                return
            limit = self.listener.data_size_limit
            if limit and int(size) > limit:
                self._reply(SIZE_TOO_LARGE)
                return
        if params:
            self._reply(MAIL_PARAMETERS)
            return
        assert self.session is not None
        self._reply(self.handler.mail(self, self.session, self.envelope, address, options))

    def _syntax(self, syntax: str) -> str:
        assert self.session is not None
        return syntax + EXTENDED_SYNTAX if self.session.extended_smtp else syntax

    def smtp_RCPT(self, arg: str | None) -> None:
        self._staged("rcpt", self._rcpt, arg)

    def _rcpt(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if not self.envelope.mail_from:
            self._reply(NEED_MAIL)
            return
        syntax = RCPT_SYNTAX
        path = self._path(arg, "TO:", syntax)
        if path is None:
            return
        address, tokens = path
        options, self.dsn_parameters = _options(tokens, dsnparams.RCPT_KEYWORDS)
        params = _params(options)
        if params is None:
            self._reply(self._syntax(syntax))
            return
        if params:
            self._reply(RCPT_PARAMETERS)
            return
        assert self.session is not None
        self._reply(self.handler.rcpt(self, self.session, self.envelope, address, options))

    def smtp_DATA(self, arg: str | None) -> None:
        self._staged("data", self._data_command, arg)

    def _data_command(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if not self.envelope.rcpt_tos:
            self._reply(NEED_RCPT)
            return
        if arg:
            self._reply(DATA_SYNTAX)
            return
        self._reply(START_DATA)
        listener = self.listener
        # A deadline for the whole DATA phase: a client trickling its message is cut off.
        self._timer.arm(listener.guards.data_timeout)
        self._state = _DATA
        self._message = MessageReader(
            size_limit=listener.data_size_limit,
            line_limit=listener.line_length_limit,
            spill=self.handler.spiller,
        )

    # endregion

    # region DATA

    def _data_received(self, data: bytes) -> None:
        """Message bytes (rules in :mod:`esprelay.smtp.dataread`); at the final dot,
        refuse the message or hand it on."""
        reader = self._message
        assert reader is not None
        rest = reader.feed(data)
        if rest is None:
            return
        self._message = None
        self._state = _BUSY
        if rest:
            self._input[:0] = rest
        self._timer.arm(self.listener.timeout)
        if reader.error is not None:
            self._staged("data", self._refuse_message, reader.error)
            self._rset()
            self._state = _COMMAND
            self._end_if_expired()
            return
        # No local keeps the bytes: the handler takes them from the envelope and drops
        # them there, so a repaired copy does not live beside the original.  (A large
        # message is a Spilled there, which aiosmtpd's Envelope does not know of.)
        content: Any = reader.take()
        self.envelope.content = self.envelope.original_content = content
        self._start(self._finish_data())

    def _refuse_message(self, reply: str | None) -> None:
        assert reply is not None
        self._reply(reply)

    async def _finish_data(self) -> None:
        assert self.session is not None
        envelope = self.envelope
        try:
            status = await self.handler.handle_DATA(self, self.session, envelope)
        except Exception as error:
            log.exception("SMTP session error")
            status = smtp_reply(error)
        self._rset()
        if status[:1] == "2":
            self._budget.message_accepted()
        self._stage = "data"
        try:
            self._reply(status)
        finally:
            self._stage = None
        self._flush()

    # endregion

    # region STARTTLS

    def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._tls_protocol is not None:
            self._reply(TLS_ACTIVE)
            return
        if arg:
            self._reply(STARTTLS_SYNTAX)
            return
        if not self.tls_context:
            self._reply(NO_TLS)
            return
        self._reply(READY_FOR_TLS)
        # RFC 3207 4.2: what the client pipelined after STARTTLS is discarded.
        self._input.clear()
        self._start(self._starttls(self.tls_context))

    async def _starttls(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        self._handshaking = True
        try:
            secure = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=min(60.0, self.listener.timeout or 60.0),
            )
        except (OSError, RuntimeError, ValueError) as exc:  # SSL errors, resets, timeouts
            log.info("TLS handshake not completed: closing client=%s (%s)", self._client, exc)
            self._abandon(transport)
            return
        except asyncio.CancelledError:  # the idle timeout, or shutdown
            self._abandon(transport)
            raise
        finally:
            self._handshaking = False
        if secure is None or self._state == _CLOSED:
            self._abandon(transport)
            return
        self.transport = secure
        self._tls_protocol = secure
        self._input.clear()
        # RFC 3207 4.2: forget what the client said before; it must EHLO again.
        session = self.session = Session(self._loop)
        session.peer = self.peer_of(secure)
        session.ssl = {
            "ssl_object": secure.get_extra_info("ssl_object"),
            "peercert": secure.get_extra_info("peercert"),
            "cipher": secure.get_extra_info("cipher"),
        }
        self._rset()
        self._timer.arm(self.listener.timeout)

    def _abandon(self, transport: asyncio.Transport) -> None:
        """Close a connection whose TLS handshake did not complete.  Our protocol may
        never hear of its end (the TLS layer tells it only after a handshake), so the
        session's slot and timer are freed here."""
        self._state = _CLOSED
        transport.abort()
        self._release()

    # endregion

    # region AUTH

    def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None
        listener = self.listener
        refusal = listener.policy.auth_refusal(self._client)
        if refusal is not None:
            self._reply(refusal)
            return
        if self._helo_needed("EHLO"):
            return
        if not self.session.extended_smtp:
            self._reply(AUTH_NOT_RECOGNIZED)
            return
        if self._auth_needs_tls and not self._tls_protocol:
            self._reply(AUTH_NEEDS_TLS)
            return
        if self.session.authenticated:
            self._reply(AUTH_ALREADY)
            return
        if not arg:
            self._reply(AUTH_NO_VALUE)
            return
        args = arg.split()
        if len(args) > 2:
            self._reply(AUTH_TOO_MANY_VALUES)
            return
        # Some devices send "auth login": mechanism names are case-insensitive.
        mechanism = args[0].upper()
        if mechanism not in _AUTH_MECHANISMS:
            self._reply(AUTH_UNKNOWN_MECHANISM)
            return
        initial = args[1] if len(args) > 1 else None
        self._start(self._auth(mechanism, initial))

    async def _auth(self, mechanism: str, initial: str | None) -> None:
        if mechanism == "PLAIN":
            blob = await self._client_blob(initial, "")
            if blob is None:
                return
            parts = blob.split(b"\0")
            if len(parts) != 3:
                self._reply(AUTH_CANNOT_SPLIT)
                return
            login, password = parts[1], parts[2]
        else:
            login_blob = await self._client_blob(initial, _USERNAME_CHALLENGE)
            if login_blob is None:
                return
            password_blob = await self._client_blob(None, _PASSWORD_CHALLENGE)
            if password_blob is None:
                return
            login, password = login_blob, password_blob
        await self._check_login(mechanism, login, password)

    async def _client_blob(self, initial: str | None, challenge: str) -> bytes | None:
        """The initial response or the answer to a 334 challenge, decoded (None: the
        reply was sent, or the client went away)."""
        if initial is not None:
            text = initial.encode("utf-8", "surrogateescape")
        else:
            self._out.append(b"334 " + base64.b64encode(challenge.encode()) + b"\r\n")
            self._flush()
            line = await self._read_line()
            if line is None:
                return None
            if not line:
                self._reply(LINE_TOO_LONG)
                return None
            text = line.strip()
            if text == b"*":
                log.warning("AUTH aborted by client=%s", self._client)
                self._reply(AUTH_ABORTED)
                return None
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._reply(AUTH_BAD_BASE64)
            return None

    async def _read_line(self) -> bytes | None:
        """The client's next line (an AUTH answer, never parsed as a command); None if
        the connection ended first."""
        line = self._next_line()
        if line is not None:
            return line
        if self._state == _CLOSED:
            return None
        waiter: asyncio.Future[bytes | None] = self._loop.create_future()
        self._line_waiter = waiter
        self._state = _LINE
        try:
            return await waiter
        finally:
            self._line_waiter = None
            if self._state == _LINE:
                self._state = _BUSY

    async def _check_login(self, mechanism: str, login: bytes, password: bytes) -> None:
        assert self.session is not None
        listener = self.listener
        result = await listener.policy.login(self._client, mechanism, login, password)
        if result.user is None:
            self._reply(result.refusal)
            return
        self.session.authenticated = True
        self.session.auth_data = result.user  # type: ignore[assignment]
        self._reply(_SUCCESS)

    # endregion


_COMMANDS: dict[str, Callable[[SMTPSession, str | None], None]] = {
    "HELO": SMTPSession.smtp_HELO,
    "EHLO": SMTPSession.smtp_EHLO,
    "MAIL": SMTPSession.smtp_MAIL,
    "RCPT": SMTPSession.smtp_RCPT,
    "DATA": SMTPSession.smtp_DATA,
    "RSET": SMTPSession.smtp_RSET,
    "NOOP": SMTPSession.smtp_NOOP,
    "QUIT": SMTPSession.smtp_QUIT,
    "VRFY": SMTPSession.smtp_VRFY,
    "EXPN": SMTPSession.smtp_EXPN,
    "HELP": SMTPSession.smtp_HELP,
    "AUTH": SMTPSession.smtp_AUTH,
    "STARTTLS": SMTPSession.smtp_STARTTLS,
}
