"""The PROXY protocol (v1 and v2) in front of the SMTP listeners.

Behind a TCP load balancer (HAProxy ``send-proxy``/``send-proxy-v2``, an AWS Network
Load Balancer with proxy protocol v2) every connection comes from the balancer; the
header it sends before anything else names the real client.  With
``ESPRELAY_PROXY_PROTOCOL=true`` each listener puts a :class:`ProxyGate` in front of
its engine, the native one and aiosmtpd's alike:

- a connection from outside ``ESPRELAY_PROXY_TRUSTED`` is closed at once (and logged):
  anyone else could name any address, a trusted one included;
- the gate reads the header, and only the header: it asks the transport for no more
  bytes than the header may still have (:func:`header_wanted`), so what follows (SMTP,
  or the TLS handshake of the SMTPS port) stays in the socket for the engine.  A header
  that is malformed, longer than the specification's 107 bytes (v1) or
  :data:`V2_MAX_PAYLOAD` (v2), or missing after ``timeout`` seconds closes the
  connection with a log line;
- then the engine's session starts as if the client had connected itself, with the
  header's source address as its peer
  (:meth:`~esprelay.smtp.session_policy.PolicyConnection.peer_of`): admission and
  per-client limits, trust, AUTH limits, logs and the spooled message's metadata all
  see the real client.  ``PROXY UNKNOWN`` (v1), the ``LOCAL`` command and the
  unspecified or UNIX address families (v2) keep the balancer's own address, as the
  specification says (balancers send them for their health checks).

aiosmtpd has its own ``proxy_protocol_timeout`` option; it is not used: it reads the
header after the connection was admitted under the balancer's address, leaves
``session.peer`` to the balancer, cannot come before the SMTPS port's TLS, and the
native engine would need a second parser.  The parser is :func:`parse_header`, written
to the specification (haproxy's ``doc/proxy-protocol.txt``) rather than taken from the
``proxy-protocol`` package, whose last release (0.11.3, 2024) lets ``struct.error``
escape on a v2 header shorter than its address block, takes v1 ports such as ``1_0``
or ``+2``, and neither frames nor bounds a header (the caller would write that part
anyway).  tests/test_smtp_proxy.py fuzzes it.  v2 TLVs (CRC32C included) are skipped:
the balancer is trusted, and no TLV changes what the relay does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from esprelay.smtp.handler import client_address
from esprelay.smtp.policy import IPNetwork, in_networks

log = logging.getLogger("esprelay.smtp")

V1_PREFIX = b"PROXY "
#: The longest v1 header, CRLF included (the specification's limit).
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part of a v2 header: signature, version and command, family, length.
V2_FIXED = 16
#: The most a v2 header may carry after its fixed part: addresses (216 bytes at most,
#: for UNIX sockets) and TLVs (HAProxy's SSL and unique-id TLVs, an AWS VPC endpoint
#: id) fit with room to spare; a larger length is refused before it is read.
V2_MAX_PAYLOAD = 2048
#: Seconds a trusted balancer has to send the header (``ESPRELAY_PROXY_PROTOCOL_TIMEOUT``).
HEADER_TIMEOUT = 5.0

_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_V2_FIELDS = struct.Struct("!BBH")
_PORT = struct.Struct("!H")

Peer = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes cannot be (the start of) a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: its ``length`` in bytes, and the client it names (``source``)
    or None when the connection's own peer stands (UNKNOWN, LOCAL, no IP family)."""

    version: int
    length: int
    source: Peer | None


