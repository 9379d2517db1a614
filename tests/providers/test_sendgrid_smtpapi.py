"""SendGrid's X-SMTPAPI header: each instruction becomes its v3 Mail Send field and the
header is never sent on, against the fake SendGrid that checks those fields as the v3
spec documents them; a malformed header is refused at the end of DATA, end to end
through a real relay."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import MessageRejected
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import sendgrid as sendgrid_module
from esprelay.providers.sendgrid import (
    MAX_SCHEDULE_AHEAD,
    SendGridProvider,
    read_smtpapi,
)
from esprelay.testing.fakeesp import FakeESP
from tests.providers.test_sendgrid import KEY, SendGridAPI, relay_env, validate, validate_fields
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

TOP = b"From: App <app@example.com>\r\nTo: ops@example.org\r\nSubject: hello\r\n"
BOTTOM = b"X-Custom: kept\r\nContent-Type: text/plain\r\n\r\nHello, X-SMTPAPI: body\r\n"
RCPTS = ("ops@example.org",)
#: A fixed clock for the pure tests: send_at is checked against it.
NOW = 1_800_000_000


def message_with(smtpapi: bytes) -> bytes:
    return TOP + smtpapi + BOTTOM


def header(value: Any) -> bytes:
    """An X-SMTPAPI field as SendGrid's libraries write it: json.dumps, \\u escapes."""
    return b"X-SMTPAPI: " + json.dumps(value).encode() + b"\r\n"


def provider(client: httpx.AsyncClient, url: str) -> SendGridProvider:
    return SendGridProvider(client, SecretStr(KEY), url)


async def send(esp: FakeESP, raw: bytes, rcpts: tuple[str, ...] = RCPTS) -> dict[str, Any]:
    message = OutboundMessage("m1", Envelope("app@example.com", rcpts), raw)
    async with httpx.AsyncClient() as client:
        sg = provider(client, esp.url)
        assert sg.refusal(message) is None
        result = await sg.send(message)
    assert result.provider_message_id
    return unstamped(esp.requests[-1].json())


def unstamped(payload: dict[str, Any], ours: str = "m1") -> dict[str, Any]:
    """``payload`` without esprelay's id, which every personalization carries as the
    last custom argument (the stamp itself: tests/providers/test_stamp.py)."""
    for personalization in payload["personalizations"]:
        args = personalization["custom_args"]
        assert list(args.items())[-1] == ("esprelay_id", ours)
        del args["esprelay_id"]
        if not args:
            del personalization["custom_args"]
    return payload


@pytest.fixture(scope="module")
def esp() -> Iterator[FakeESP]:
    with FakeESP(SendGridAPI()) as fake:
        yield fake


def without_smtpapi() -> dict[str, Any]:
    """The request as built for the same message with no X-SMTPAPI header."""
    return {
        "personalizations": [{"to": [{"email": "ops@example.org"}]}],
        "from": {"email": "app@example.com", "name": "App"},
        "subject": "hello",
        "content": [{"type": "text/plain", "value": "Hello, X-SMTPAPI: body\r\n"}],
        "headers": {"X-Custom": "kept"},
    }


# -- each instruction, against the fake ----------------------------------------------

SOON = int(time.time()) + 3600
LATE = int(time.time()) + MAX_SCHEDULE_AHEAD + 600

