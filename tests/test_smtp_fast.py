"""The intake's shortcuts answer exactly what aiosmtpd's own code answers.

RelaySMTP sets up a session from a per-class cache instead of aiosmtpd's introspection,
parses plain ``<local@domain>`` paths without the email package, and CompactDataSMTP
reads DATA in runs of lines: each is compared with aiosmtpd's own implementation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esprelay.intake import IntakeState
from esprelay.smtp.data import CompactDataSMTP
from esprelay.smtp.handler import RelayHandler, simple_path
from esprelay.smtp.server import RelaySMTP, smtp_factory


class _Intake:
    def __init__(self) -> None:
        self.state = IntakeState()

    async def accept(self, envelope: Any, raw: bytes, client: Any) -> str:
        return "250 2.0.0 Ok: queued as x"


# region session set-up


def _protocol() -> tuple[Any, type[RelaySMTP]]:
    intake = _Intake()
    handler = RelayHandler(intake, max_recipients=10)  # type: ignore[arg-type]
    factory, _ = smtp_factory(
        handler,
        intake.state,
        hostname="relay.test",
        data_size_limit=1000,
        line_length_limit=100,
        timeout=30.0,
        engine="aiosmtpd",
    )
    smtp = factory()
    return smtp.event_handler, type(smtp)


def _comparable(value: Any) -> Any:
    if hasattr(value, "__func__"):  # bound methods: same function, each on its own object
        return ("method", value.__func__)
    if isinstance(value, dict):
        return [(k, _comparable(v)) for k, v in value.items()]
    if isinstance(value, tuple):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, asyncio.StreamReader | asyncio.Future):
        return type(value)
    if type(value).__name__ == "ReferenceType":
        return "weakref"
    return value


async def test_session_setup_matches_aiosmtpd() -> None:
    handler, protocol = _protocol()
    options: dict[str, Any] = {
        "hostname": "relay.test",
        "ident": "esprelay ESMTP",
        "data_size_limit": 1000,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "timeout": 30.0,
        "tls_context": None,
    }
    ours = protocol(handler, **options)
    theirs = protocol.__new__(protocol)
    SMTP.__init__(theirs, handler, **options)
    expected = {k: _comparable(v) for k, v in vars(theirs).items()}
    got = {k: _comparable(v) for k, v in vars(ours).items() if k in expected}
    assert got == expected
    assert list(ours._auth_methods) == list(theirs._auth_methods) == ["LOGIN", "PLAIN"]
    assert [m.is_builtin for m in ours._auth_methods.values()] == [True, True]
    assert ours._ehlo_hook_ver == "new"
    assert set(vars(ours)) - set(vars(theirs)) == {
        "command_size_limits",
        "_counted_client",
        "_refused",
        "_errors",
        "_ends",
        "_junk",
        "_busy",
        "_expired",
        "_lifetime",
    }


async def test_other_options_use_aiosmtpd_setup() -> None:
    handler, protocol = _protocol()
    smtp = protocol(handler, hostname="h", command_call_limit=5)
    assert smtp._enforce_call_limit is True


# endregion

# region MAIL/RCPT paths


class _Limits:
    local_part_limit = 0


def _aiosmtpd_getaddr(arg: str, limit: int = 0) -> Any:
    holder = _Limits()
    holder.local_part_limit = limit
    try:
        return SMTP._getaddr(holder, arg)  # type: ignore[arg-type]
    except Exception as exc:  # the parser raises IndexError on "<", for one
        return type(exc)


def _our_getaddr(arg: str, limit: int = 0) -> Any:
    holder = RelaySMTP.__new__(RelaySMTP)
    holder.local_part_limit = limit
    try:
        return RelaySMTP._getaddr(holder, arg)  # type: ignore[arg-type]
    except Exception as exc:
        return type(exc)


_ATEXT = "aZ09-!#$%&'*+/=?^_`{|}~"
_atom = st.text(st.sampled_from(list(_ATEXT)), min_size=1, max_size=6)
_dot_atom = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_anything = st.text(
    st.sampled_from(list('<>@."()[]:;,\\ \t=?aZ0-!%é\x85\xa0\x00\r\n\udcff~')), max_size=14
)
_after = st.sampled_from(["", " ", "\t", "  ", " (c)", "(c)", "\x85", " \xa0", " =?"])
_paths = st.one_of(
    _anything,
    st.builds(lambda a, b, c, d: f"<{a}@{b}>{c}{d}", _dot_atom, _dot_atom, _after, _anything),
    st.builds(lambda a, b: f"<{a}>{b}", _anything, _after),
    st.builds(lambda a, b: f"<>{a}{b}", _after, _anything),
    st.builds(lambda a, b: f"{a}<{b}", _anything, _anything),
)


@settings(max_examples=3000, suppress_health_check=list(HealthCheck), deadline=None)
@given(_paths, st.sampled_from([0, 3, 64]))
def test_paths_parse_like_aiosmtpd(arg: str, limit: int) -> None:
    assert _our_getaddr(arg, limit) == _aiosmtpd_getaddr(arg, limit)
    fast = simple_path(arg)
    if fast is not None:
        assert fast == _aiosmtpd_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        "<first.last@mail.example.org> SIZE=2048 BODY=8BITMIME",
        "<>",
        "<> SIZE=10",
        "<x+tag@d-1.example>\tSIZE=1",
    ],
)
def test_common_paths_take_the_fast_path(arg: str) -> None:
    assert simple_path(arg) is not None
    assert simple_path(arg) == _aiosmtpd_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    ['<"q"@b.example>', "<@r.example:a@b.example>", "<a@[127.0.0.1]>", "<a@b> (c)", "<a@b", "<"],
)
def test_unusual_paths_go_to_aiosmtpd(arg: str) -> None:
    assert simple_path(arg) is None


# endregion

# region DATA in runs of lines, replies in one write


class _Transport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4000) if name == "peername" else default

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        return "250 stored"


async def _drive(
    cls: type[SMTP], pieces: list[bytes], line_limit: int, size_limit: int | None, **attrs: Any
) -> tuple[bytes, list[bytes]]:
    recorder = _Recorder()
    limited = type("Limited", (cls,), {"line_length_limit": line_limit, **attrs})
    smtp = limited(recorder, hostname="t", data_size_limit=size_limit)
    transport = _Transport(smtp)
    smtp.connection_made(transport)
    for piece in pieces:
        for _ in range(5):
            await asyncio.sleep(0)
        smtp.data_received(piece)
    for _ in range(50):
        await asyncio.sleep(0)
        if transport.closed:
            break
    if not transport.closed:
        transport.close()
        await asyncio.sleep(0)
    return b"".join(transport.written), recorder.messages


_body_lines = st.lists(
    st.one_of(
        st.text(st.sampled_from(list("ab.\r\n")), max_size=8),
        st.sampled_from([".", "..", "...", "x.", ". .", ".\r", "\n."]),
        st.integers(10, 40).map(lambda n: "y" * n),
        st.integers(10, 40).map(lambda n: "z" * n + "."),
    ),
    max_size=12,
)


def _session(lines: list[str], cuts: list[int]) -> list[bytes]:
    body = "".join(line + "\r\n" for line in lines).encode() + b".\r\n"
    stream = (
        b"HELO t\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
        + body
        + b"NOOP\r\nQUIT\r\n"
    )
    pieces, start = [], 0
    for cut in sorted(cuts):
        pieces.append(stream[start : start + cut])
        start += cut
    pieces.append(stream[start:])
    return pieces


_cuts = st.lists(st.integers(1, 60), max_size=6)


@settings(max_examples=300, suppress_health_check=list(HealthCheck), deadline=None)
@given(_body_lines, st.integers(12, 30), st.sampled_from([None, 40, 120]), _cuts)
def test_data_in_runs_reads_like_line_by_line(
    lines: list[str], line_limit: int, size_limit: int | None, cuts: list[int]
) -> None:
    pieces = _session(lines, cuts)

    async def both() -> tuple[Any, Any]:
        runs = await _drive(CompactDataSMTP, pieces, line_limit, size_limit)
        by_line = await _drive(CompactDataSMTP, pieces, line_limit, size_limit, read_runs=False)
        return runs, by_line

    runs, by_line = asyncio.run(both())
    assert runs == by_line


@settings(max_examples=200, suppress_health_check=list(HealthCheck), deadline=None)
@given(_body_lines, st.sampled_from([None, 40, 120]), _cuts)
def test_data_reads_like_aiosmtpd(
    lines: list[str], size_limit: int | None, cuts: list[int]
) -> None:
    # Lines within the limit: CompactDataSMTP's line-by-line reading differs from
    # aiosmtpd's for a line of limit + 1 or + 2 bytes (CRLF included), accepted by ours.
    pieces = _session(lines, cuts)

    async def both() -> tuple[Any, Any]:
        ours = await _drive(CompactDataSMTP, pieces, 60, size_limit)
        theirs = await _drive(SMTP, pieces, 60, size_limit)
        return ours, theirs

    ours, theirs = asyncio.run(both())
    assert ours == theirs


async def test_ehlo_reply_is_one_write() -> None:
    handler, protocol = _protocol()
    smtp = protocol(
        handler, hostname="relay.test", data_size_limit=1000, enable_SMTPUTF8=True, timeout=30.0
    )
    transport = _Transport(smtp)
    smtp.connection_made(transport)
    await asyncio.sleep(0)
    smtp.data_received(b"EHLO client.test\r\n")
    for _ in range(10):
        await asyncio.sleep(0)
    assert transport.written[1:] == [
        b"250-relay.test\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        b"250-PIPELINING\r\n250 HELP\r\n"
    ]
    transport.close()
    await asyncio.sleep(0)


# endregion