def parse_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``, or None while it is incomplete.

    Raises :class:`ProxyHeaderError` as soon as ``data`` cannot begin a valid header
    (and nothing else: any input is either a header, a prefix of one, or refused); bytes
    after the header are not looked at.
    """
    data = bytes(data[: V2_FIXED + V2_MAX_PAYLOAD])
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    known = min(len(data), len(V1_PREFIX))
    if data[:known] != V1_PREFIX[:known]:
        raise ProxyHeaderError("not a PROXY protocol header")
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        return None
    if data[end - 1 : end] != b"\r":
        raise ProxyHeaderError("v1 header not ended by CRLF")
    words = data[len(V1_PREFIX) : end - 1].split(b" ")
    if words[0] == b"UNKNOWN":
        return ProxyHeader(1, end + 1, None)  # the rest of the line is ignored
    if words[0] not in (b"TCP4", b"TCP6") or len(words) != 5:
        raise ProxyHeaderError("v1 header is not TCP4, TCP6 or UNKNOWN with 4 fields")
    v6 = words[0] == b"TCP6"
    source = _v1_address(words[1], v6)
    _v1_address(words[2], v6)
    port = _v1_port(words[3])
    _v1_port(words[4])
    return ProxyHeader(1, end + 1, (source, port))


def _v1_address(word: bytes, v6: bool) -> str:
    if not (_V1_IPV6 if v6 else _V1_IPV4).fullmatch(word):
        raise ProxyHeaderError("v1 header has a malformed address")
    try:
        address = (ipaddress.IPv6Address if v6 else ipaddress.IPv4Address)(word.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError("v1 header has a malformed address") from None
    return _host(address)


def _v1_port(word: bytes) -> int:
    if not _V1_PORT.fullmatch(word) or int(word) > 65535:
        raise ProxyHeaderError("v1 header has a malformed port")
    return int(word)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    known = min(len(data), len(V2_SIGNATURE))
    if data[:known] != V2_SIGNATURE[:known]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) < V2_FIXED:
        return None
    version_command, family_transport, payload = _V2_FIELDS.unpack_from(data, len(V2_SIGNATURE))
    if version_command >> 4 != 2:
        raise ProxyHeaderError("v2 header of an unknown version")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyHeaderError("v2 header with an unknown command")
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family > 3 or transport > 2:
        raise ProxyHeaderError("v2 header with an unknown address family or protocol")
    if payload > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2 header longer than {V2_FIXED + V2_MAX_PAYLOAD} bytes")
    length = V2_FIXED + payload
    if len(data) < length:
        return None
    if command == 0 or family in (0, 3):  # LOCAL; UNSPEC or UNIX: the socket's peer
        return ProxyHeader(2, length, None)
    size = 4 if family == 1 else 16
    if payload < 2 * size + 4:
        raise ProxyHeaderError("v2 header shorter than its addresses")
    raw = data[V2_FIXED : V2_FIXED + size]
    address = ipaddress.IPv4Address(raw) if family == 1 else ipaddress.IPv6Address(raw)
    (port,) = _PORT.unpack_from(data, V2_FIXED + 2 * size)
    return ProxyHeader(2, length, (_host(address), port))


def _host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as the engines write a peer's (an IPv4-mapped IPv6 one as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


#: The shortest v1 headers per family ("PROXY UNKNOWN\r\n" is the shortest of all).
_V1_SHORTEST = {b"UNKNOWN": 15, b"TCP4": 32, b"TCP6": 22}


def header_wanted(data: bytes | bytearray) -> int:
    """How many bytes may be read after ``data``, an incomplete header (as
    :func:`parse_header` says), without reading past the header's end: at least 1."""
    if data[:1] == V2_SIGNATURE[:1]:
        if len(data) < V2_FIXED:
            return V2_FIXED - len(data)
        payload = int.from_bytes(data[V2_FIXED - 2 : V2_FIXED], "big")
        return max(V2_FIXED + payload - len(data), 1)
    # v1, or nothing yet (15 bytes: no header is shorter).  The line ends with CRLF:
    # two more bytes at least, one once the CR has come.
    words = bytes(data[len(V1_PREFIX) :]).split(b" ", 1)
    shortest = _V1_SHORTEST.get(words[0], 15) if len(words) == 2 else 15
    return max(shortest - len(data), 1 if data[-1:] == b"\r" else 2)


# region the gate


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """A listener's PROXY protocol settings."""

    trusted: tuple[IPNetwork, ...]
    timeout: float = HEADER_TIMEOUT


class ProxiedSession(Protocol):
    """What the gate needs of an engine's session (both engines' sessions are)."""

    proxied_peer: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...