CASES = [
    pytest.param({"category": "newuser"}, {"categories": ["newuser"]}, {}, id="category-string"),
    pytest.param(
        {"category": ["Orders", "Weekly Newsletter", "Orders"]},
        {"categories": ["Orders", "Weekly Newsletter"]},
        {},
        id="category-list-repeats-merged",
    ),
    pytest.param(
        {"category": [f"c{i}" for i in range(10)]},
        {"categories": [f"c{i}" for i in range(10)]},
        {},
        id="ten-categories",
    ),
    pytest.param(
        {"unique_args": {"orderNumber": "12345", "eventID": 6789, "vip": True, "ratio": 0.5}},
        {},
        {"custom_args": {"orderNumber": "12345", "eventID": "6789", "vip": "true", "ratio": "0.5"}},
        id="unique-args-scalars-as-strings",
    ),
    pytest.param(
        {"unique_args": {"name": "Jürgen 😀"}},
        {},
        {"custom_args": {"name": "Jürgen 😀"}},
        id="unique-args-unicode-escapes",
    ),
    pytest.param(
        {"sub": {"-name-": ["Ben"], "-role-": "buyer"}},
        {},
        {"substitutions": {"-name-": "Ben", "-role-": "buyer"}},
        id="sub-one-value",
    ),
    pytest.param({"send_at": SOON}, {"send_at": SOON}, {}, id="send-at"),
    pytest.param({"batch_id": "HkJ5yLYULb7R"}, {"batch_id": "HkJ5yLYULb7R"}, {}, id="batch-id"),
    pytest.param({"asm_group_id": 1}, {"asm": {"group_id": 1}}, {}, id="asm-group"),
    pytest.param(
        {"asm_group_id": 1, "asm_groups_to_display": [1, 2, 3]},
        {"asm": {"group_id": 1, "groups_to_display": [1, 2, 3]}},
        {},
        id="asm-groups-to-display",
    ),
    pytest.param(
        {"ip_pool": "transactional email"},
        {"ip_pool_name": "transactional email"},
        {},
        id="ip-pool",
    ),
    pytest.param(
        {"filters": {"clicktrack": {"settings": {"enable": 1, "enable_text": False}}}},
        {"tracking_settings": {"click_tracking": {"enable": True, "enable_text": False}}},
        {},
        id="filter-clicktrack",
    ),
    pytest.param(
        {"filters": {"opentrack": {"settings": {"enable": "1", "replace": "%open%"}}}},
        {"tracking_settings": {"open_tracking": {"enable": True, "substitution_tag": "%open%"}}},
        {},
        id="filter-opentrack-string-switch",
    ),
    pytest.param(
        {
            "filters": {
                "subscriptiontrack": {
                    "settings": {
                        "enable": 1,
                        "text/html": "Unsubscribe <% here %>",
                        "text/plain": "Unsubscribe: <% %>",
                        "replace": "[unsubscribe]",
                    }
                }
            }
        },
        {
            "tracking_settings": {
                "subscription_tracking": {
                    "enable": True,
                    "html": "Unsubscribe <% here %>",
                    "text": "Unsubscribe: <% %>",
                    "substitution_tag": "[unsubscribe]",
                }
            }
        },
        {},
        id="filter-subscriptiontrack",
    ),
    pytest.param(
        {"filters": {"ganalytics": {"settings": {"enable": 1, "utm_source": "Email"}}}},
        {"tracking_settings": {"ganalytics": {"enable": True, "utm_source": "Email"}}},
        {},
        id="filter-ganalytics",
    ),
    pytest.param(
        {"filters": {"footer": {"settings": {"enable": 0, "text/plain": "Bye"}}}},
        {"mail_settings": {"footer": {"enable": False, "text": "Bye"}}},
        {},
        id="filter-footer",
    ),
    pytest.param(
        {"filters": {"bypass_list_management": {"settings": {"enable": 1}}}},
        {"mail_settings": {"bypass_list_management": {"enable": True}}},
        {},
        id="filter-bypass-list-management",
    ),
    pytest.param(
        {"filters": {"templates": {"settings": {"enable": 1, "template_id": "5997fcf6"}}}},
        {"template_id": "5997fcf6"},
        {},
        id="filter-templates",
    ),
    pytest.param(
        {"filters": {"templates": {"settings": {"enable": 0, "template_id": "5997fcf6"}}}},
        {},
        {},
        id="filter-templates-disabled",
    ),
    pytest.param({}, {}, {}, id="empty-object"),
]


@pytest.mark.parametrize(("api", "fields", "personalization"), CASES)
async def test_instruction_becomes_its_field(
    esp: FakeESP, api: dict[str, Any], fields: dict[str, Any], personalization: dict[str, Any]
) -> None:
    payload = await send(esp, message_with(header(api)))
    expected = without_smtpapi()
    expected["personalizations"][0].update(personalization)
    expected.update(fields)
    assert payload == expected  # the header is gone, everything else as without it


