"""Header repair for legacy devices: only what is missing or broken changes."""

from __future__ import annotations

import email.policy
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.message.header import read_header as parse_header
from esprelay.message.repair import normalize_line_endings, repair_message
from esprelay.message.sender import sent_as
from tests.relayproc import RelayProcess
from tests.securitykit import crlf, smtp_client, spool_show

NOW = datetime(2026, 11, 28, 1, 2, 3, tzinfo=UTC)
COMPLETE = crlf(
    "Date: Sat, 28 Nov 2026 01:00:00 +0000\nMessage-ID: <1@example.com>\n"
    "From: App <app@example.com>\nTo: b@example.org\nSubject: ok\n\nbody\n"
)


def repair(raw: bytes, **kw: object) -> bytes:
    options: dict[str, object] = {"mail_from": "dev@example.com", "hostname": "relay.example"}
    options.update(kw)
    return repair_message(raw, now=NOW, **options).raw  # type: ignore[arg-type]


def test_complete_message_untouched() -> None:
    result = repair_message(COMPLETE, mail_from="x@example.com", hostname="h.example")
    assert result.raw is COMPLETE and result.changes == ()


def test_missing_headers_are_prepended() -> None:
    raw = crlf("To: b@example.org\nSubject: scan\n\n%PDF-1.4 body\n")
    fixed = repair(raw)
    assert fixed.endswith(raw)
    added = fixed[: -len(raw)].decode()
    assert added.startswith("Date: Sat, 28 Nov 2026 01:02:03 +0000\r\nMessage-ID: <")
    assert "@relay.example>\r\n" in added and added.endswith("From: dev@example.com\r\n")
    parsed = BytesParser(policy=email.policy.default).parsebytes(fixed)
    assert parsed["From"] == "dev@example.com" and parsed["Date"].datetime == NOW


def test_message_without_any_header_gets_a_separator() -> None:
    raw = b"just a body line\r\nand another: with a colon\r\n"
    fixed = repair(raw)
    assert fixed.endswith(b"\r\n\r\n" + raw)
    assert {f.name for f in parse_header(fixed).fields} == {b"date", b"message-id", b"from"}


def test_empty_header_section() -> None:
    raw = b"\r\nbody\r\n"
    fixed = repair(raw)
    assert fixed.endswith(b"From: dev@example.com\r\n" + raw)


def test_null_sender_adds_no_from() -> None:
    raw = crlf("Date: x\nMessage-ID: <a@b>\nSubject: dsn\n\nx\n")
    assert repair(raw, mail_from="") == raw


@pytest.mark.parametrize(
    ("line", "fixed"),
    [
        ("From: a@example.com <a@example.com>", "From: a@example.com"),
        ("From: A@Example.com  <a@example.com>", "From: a@example.com"),
        (
            "From: scanner@example.com <printer@example.com>",
            'From: "scanner@example.com" <printer@example.com>',
        ),
        ("From: a@example.com\n <a@example.com>", "From: a@example.com"),
    ],
)
def test_address_as_display_name_normalised(line: str, fixed: str) -> None:
    head = "Date: x\nMessage-ID: <a@b>\n"
    raw = crlf(f"{head}{line}\nSubject: s\n\nbody\n")
    assert repair(raw) == crlf(f"{head}{fixed}\nSubject: s\n\nbody\n")


@pytest.mark.parametrize(
    "line", ["From: A <a@example.com>", "From: a@example.com", 'From: "a@b" <a@example.com>']
)
def test_good_from_untouched(line: str) -> None:
    raw = crlf(f"Date: x\nMessage-ID: <a@b>\n{line}\n\nbody\n")
    assert repair(raw) is raw or repair(raw) == raw


def test_force_from_keeps_name_and_moves_original_to_reply_to() -> None:
    raw = crlf(
        "Date: x\nMessage-ID: <a@b>\n"
        "From: Scanner 3rd floor\n <scan@printer.local>\nSubject: s\n\nb\n"
    )
    fixed = repair(raw, force_from="relay@example.com")
    assert fixed == crlf(
        "Date: x\nMessage-ID: <a@b>\nFrom: Scanner 3rd floor <relay@example.com>\n"
        "Reply-To: Scanner 3rd floor\n <scan@printer.local>\nSubject: s\n\nb\n"
    )