class ProxyGate(asyncio.BufferedProtocol):
    """One connection until its PROXY header is read; then the engine's session's.

    ``make_session`` makes the engine's protocol; ``tls_context`` (the SMTPS port) is
    the TLS the session starts with, after the header.  The gate is a buffered protocol
    so that it chooses how much each read takes: never more than the header has left
    (three reads for a v2 header, a few more for v1).
    """

    def __init__(
        self,
        config: ProxyConfig,
        make_session: Callable[[], ProxiedSession],
        *,
        tls_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 60.0,
    ) -> None:
        self._config = config
        self._make_session = make_session
        self._tls_context = tls_context
        self._handshake_timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer: Any = None
        self._balancer = ""
        self._header = bytearray()
        self._buffer = bytearray(V2_FIXED)
        #: During the SMTPS handshake: the session, and what came for it meanwhile.
        self._session: ProxiedSession | None = None
        self._early: list[bytes] = []
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._transport is not None:
            return  # (asyncio's TLS layer, during the SMTPS handshake)
        self._transport = transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        balancer = self._balancer = client_address(self._peer)
        if not in_networks(balancer, self._config.trusted):
            log.warning(
                "PROXY protocol: refusing client=%s: not in ESPRELAY_PROXY_TRUSTED", balancer
            )
            transport.abort()
            return
        self._timer = self._loop.call_later(self._config.timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, why: str) -> None:
        log.warning("PROXY protocol: closing connection from proxy=%s: %s", self._balancer, why)
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse(f"no header within {self._config.timeout:g}s")

    def get_buffer(self, sizehint: int) -> bytearray:
        # After the header, on the SMTPS port: application data that came with the end
        # of the TLS handshake, before the session took over.
        size = 65536 if self._session is not None else header_wanted(self._header)
        if len(self._buffer) != size:
            self._buffer = bytearray(size)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._session is not None:
            self._early.append(bytes(self._buffer[:nbytes]))
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._header += self._buffer[:nbytes]
        try:
            header = parse_header(self._header)
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if header is not None:
            self._hand_over(transport, header)

    def eof_received(self) -> bool:
        if self._session is not None:
            self._early_eof = True
            return True
        self._refuse("connection closed before the header")
        return False

    def _hand_over(self, transport: asyncio.Transport, header: ProxyHeader) -> None:
        self._cancel_timer()
        self._header = bytearray()
        peer = header.source if header.source is not None else self._peer
        log.debug(
            "PROXY protocol v%d: proxy=%s client=%s",
            header.version,
            self._balancer,
            client_address(peer),
        )
        # Not a byte more for the gate (a loop may go on reading after this callback);
        # the session, or start_tls, resumes.
        transport.pause_reading()
        session = self._make_session()
        session.proxied_peer = peer
        if self._tls_context is not None:
            self._session = session
            task = self._loop.create_task(self._start_tls(transport, session, self._tls_context))
            task.add_done_callback(_log_failure)
            return
        transport.set_protocol(cast(asyncio.BaseProtocol, session))
        session.connection_made(transport)
        if not transport.is_closing():
            transport.resume_reading()

    async def _start_tls(
        self, transport: asyncio.Transport, session: ProxiedSession, context: ssl.SSLContext
    ) -> None:
        """The SMTPS port: the TLS handshake after the header, then the session."""
        try:
            secure = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, RuntimeError, ValueError, TimeoutError) as exc:  # SSL errors, resets
            log.info("TLS handshake not completed: closing client=%s (%s)", self._balancer, exc)
            transport.abort()
            return
        if secure is None or secure.is_closing():
            transport.abort()
            return
        secure.set_protocol(cast(asyncio.BaseProtocol, session))
        session.connection_made(secure)
        early, self._early = self._early, []
        for data in early:
            if not secure.is_closing():
                session.data_received(data)
        if self._early_eof and not secure.is_closing():
            session.eof_received()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("PROXY protocol: session start failed", exc_info=task.exception())


def gated(
    config: ProxyConfig,
    make_session: Callable[[], ProxiedSession],
    *,
    tls_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 60.0,
) -> Callable[[], ProxyGate]:
    """A protocol factory that puts a :class:`ProxyGate` before ``make_session``."""

    def factory() -> ProxyGate:
        return ProxyGate(
            config, make_session, tls_context=tls_context, handshake_timeout=handshake_timeout
        )

    return factory


# endregion
