"""The PROXY protocol parser and gate (esprelay.smtp.proxy), fuzzed.

The parser must answer every input with a header, "incomplete" (None) or
ProxyHeaderError, quickly; the gate, on a real loopback socket, must hand a connection
with a valid header to the session with the header's client and exactly the bytes that
follow it, and close every other connection (with a log line), never raising.
tests/test_e2e_proxy.py runs both engines behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from typing import Any, cast

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from esprelay.smtp.proxy import (
    V1_MAX,
    V2_FIXED,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyConfig,
    ProxyHeader,
    ProxyHeaderError,
    gated,
    header_wanted,
    parse_header,
)


def v2(
    command: int = 1,
    family: int = 1,
    transport: int = 1,
    addresses: bytes | None = None,
    tlv: bytes = b"",
    length: int | None = None,
    version: int = 2,
) -> bytes:
    if addresses is None:
        addresses = v2_ipv4("192.0.2.10", 5555)
    payload = addresses + tlv
    size = len(payload) if length is None else length
    fields = struct.pack("!BBH", version << 4 | command, family << 4 | transport, size)
    return V2_SIGNATURE + fields + payload


def v2_ipv4(source: str, port: int, dest: str = "10.0.0.1", dport: int = 25) -> bytes:
    return (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(dest).packed
        + struct.pack("!HH", port, dport)
    )


def v2_ipv6(source: str, port: int, dest: str = "2001:db8::1", dport: int = 25) -> bytes:
    return (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(dest).packed
        + struct.pack("!HH", port, dport)
    )


VALID = [
    pytest.param(b"PROXY TCP4 192.0.2.10 10.0.0.1 5555 25\r\n", ("192.0.2.10", 5555), id="v1-tcp4"),
    pytest.param(b"PROXY TCP6 2001:db8::5 2001:db8::1 0 587\r\n", ("2001:db8::5", 0), id="v1-tcp6"),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.9 ::1 65535 25\r\n", ("192.0.2.9", 65535), id="v1-mapped"
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", None, id="v1-unknown"),
    pytest.param(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, id="v1-unknown-with-rest"),
    pytest.param(v2(), ("192.0.2.10", 5555), id="v2-ipv4"),
    pytest.param(
        v2(family=2, addresses=v2_ipv6("2001:db8::7", 1)), ("2001:db8::7", 1), id="v2-ipv6"
    ),
    pytest.param(v2(tlv=b"\x04\x00\x03abc\xea\x00\x04vpce"), ("192.0.2.10", 5555), id="v2-tlvs"),
    pytest.param(v2(command=0), None, id="v2-local"),
    pytest.param(v2(command=0, family=0, transport=0, addresses=b""), None, id="v2-local-empty"),
    pytest.param(v2(family=0, transport=0, addresses=b""), None, id="v2-unspec"),
    pytest.param(v2(family=3, addresses=b"\0" * 216), None, id="v2-unix"),
]


@pytest.mark.parametrize(("header", "source"), VALID)
def test_valid_headers(header: bytes, source: tuple[str, int] | None) -> None:
    parsed = parse_header(header + b"EHLO after\r\n")
    assert parsed == ProxyHeader(2 if header[:1] == b"\r" else 1, len(header), source)


@pytest.mark.parametrize(("header", "source"), VALID)
def test_every_prefix_of_a_header_is_incomplete(header: bytes, source: object) -> None:
    for end in range(len(header)):
        assert parse_header(header[:end]) is None, header[:end]


MALFORMED = [
    pytest.param(b"EHLO client.example\r\n", id="smtp-instead"),
    pytest.param(b"proxy TCP4 192.0.2.1 10.0.0.1 1 2\r\n", id="lower-case"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 1_0 2\r\n", id="port-underscore"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 +1 2\r\n", id="port-sign"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 080 2\r\n", id="port-leading-zero"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 65536 2\r\n", id="port-too-big"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 \xff\r\n", id="port-not-ascii"),
    pytest.param(b"PROXY TCP4 192.0.02.1 10.0.0.1 1 2\r\n", id="ipv4-leading-zero"),
    pytest.param(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n", id="ipv6-in-tcp4"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", id="ipv6-zone"),
    pytest.param(b"PROXY TCP4 192.0.2.1  10.0.0.1 1 2\r\n", id="double-space"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2 3\r\n", id="extra-field"),
    pytest.param(b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\n", id="bare-lf"),
    pytest.param(b"PROXY TCP5 192.0.2.1 10.0.0.1 1 2\r\n", id="family"),
    pytest.param(b"PROXY \r\n", id="empty"),
    pytest.param(b"PROXY UNKNOWN" + b" " * V1_MAX, id="v1-too-long"),
    pytest.param(v2(version=1), id="v2-version-1"),
    pytest.param(v2(command=2), id="v2-command"),
    pytest.param(v2(family=4), id="v2-family"),
    pytest.param(v2(transport=3), id="v2-transport"),
    pytest.param(v2(length=V2_MAX_PAYLOAD + 1), id="v2-too-long"),
    pytest.param(v2(length=0xFFFF), id="v2-huge"),
    pytest.param(v2(addresses=b"\x01\x02\x03\x04"), id="v2-ipv4-short"),
    pytest.param(v2(family=2, addresses=v2_ipv4("192.0.2.1", 1)), id="v2-ipv6-short"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIT!", id="v2-signature"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_headers(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(data + b"\r\n" * 40)


# region fuzz: the parser

HEADERS = st.sampled_from([p.values[0] for p in VALID])
SETTINGS = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])


def _parse(data: bytes) -> ProxyHeader | None:
    """parse_header, which may only raise ProxyHeaderError (checked by the caller)."""
    result = parse_header(data)
    if result is not None:
        assert 0 < result.length <= len(data)
        assert result.length <= max(V1_MAX, V2_FIXED + V2_MAX_PAYLOAD)
    return result


def _any_outcome(data: bytes) -> ProxyHeader | None:
    try:
        return _parse(data)
    except ProxyHeaderError:
        return None


@SETTINGS
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _any_outcome(data)


@SETTINGS
@given(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]), st.binary())
@example(V2_SIGNATURE, b"\x21\x11\x00\x04abcd")
@example(b"PROXY TCP4 ", b"1.2.3.4 5.6.7.8 1_0 2\r\n")
def test_fuzz_random_bytes_after_a_valid_prefix(prefix: bytes, rest: bytes) -> None:
    _any_outcome(prefix + rest)


@SETTINGS
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.binary(max_size=V2_MAX_PAYLOAD + 64),
)
def test_fuzz_v2_fields_and_lengths(byte12: int, byte13: int, length: int, payload: bytes) -> None:
    data = V2_SIGNATURE + struct.pack("!BBH", byte12, byte13, length) + payload
    try:
        result = _parse(data)
    except ProxyHeaderError:
        return
    if length > V2_MAX_PAYLOAD:
        pytest.fail("a length beyond the bound was not refused")
    if result is None:
        assert len(payload) < length
    else:
        assert result.length == V2_FIXED + length


@SETTINGS
@given(HEADERS, st.binary(max_size=200))
def test_fuzz_bytes_after_a_header_are_not_read(header: bytes, rest: bytes) -> None:
    assert _parse(header + rest) == _parse(header)


@SETTINGS
@given(st.binary(max_size=40), HEADERS)
def test_fuzz_bytes_before_a_header_are_refused(junk: bytes, header: bytes) -> None:
    data = junk + header
    outcome = _any_outcome(data)
    if outcome is not None:
        # Only when the junk itself is (the start of) a header.
        assert _any_outcome(data[: outcome.length]) == outcome


@SETTINGS
@given(HEADERS, st.data())
def test_fuzz_truncated_headers_are_incomplete(header: bytes, data: st.DataObject) -> None:
    end = data.draw(st.integers(0, len(header) - 1))
    assert _parse(header[:end]) is None


@SETTINGS
@given(HEADERS, st.data())
def test_fuzz_reads_never_pass_the_end_of_the_header(header: bytes, data: st.DataObject) -> None:
    """The gate reads what header_wanted allows: never a byte of what follows."""
    seen = b""
    reads = 0
    while True:
        wanted = header_wanted(seen)
        assert wanted >= 1
        assert len(seen) + wanted <= len(header), (seen, wanted)
        # The network may give fewer bytes than asked.
        seen += header[len(seen) : len(seen) + data.draw(st.integers(1, wanted))]
        reads += 1
        parsed = _parse(seen)
        if parsed is not None:
            assert parsed.length == len(header) == len(seen)
            break
    assert reads <= len(header)


def test_reads_per_header_are_few() -> None:
    """With the network giving all it is asked for: three reads for v2, a few more for v1."""
    for param in VALID:
        header = param.values[0]
        assert isinstance(header, bytes)
        seen, reads = b"", 0
        while parse_header(seen) is None:
            seen += header[len(seen) : len(seen) + header_wanted(seen)]
            reads += 1
        assert reads <= (3 if header[:1] == b"\r" else 12), (header, reads)


# endregion

# region the gate on a real socket

TRUSTED = ProxyConfig(trusted=(ipaddress.ip_network("127.0.0.1/32"),), timeout=2.0)


class Recorder(asyncio.Protocol):
    """A stand-in session: records its peer and the bytes it gets; at the client's EOF
    it writes them back and closes."""

    proxied_peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        host, port = self.proxied_peer
        reply = f"{host} {port} ".encode() + self.data.hex().encode()
        transport = cast(asyncio.Transport, self.transport)  # (uvloop's is not registered)
        transport.write(reply)
        transport.close()
        return True


async def _through_gate(data: bytes, config: ProxyConfig = TRUSTED) -> tuple[bytes, list[Any]]:
    """What the client reads back after sending ``data`` and its EOF; the loop's errors."""
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    server = await loop.create_server(gated(config, Recorder), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 10)
        except (ConnectionError, OSError):
            answer = b""
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return answer, errors