def test_force_from_keeps_an_existing_reply_to() -> None:
    raw = crlf("Reply-To: desk@example.com\nFrom: a@printer.local\n\nb\n")
    fixed = repair(raw, force_from="relay@example.com", repair=False)
    assert fixed == crlf("Reply-To: desk@example.com\nFrom: relay@example.com\n\nb\n")


def test_force_from_without_from() -> None:
    fixed = repair(crlf("Subject: s\n\nb\n"), force_from="relay@example.com", repair=False)
    assert fixed == crlf("From: relay@example.com\nReply-To: dev@example.com\nSubject: s\n\nb\n")


def test_force_from_already_right_is_untouched() -> None:
    raw = crlf("From: Relay <RELAY@example.com>\n\nb\n")
    assert repair(raw, force_from="relay@example.com", repair=False) == raw


def test_from_addresses() -> None:
    assert sent_as(crlf("From: A <a@x.example>, b@y.example\n\n")).from_ == (
        "a@x.example",
        "b@y.example",
    )
    assert not sent_as(crlf("Subject: none\n\n")).has_from_field
    none = sent_as(crlf("From: not an address\n\n"))
    assert none.has_from_field and none.from_ == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\nb"),
        (b"a\n\rb", b"a\r\n\r\nb"),
    ],
)
def test_normalize_line_endings(raw: bytes, expected: bytes) -> None:
    assert normalize_line_endings(raw) == expected


def only_crlf(data: bytes) -> bool:
    n = data.count(b"\r\n")
    return data.count(b"\r") == n and data.count(b"\n") == n


header_line = st.one_of(
    st.sampled_from(
        [
            b"From: a@example.com <a@example.com>",
            b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.com>",
            b"From: \xc3\xbc@\xc3\xa4.example <x@y>",
            b"From:",
            b"from: <>",
            b"Date: Sat, 28 Nov 2026 01:00:00 +0000",
            b"Message-ID: <x@y>",
            b"Reply-To: r@example.com",
            b" folded continuation",
            b"\tfolded",
            b"Subject: \xff\xfe binary",
            b"not a header line",
            b"",
        ]
    ),
    st.binary(max_size=60),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(header_line, max_size=12),
    body=st.binary(max_size=200),
    sep=st.sampled_from([b"\r\n", b"\n", b"\r"]),
    force=st.sampled_from([None, "relay@example.com"]),
    repair_on=st.booleans(),
    mail_from=st.sampled_from(["", "dev@example.com", "\udcff@x"]),
)
def test_fuzz_repair_never_crashes_or_loses_the_body(
    lines: list[bytes],
    body: bytes,
    sep: bytes,
    force: str | None,
    repair_on: bool,
    mail_from: str,
) -> None:
    raw = normalize_line_endings(sep.join(lines) + sep + sep + body)
    assert only_crlf(raw)
    assert normalize_line_endings(raw) is raw  # idempotent
    result = repair_message(
        raw, mail_from=mail_from, hostname="relay.example", repair=repair_on, force_from=force
    )
    header = parse_header(raw)
    # Everything after the header fields, the body above all, is kept byte for byte.
    assert result.raw.endswith(raw[header.end :])
    if not result.changes:
        assert result.raw is raw
    fixed = parse_header(result.raw)
    names = [f.name for f in fixed.fields]
    if repair_on:
        assert b"date" in names and b"message-id" in names
    if force is not None:
        assert sent_as(result.raw).has_from_field
    parsed = BytesParser(policy=email.policy.default).parsebytes(result.raw)
    assert parsed is not None
    str(parsed.get("From", ""))  # the header parser copes with what we wrote
    sent_as(result.raw)


# --- end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def repairing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    relay = RelayProcess(
        tmp_path_factory.mktemp("repair"),
        {"ESPRELAY_REPAIR_HEADERS": "true", "ESPRELAY_HOSTNAME": "relay.example"},
    ).start()
    yield relay
    relay.kill()


