"""Routes: first match wins, splits keep every recipient exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from esprelay.config import load_settings
from esprelay.errors import ConfigError
from esprelay.models import Envelope
from esprelay.routing import load_routing, parse_routing

BASE = {
    "providers": {
        "brand-a": {"kind": "outbox", "dir": "/tmp/a"},
        "brand-b": {"kind": "outbox", "dir": "/tmp/b"},
        "backup": {"kind": "outbox", "dir": "/tmp/c"},
    },
    "routes": [
        {
            "sender_domains": ["brand-a.example", "*.brand-a.example"],
            "providers": ["brand-a", "backup"],
        },
        {"recipient_domains": ["partner.example"], "providers": ["brand-b"]},
        {"auth_users": ["printer"], "providers": ["backup"]},
    ],
    "default": {"providers": ["brand-b", "backup"]},
}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    return load_settings(env_file=None)


def test_single_provider_is_the_simple_case(settings) -> None:  # type: ignore[no-untyped-def]
    table = load_routing(settings)
    assert list(table.providers) == ["outbox"]
    [part] = table.plan(Envelope("a@x.example", ("b@y.example", "c@z.example")))
    assert part.providers == ("outbox",)
    assert part.envelope.rcpt_tos == ("b@y.example", "c@z.example")


def test_sender_domain_route_and_subdomains(settings) -> None:  # type: ignore[no-untyped-def]
    table = parse_routing(BASE, settings, {})
    for sender in ("app@brand-a.example", "app@mail.BRAND-A.example"):
        [part] = table.plan(Envelope(sender, ("x@elsewhere.example",)))
        assert part.route == "routes[0]"
        assert part.providers == ("brand-a", "backup")
    [part] = table.plan(Envelope("app@notbrand-a.example", ("x@elsewhere.example",)))
    assert part.route == "default"


def test_first_match_wins(settings) -> None:  # type: ignore[no-untyped-def]
    table = parse_routing(BASE, settings, {})
    [part] = table.plan(Envelope("app@brand-a.example", ("p@partner.example",)), "printer")
    assert part.route == "routes[0]"


def test_split_by_recipient_domain(settings) -> None:  # type: ignore[no-untyped-def]
    table = parse_routing(BASE, settings, {})
    envelope = Envelope(
        "app@other.example",
        ("one@partner.example", "two@else.example", "three@PARTNER.example", "four@else.example"),
    )
    parts = table.plan(envelope)
    assert [(p.route, p.envelope.rcpt_tos) for p in parts] == [
        ("routes[1]", ("one@partner.example", "three@PARTNER.example")),
        ("default", ("two@else.example", "four@else.example")),
    ]
    every = [r for p in parts for r in p.envelope.rcpt_tos]
    assert sorted(every) == sorted(envelope.rcpt_tos)


def test_auth_user_route(settings) -> None:  # type: ignore[no-untyped-def]
    table = parse_routing(BASE, settings, {})
    [part] = table.plan(Envelope("scan@office.example", ("a@else.example",)), "printer")
    assert part.providers == ("backup",)
    [part] = table.plan(Envelope("scan@office.example", ("a@else.example",)), None)
    assert part.route == "default"


def test_secrets_from_other_variables(settings) -> None:  # type: ignore[no-untyped-def]
    data = {
        "providers": {"sg": {"kind": "sendgrid", "api_key_env": "MY_SG_KEY"}},
        "default": {"providers": ["sg"]},
    }
    table = parse_routing(data, settings, {"MY_SG_KEY": "SG.secret"})
    key = table.providers["sg"].settings.api_key  # type: ignore[attr-defined]
    assert key.get_secret_value() == "SG.secret"
    with pytest.raises(ConfigError, match="MY_SG_KEY is not set"):
        parse_routing(data, settings, {})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"providers": {}}, "at least one"),
        ({"providers": {"a": {"dir": "x"}}}, "kind is required"),
        ({"providers": {"a": {"kind": "outbox", "colour": "red"}}}, "unknown setting 'colour'"),
        ({"providers": {"a": {"kind": "smtp"}}}, "'smtp' is not a registered provider"),
        ({"providers": {"a": {"kind": "sendgrid"}}}, "ESPRELAY_SENDGRID_API_KEY is required"),
        (
            {
                "providers": {"a": {"kind": "outbox"}},
                "routes": [{"providers": ["b"], "sender_domains": "x"}],
            },
            "no provider named 'b'",
        ),
        (
            {"providers": {"a": {"kind": "outbox"}}, "routes": [{"providers": ["a"]}]},
            "no criterion",
        ),
        ({"providers": {"a": {"kind": "outbox"}}, "extra": {}}, "unknown section"),
    ],
)
def test_bad_routes_are_one_clear_error(settings, data, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        parse_routing(data, settings, {})
    assert fragment in str(info.value)
    assert str(info.value).startswith("ESPRELAY_ROUTES_FILE")


def test_routes_file_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    routes = tmp_path / "routes.toml"
    routes.write_text(
        '[providers.a]\nkind = "outbox"\ndir = "out-a"\n'
        '[providers.b]\nkind = "outbox"\ndir = "out-b"\n'
        '[[routes]]\nrecipient_domains = ["b.example"]\nproviders = ["b"]\n'
        '[default]\nproviders = ["a"]\n'
    )
    monkeypatch.setenv("ESPRELAY_ROUTES_FILE", str(routes))
    table = load_routing(load_settings(env_file=None))
    assert str(table.providers["b"].settings.dir) == "out-b"  # type: ignore[attr-defined]
    routes.write_text("not = [valid")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_routing(load_settings(env_file=None))