async def test_everything_at_once_folded_as_old_sendgrid_examples_fold(esp: FakeESP) -> None:
    """Folded at token boundaries over several lines (SendGrid's old Python example
    wraps the JSON with textwrap), unicode escapes, all keys together."""
    api = {
        "category": ["Orders"],
        "unique_args": {"orderNumber": "12345", "city": "Z\u00fcrich"},
        "send_at": SOON,
        "asm_group_id": 7,
        "ip_pool": "pool-1",
        "filters": {"opentrack": {"settings": {"enable": 0}}},
    }
    text = json.dumps(api).replace(", ", ",\r\n  ").replace(": {", ":\r\n\t{")
    assert text.count("\r\n") > 4 and "\\u00fc" in text
    payload = await send(esp, message_with(b"X-SMTPAPI: " + text.encode() + b"\r\n"))
    assert payload["categories"] == ["Orders"]
    assert payload["personalizations"][0]["custom_args"] == {
        "orderNumber": "12345",
        "city": "Zürich",
    }
    assert payload["send_at"] == SOON
    assert payload["asm"] == {"group_id": 7}
    assert payload["ip_pool_name"] == "pool-1"
    assert payload["tracking_settings"] == {"open_tracking": {"enable": False}}
    assert payload["headers"] == {"X-Custom": "kept"}


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b'X-SMTPAPI: {"unique_args": {"city": "Z\xc3\xbcrich"}}\r\n', id="raw-utf8"),
        pytest.param(  # Python's email package with policy.default, non-ASCII JSON
            b"X-SMTPAPI: =?utf-8?q?=7B=22unique=5Fargs=22=3A_=7B=22city=22=3A_=22Z=C3=BCrich?=\r\n"
            b" =?utf-8?q?=22=7D=7D?=\r\n",
            id="encoded-words",
        ),
        pytest.param(b'X-SMTPAPI: {"unique_args": {"city": "Z\\u00fcrich"}}\r\n', id="escapes"),
    ],
)
async def test_non_ascii_text_however_written(esp: FakeESP, field: bytes) -> None:
    payload = await send(esp, message_with(field))
    assert payload["personalizations"][0]["custom_args"] == {"city": "Zürich"}
    assert payload["headers"] == {"X-Custom": "kept"}


async def test_first_header_counts_as_for_sendgrid(esp: FakeESP) -> None:
    raw = message_with(header({"category": "first"}) + b"X-SMTPAPI: not even json\r\n")
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    async with httpx.AsyncClient() as client:
        sg = provider(client, esp.url)
        assert sg.refusal(message) is None
        result = await sg.send(message)
    assert result.warnings == ("2 X-SMTPAPI headers: the first is used, as SendGrid does",)
    payload = esp.requests[-1].json()
    assert payload["categories"] == ["first"]
    assert "X-SMTPAPI" not in json.dumps(payload["headers"])


async def test_every_personalization_gets_the_arguments(esp: FakeESP) -> None:
    """Only blind recipients: one personalization each, each with the custom_args."""
    raw = (
        b"From: app@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: x\r\n"
        + header({"unique_args": {"id": "42"}, "sub": {"-x-": "y"}})
        + b"\r\nhi\r\n"
    )
    payload = await send(esp, raw, ("a@example.org", "b@example.org"))
    assert payload["personalizations"] == [
        {"to": [{"email": box}], "custom_args": {"id": "42"}, "substitutions": {"-x-": "y"}}
        for box in ("a@example.org", "b@example.org")
    ]


async def test_retired_filters_are_not_applied_with_a_warning(esp: FakeESP) -> None:
    raw = message_with(
        header({"filters": {"bcc": {"settings": {"enable": 1, "email": "x@example.net"}}}})
    )
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    async with httpx.AsyncClient() as client:
        result = await provider(client, esp.url).send(message)
    assert result.warnings == ("X-SMTPAPI filter 'bcc' was retired by SendGrid: not applied",)
    assert unstamped(esp.requests[-1].json()) == without_smtpapi()


# -- malformed headers: refused, never dropped ---------------------------------------