def send(relay: RelayProcess, raw: bytes, sender: str = "scanner@example.com") -> str:
    with smtp_client(relay) as smtp:
        smtp.ehlo("printer")
        assert smtp.mail(sender, ["BODY=8BITMIME"])[0] == 250
        assert smtp.rcpt("office@example.org")[0] == 250
        code, reply = smtp.data(raw)
    assert code == 250, reply
    message_id = reply.decode().rsplit(" ", 1)[1]
    relay.wait_for_log(rf"delivered id={message_id}")
    return message_id


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(COMPLETE, id="plain"),
        pytest.param(
            COMPLETE.replace(b"body\r\n", "Grüße ½ €\r\n".encode("latin-1", "replace"))
            + b"\x80\xff high bytes\r\n",
            id="8bit",
        ),
        pytest.param(
            COMPLETE + b".leading dot\r\n..two\r\n" + b"x" * 5000 + b"\r\n", id="dots-long"
        ),
        pytest.param(
            crlf("date: x\nmessage-id: <a@b>\nfrom: a@example.com\n\nlower-case names\n"),
            id="lower-case-names",
        ),
    ],
)
def test_complete_messages_stay_byte_identical(repairing: RelayProcess, raw: bytes) -> None:
    message_id = send(repairing, raw)
    assert (repairing.outbox / f"{message_id}.eml").read_bytes() == raw
    assert "repairs" not in spool_show(repairing, message_id)["meta"]  # type: ignore[operator]


def test_legacy_printer_message_repaired(repairing: RelayProcess) -> None:
    body = b"%PDF-1.4\r\n" + bytes(range(32, 127)) * 20 + b"\r\n"
    raw = b"To: office@example.org\r\nSubject: Scan\r\n\r\n" + body
    message_id = send(repairing, raw)
    eml = (repairing.outbox / f"{message_id}.eml").read_bytes()
    assert eml.endswith(raw)
    parsed = BytesParser(policy=email.policy.default).parsebytes(eml)
    assert parsed["From"] == "scanner@example.com"
    assert parsed["Message-ID"].endswith("@relay.example>")
    assert parsed["Date"].datetime is not None
    meta = spool_show(repairing, message_id)["meta"]
    assert meta["repairs"] == ["added Date", "added Message-ID", "added From"]  # type: ignore[index]
    record = json.loads((repairing.outbox / f"{message_id}.json").read_text())
    assert record["mail_from"] == "scanner@example.com"


def test_broken_from_normalised_end_to_end(repairing: RelayProcess) -> None:
    raw = COMPLETE.replace(
        b"From: App <app@example.com>", b"From: app@example.com <app@example.com>"
    )
    message_id = send(repairing, raw)
    assert (repairing.outbox / f"{message_id}.eml").read_bytes() == COMPLETE.replace(
        b"From: App <app@example.com>", b"From: app@example.com"
    )


def test_force_from_end_to_end(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory(
        {
            "ESPRELAY_FORCE_FROM": "relay@example.com",
            "ESPRELAY_ALLOWED_SENDER_DOMAINS": "example.com",
        }
    ).start()
    # The device's own From is outside the allowed domains, but it is replaced anyway.
    raw = COMPLETE.replace(b"<app@example.com>", b"<scan@printer.local>")
    message_id = send(relay, raw, sender="scanner@example.com")
    eml = (relay.outbox / f"{message_id}.eml").read_bytes()
    assert eml == raw.replace(
        b"From: App <scan@printer.local>\r\n",
        b"From: App <relay@example.com>\r\nReply-To: App <scan@printer.local>\r\n",
    )


def test_added_date_is_this_second() -> None:
    from email.utils import parsedate_to_datetime

    before = time.time()
    result = repair_message(b"Subject: x\r\n\r\nbody\r\n", mail_from="a@example.com", hostname="h")
    after = time.time()
    line = next(x for x in result.raw.split(b"\r\n") if x.startswith(b"Date: "))
    stamp = parsedate_to_datetime(line[6:].decode()).timestamp()
    assert int(before) <= stamp <= after