@pytest.mark.parametrize(("header", "source"), VALID)
async def test_gate_hands_over_the_client_and_the_bytes_after_the_header(
    header: bytes, source: tuple[str, int] | None
) -> None:
    answer, errors = await _through_gate(header + b"EHLO x\r\n")
    host, port, rest = answer.split(b" ")
    if source is None:
        assert host == b"127.0.0.1" and int(port) > 0  # the balancer itself
    else:
        assert (host.decode(), int(port)) == source
    assert bytes.fromhex(rest.decode()) == b"EHLO x\r\n"
    assert errors == []


async def test_gate_refuses_a_peer_outside_the_trusted_networks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ProxyConfig(trusted=(ipaddress.ip_network("192.0.2.0/24"),))
    with caplog.at_level(logging.WARNING, "esprelay.smtp"):
        answer, errors = await _through_gate(b"PROXY TCP4 192.0.2.10 10.0.0.1 1 25\r\n", config)
    assert answer == b""
    assert "refusing client=127.0.0.1: not in ESPRELAY_PROXY_TRUSTED" in caplog.text
    assert errors == []


async def test_gate_closes_a_connection_without_header_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ProxyConfig(trusted=TRUSTED.trusted, timeout=0.2)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(gated(config, Recorder), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with caplog.at_level(logging.WARNING, "esprelay.smtp"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 192.0")  # and then nothing
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    server.close()
    await server.wait_closed()
    assert "no header within 0.2s" in caplog.text


def _expected(data: bytes) -> tuple[ProxyHeader | None, bool]:
    """(the header, whether it is refused) as the parser sees ``data``."""
    try:
        return parse_header(data), False
    except ProxyHeaderError:
        return None, True


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(HEADERS, st.binary(max_size=100)).map(lambda t: t[0] + t[1]),
        st.tuples(st.binary(max_size=20), HEADERS).map(lambda t: t[0] + t[1]),
        st.tuples(HEADERS, st.data()).map(lambda t: t[0][: t[1].draw(st.integers(0, len(t[0])))]),
    )
)
def test_fuzz_gate(loop: str, data: bytes) -> None:
    """Whatever a trusted balancer sends: handed over with the bytes after the header,
    or closed; never an error in the loop, never a hang (the client's EOF ends it)."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        answer, errors = runner.run(_through_gate(data))
    assert errors == []
    header, _ = _expected(data)
    if header is None:
        assert answer == b""
        return
    host, _port, rest = answer.split(b" ")
    if header.source is not None:
        assert host.decode() == header.source[0]
    assert bytes.fromhex(rest.decode()) == data[header.length :]


# endregion