MALFORMED = [
    pytest.param(b"X-SMTPAPI: {category: 1}\r\n", "X-SMTPAPI: not valid JSON", id="not-json"),
    pytest.param(b"X-SMTPAPI: \r\n", "X-SMTPAPI: not valid JSON", id="empty"),
    pytest.param(b'X-SMTPAPI: {"send_at": NaN}\r\n', "not valid JSON", id="nan"),
    pytest.param(b'X-SMTPAPI: ["newuser"]\r\n', "X-SMTPAPI: not a JSON object", id="list"),
    pytest.param(b"X-SMTPAPI: " + b"[" * 100_000 + b"\r\n", "X-SMTPAPI: nested too deeply",
                 id="deep-for-the-parser"),
    pytest.param(b"X-SMTPAPI: " + b'{"a":' * 300 + b"1" + b"}" * 300 + b"\r\n",
                 "X-SMTPAPI: nested too deeply", id="deep-for-the-encoder"),
    pytest.param(b'X-SMTPAPI: {"unique_args": {"n": 123456789012345678901234567890}}\r\n',
                 "X-SMTPAPI: an integer over 64 bits", id="integer-over-64-bits"),
    pytest.param(b'X-SMTPAPI: {"send_at": 1e400}\r\n', "not valid JSON", id="infinite"),
    pytest.param(b'X-SMTPAPI: {"category": "caf\xff"}\r\n', "X-SMTPAPI: not UTF-8",
                 id="not-utf8"),
    pytest.param(b'X-SMTPAPI: {"category": "\\ud83d"}\r\n', "not a character",
                 id="lone-surrogate"),
    pytest.param(header({"categroy": "x"}), 'unknown "categroy"', id="unknown-key"),
    pytest.param(header({"to": ["a@example.org"]}), '"to": esprelay sends to the SMTP envelope',
                 id="to"),
    pytest.param(header({"send_each_at": [NOW]}), '"send_each_at": schedules each "to"',
                 id="send-each-at"),
    pytest.param(header({"section": {"%s%": "x"}}), '"section": Mail Send has no sections',
                 id="section"),
    pytest.param(header({"category": 5}), '"category": not a string or a list of strings',
                 id="category-number"),
    pytest.param(header({"category": ["a", None]}), "not a string or a list", id="category-null"),
    pytest.param(header({"category": [f"c{i}" for i in range(11)]}),
                 '"category": 11 categories; SendGrid takes at most 10', id="eleven-categories"),
    pytest.param(header({"category": "x" * 256}), "over 255 characters", id="category-256"),
    pytest.param(header({"category": "café"}), "not printable US-ASCII", id="category-non-ascii"),
    pytest.param(header({"category": "a\tb"}), "not printable US-ASCII", id="category-tab"),
    pytest.param(header({"unique_args": ["a"]}), '"unique_args": not a JSON object',
                 id="unique-args-list"),
    pytest.param(header({"unique_args": {"a": {"b": 1}}}), '"unique_args" "a": not a string',
                 id="unique-args-nested"),
    pytest.param(header({"unique_args": {"a": None}}), "not a string or number",
                 id="unique-args-null"),
    pytest.param(header({"unique_args": {"": "x"}}), "an empty name", id="unique-args-no-name"),
    pytest.param(header({"unique_args": {"a": "x" * 10_000}}),
                 '"unique_args": 10008 bytes; SendGrid takes at most 10000',
                 id="unique-args-over-10000-bytes"),
    pytest.param(header({"sub": {"-n-": ["Ben", "Joe"]}}), "2 values, one per", id="sub-two"),
    pytest.param(header({"sub": {"-n-": []}}), "0 values", id="sub-none"),
    pytest.param(header({"sub": ["x"]}), '"sub": not a JSON object', id="sub-list"),
    pytest.param(header({"send_at": str(NOW)}), '"send_at": not a UNIX timestamp',
                 id="send-at-string"),
    pytest.param(header({"send_at": NOW + 0.5}), "not a UNIX timestamp", id="send-at-float"),
    pytest.param(header({"send_at": LATE}), "more than 72 hours ahead", id="send-at-73h"),
    pytest.param(header({"batch_id": 5}), '"batch_id": not a non-empty string', id="batch-num"),
    pytest.param(header({"asm_group_id": "1"}), '"asm_group_id": not a group id',
                 id="asm-string"),
    pytest.param(header({"asm_group_id": True}), "not a group id", id="asm-bool"),
    pytest.param(header({"asm_groups_to_display": [1]}), 'without "asm_group_id"',
                 id="groups-alone"),
    pytest.param(header({"asm_group_id": 1, "asm_groups_to_display": list(range(1, 27))}),
                 "26 groups; SendGrid displays at most 25", id="groups-26"),
    pytest.param(header({"ip_pool": "p"}), '"ip_pool": not 2 to 64 characters', id="pool-1"),
    pytest.param(header({"ip_pool": "p" * 65}), "not 2 to 64", id="pool-65"),
    pytest.param(header({"ip_pool": 3}), '"ip_pool": not a non-empty string', id="pool-num"),
    pytest.param(header({"filters": []}), '"filters": not a JSON object', id="filters-list"),
    pytest.param(header({"filters": {"ClickTrack": {"settings": {"enable": 1}}}}),
                 "not one of SendGrid's (lowercase) filters", id="filter-uppercase"),
    pytest.param(header({"filters": {"clicktrack": {"enable": 1}}}), 'not {"settings"',
                 id="filter-no-settings"),
    pytest.param(header({"filters": {"clicktrack": {"settings": {"enable": 2}}}}),
                 "'enable' is not 0 or 1", id="filter-enable-2"),
    pytest.param(header({"filters": {"subscriptiontrack": {"settings": {"landing": "x"}}}}),
                 "unknown setting \"landing\"", id="filter-unknown-setting"),
    pytest.param(header({"filters": {"footer": {"settings": {"text/plain": 1}}}}),
                 "'text/plain' is not a string", id="filter-setting-type"),
    pytest.param(header({"filters": {"dkim": {"settings": {"domain": "example.com"}}}}),
                 "filter 'dkim': Mail Send has no per-message DKIM domain", id="filter-dkim"),
    pytest.param(header({"filters": {"template": {"settings": {"enable": 1}}}}),
                 "legacy template app", id="filter-legacy-template"),
    pytest.param(header({"filters": {"templates": {"settings": {"enable": 1}}}}),
                 '"templates.template_id": not a non-empty string', id="templates-no-id"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "reason"), MALFORMED)
def test_malformed_header_is_refused(field: bytes, reason: str) -> None:
    message = OutboundMessage("", Envelope("app@example.com", RCPTS), message_with(field))
    sg = provider(httpx.AsyncClient(), "https://api.sendgrid.com")
    why = sg.refusal(message)
    assert why is not None and reason in why, why
    # A message spooled before the intake refused it fails at once, with the same reason.
    with pytest.raises(MessageRejected) as info:
        sg.build_request(message)
    assert info.value.provider == "sendgrid" and why in str(info.value)


def test_send_at_is_bounded_by_the_clock() -> None:
    raw = message_with(header({"send_at": NOW + MAX_SCHEDULE_AHEAD}))
    api = read_smtpapi(raw, now=NOW)
    assert api is not None and api.fields == {"send_at": NOW + MAX_SCHEDULE_AHEAD}
    assert read_smtpapi(message_with(header({"send_at": NOW - 60})), now=NOW) is not None


def test_common_message_never_reads_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """No X-SMTPAPI: a scan of the header bytes, and neither the header reader nor the
    JSON parser runs, at DATA or at delivery."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("read for a message without X-SMTPAPI")

    monkeypatch.setattr(sendgrid_module, "read_smtpapi", boom)
    raw = message_with(b"X-Mailer: app 1.0\r\n") + b"X-SMTPAPI: in the body\r\n"
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    sg = provider(httpx.AsyncClient(), "https://api.sendgrid.com")
    assert sg.refusal(message) is None
    built = sg.build_request(message)
    assert built.warnings == ()
    payload = json.loads(built.request.read())
    assert payload["headers"] == {"X-Mailer": "app 1.0", "X-Custom": "kept"}


def test_fake_sendgrid_checks_the_fields() -> None:
    """The fake answers 400 where the v3 spec documents a field's type or limits."""
    bad: list[dict[str, Any]] = [
        {"categories": "one"},
        {"categories": [f"c{i}" for i in range(11)]},
        {"categories": ["a", "a"]},
        {"categories": ["x" * 256]},
        {"categories": ["café"]},
        {"send_at": "1800000000"},
        {"send_at": int(time.time()) + 73 * 3600},
        {"custom_args": {"a": "b"}},  # message-level custom_args is a string in the spec
        {"asm": {"groups_to_display": [1]}},
        {"asm": {"group_id": "1"}},
        {"asm": {"group_id": 1, "groups_to_display": list(range(26))}},
        {"ip_pool_name": "p"},
        {"ip_pool_name": "p" * 65},
        {"tracking_settings": {"click_tracking": {"enable": 1}}},
        {"tracking_settings": {"clicktrack": {"enable": True}}},
        {"mail_settings": {"footer": {"enable": True, "text/plain": "x"}}},
        {
            "mail_settings": {
                "bypass_list_management": {"enable": True},
                "bypass_spam_management": {"enable": True},
            }
        },
        {"x-smtpapi": "{}"},
    ]
    base = without_smtpapi()
    for fields in bad:
        assert validate({**base, **fields}), fields
    for personalization in (
        {"custom_args": {"a": 1}},
        {"custom_args": {"a": "x" * 10_000}},
        {"substitutions": {"-a-": ["b"]}},
        {"send_at": "soon"},
        {"sub": {}},
    ):
        payload = without_smtpapi()
        payload["personalizations"][0].update(personalization)
        assert validate(payload), personalization
    assert validate_fields(base) == []
    with FakeESP(SendGridAPI()) as esp, httpx.Client() as client:
        response = client.post(
            f"{esp.url}/v3/mail/send",
            json={**base, "categories": ["a"] * 2},
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert response.status_code == 400 and "categories" in response.text


# -- end to end: refused at DATA, translated on the way out ---------------------------


def test_end_to_end_refused_at_data_and_translated(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(SendGridAPI()) as esp:
        relay = relay_factory(relay_env(esp)).start()
        bad = message_with(header({"category": ["ok"], "unique_args": ["not", "an", "object"]}))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.com")
            smtp.rcpt("ops@example.org")
            code, reply = smtp.data(bad)
        assert (code, reply.decode()) == (
            550,
            '5.6.0 sendgrid: X-SMTPAPI "unique_args": not a JSON object',
        )
        # Nesting deep enough to exhaust a recursive JSON parser, folded into lines a
        # client may send: a refusal like any other, not an error in the intake.
        deep = b"X-SMTPAPI: " + b"\r\n ".join([b"[" * 900] * 60) + b"\r\n"
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.com")
            smtp.rcpt("ops@example.org")
            code, reply = smtp.data(message_with(deep))
        assert (code, reply.decode()) == (550, "5.6.0 sendgrid: X-SMTPAPI: nested too deeply")
        send_at = int(time.time()) + 3600
        good = message_with(
            b"X-SMTPAPI: "
            + json.dumps(
                {
                    "category": ["Orders", "Receipts"],
                    "unique_args": {"orderNumber": "12345", "eventID": 6789},
                    "send_at": send_at,
                    "asm_group_id": 12345,
                    "asm_groups_to_display": [12345],
                    "ip_pool": "transactional email",
                    "filters": {
                        "clicktrack": {"settings": {"enable": 1, "enable_text": False}},
                        "opentrack": {"settings": {"enable": 1, "replace": "%open-track%"}},
                        "bypass_list_management": {"settings": {"enable": 0}},
                    },
                }
            )
            .replace(", ", ",\r\n ")
            .encode()
            + b"\r\n"
        )
        message_id = queued_id(send_raw(relay, "app@example.com", ["ops@example.org"], good))
        relay.wait_for_log(rf"delivered id={message_id} provider=sendgrid attempt=1")
        (request,) = esp.requests  # the refused message never reached SendGrid
    payload = request.json()
    assert payload["categories"] == ["Orders", "Receipts"]
    assert payload["personalizations"] == [
        {
            "to": [{"email": "ops@example.org"}],
            # esprelay's id after the message's own arguments, for the events.
            "custom_args": {"orderNumber": "12345", "eventID": "6789", "esprelay_id": message_id},
        }
    ]
    assert payload["send_at"] == send_at
    assert payload["asm"] == {"group_id": 12345, "groups_to_display": [12345]}
    assert payload["ip_pool_name"] == "transactional email"
    assert payload["tracking_settings"] == {
        "click_tracking": {"enable": True, "enable_text": False},
        "open_tracking": {"enable": True, "substitution_tag": "%open-track%"},
    }
    assert payload["mail_settings"] == {"bypass_list_management": {"enable": False}}
    assert payload["headers"] == {"X-Custom": "kept"}
    assert "not accepted" in relay.log and "not a JSON object" in relay.log
