"""The metrics a dashboard needs, scraped from a running relay over HTTP: build info,
the process collectors, AUTH failures, DSNs, circuit breakers and the providers'
rate and concurrency limits (what they held back, and a deferral past the lease)."""

from __future__ import annotations

import platform
import smtplib
from pathlib import Path
from types import SimpleNamespace

import pytest

import esprelay
from esprelay.failures import bounce_kind
from esprelay.metrics import DSN_KINDS
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.opshttp import scrape, send, value
from tests.providers.test_postmark import PostmarkAPI
from tests.providers.test_postmark import relay_env as postmark_env
from tests.relayproc import RelayProcess

PASSWORD = "app-Secret-42"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def flaky_postmark() -> PostmarkAPI:
    """Postmark, but "flaky" gets one 500 and "bad" a 422 (a permanent refusal)."""
    api = PostmarkAPI()
    seen: dict[str, int] = {}

    def respond(request: Recorded) -> Reply:
        subject = request.json().get("Subject", "")
        seen[subject] = seen.get(subject, 0) + 1
        if subject == "flaky" and seen[subject] == 1:
            return Reply(500, "Internal Server Error")
        if subject == "bad":
            return Reply(422, {"ErrorCode": 300, "Message": "Invalid 'To' address"})
        return api(request)

    return respond  # type: ignore[return-value]


def loaded_relay(relay_factory: type[RelayProcess], esp: FakeESP) -> RelayProcess:
    """A relay on the fake Postmark with limits and AUTH, after traffic that gives every
    dashboard series a sample: delivered, deferred, failed (and its bounce), a refused
    recipient, a failed login."""
    relay = relay_factory(
        {
            **postmark_env(esp),
            "ESPRELAY_POSTMARK_RATE": "600/min",
            "ESPRELAY_POSTMARK_CONCURRENCY": "4",
            "ESPRELAY_AUTH_USER": "app",
            "ESPRELAY_AUTH_PASSWORD": PASSWORD,
            "ESPRELAY_PLAINTEXT_AUTH_NETWORKS": "127.0.0.1/32",
        }
    ).start()
    for subject in ("fine", "flaky", "bad"):
        send(relay, subject=subject)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.user, smtp.password = "app", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt("no-at-sign")[0] == 553
    # fine, flaky (on its retry) and the bounce of bad are delivered; bad failed.
    relay.wait_for_log(r"failed id=", count=1)
    relay.wait_for_log(r"bounce id=", count=1)
    relay.wait_for_log(r"delivered id=", count=3)
    return relay


def test_dashboard_metrics_through_a_running_relay(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(flaky_postmark()) as esp:
        relay = loaded_relay(relay_factory, esp)
        samples = scrape(relay)
    build = {labels: v for (name, labels), v in samples.items() if name == "esprelay_build_info"}
    assert build == {
        frozenset(
            {
                ("version", esprelay.__version__),
                ("python", platform.python_version()),
                ("engine", "native"),
            }
        ): 1.0
    }
    # The standard collectors, in the relay's own registry.
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert any(name.startswith("python_gc_") for name in names)
    failures = "esprelay_smtp_auth_failures_total"
    assert value(samples, failures, mechanism="PLAIN", reason="invalid_credentials") == 1
    assert sum(v for (name, _), v in samples.items() if name == failures) == 1
    assert value(samples, "esprelay_dsns_total", kind="failed") == 1
    assert value(samples, "esprelay_dsns_total", kind="expired") == 0
    assert value(samples, "esprelay_provider_circuit_state", provider="postmark", state="closed")
    assert value(samples, "esprelay_provider_rate_limit", provider="postmark") == 10.0
    assert value(samples, "esprelay_provider_rate_limit_burst", provider="postmark") == 10.0
    assert value(samples, "esprelay_provider_concurrency_limit", provider="postmark") == 4
    assert value(samples, "esprelay_provider_in_flight", provider="postmark") == 0
    for limit in ("rate", "concurrency"):
        deferred = "esprelay_provider_throttle_deferred_total"
        assert (deferred, frozenset({("provider", "postmark"), ("limit", limit)})) in samples
        assert value(samples, deferred, provider="postmark", limit=limit) == 0


def test_a_rate_limit_wait_past_the_lease_defers_the_message(
    relay_factory: type[RelayProcess],
) -> None:
    relay = relay_factory(
        {
            "ESPRELAY_OUTBOX_RATE": "1/min",
            # A token may be waited for 10 s (the lease less one request's time).
            "ESPRELAY_LEASE_TIME": "40s",
            "ESPRELAY_PROVIDER_TIMEOUT": "30s",
            "ESPRELAY_BREAKER_THRESHOLD": "1",
        }
    ).start()
    first = send(relay, subject="first")
    relay.wait_delivered(1)
    second = send(relay, subject="second")
    relay.wait_for_log(rf"deferred id={second} provider=outbox attempt=1")
    assert "rate limit: the next slot is in" in relay.log
    samples = scrape(relay)
    assert relay.delivered_ids() == [first]
    assert value(samples, "esprelay_provider_rate_limit", provider="outbox") == pytest.approx(
        1 / 60
    )
    assert (
        value(samples, "esprelay_provider_throttle_deferred_total", provider="outbox", limit="rate")
        == 1
    )
    assert value(samples, "esprelay_deliveries_total", provider="outbox", outcome="deferred") == 1
    # Our own limit is no sign of a failing ESP: the breaker stays closed.
    assert value(samples, "esprelay_provider_circuit_state", provider="outbox", state="closed")
    assert value(samples, "esprelay_provider_circuit_opens_total", provider="outbox") == 0


def test_an_open_breaker_is_shown(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    (tmp_path / "outbox").write_text("not a directory\n")  # every delivery fails
    relay = relay_factory(
        {"ESPRELAY_BREAKER_THRESHOLD": "1", "ESPRELAY_BREAKER_COOLDOWN": "1h"}
    ).start()
    send(relay)
    relay.wait_for_log(r"deferred id=")
    samples = scrape(relay)
    state = "esprelay_provider_circuit_state"
    assert value(samples, state, provider="outbox", state="open") == 1
    assert value(samples, state, provider="outbox", state="closed") == 0
    assert value(samples, "esprelay_provider_circuit_opens_total", provider="outbox") == 1


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_auth_failures_by_mechanism_and_reason(
    relay_factory: type[RelayProcess], engine: str
) -> None:
    relay = relay_factory(
        {
            "ESPRELAY_SMTP_ENGINE": engine,
            "ESPRELAY_AUTH_USER": "app",
            "ESPRELAY_AUTH_PASSWORD": PASSWORD,
            "ESPRELAY_PLAINTEXT_AUTH_NETWORKS": "127.0.0.1/32",
            "ESPRELAY_AUTH_MAX_FAILURES": "2",
        }
    ).start()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.user, smtp.password = "app", "wrong"
        for mechanism, answer in (("PLAIN", smtp.auth_plain), ("LOGIN", smtp.auth_login)):
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                smtp.auth(mechanism, answer)
            assert failed.value.smtp_code == 535
        # Blocked now: refused before the mechanism is even looked at.
        code, _ = smtp.docmd("AUTH", "PLAIN")
        assert code == 454
    samples = scrape(relay)
    failures = "esprelay_smtp_auth_failures_total"
    assert value(samples, failures, mechanism="PLAIN", reason="invalid_credentials") == 1
    assert value(samples, failures, mechanism="LOGIN", reason="invalid_credentials") == 1
    assert value(samples, failures, mechanism="other", reason="too_many_failures") == 1
    assert sum(v for (name, _), v in samples.items() if name == failures) == 3
    build = [labels for (name, labels), _ in samples.items() if name == "esprelay_build_info"]
    assert ("engine", engine) in build[0]


@pytest.mark.parametrize(
    ("outcome", "expired", "kind"),
    [("failed", False, "failed"), ("failed", True, "expired"), ("partial", False, "partial")],
)
def test_bounce_kinds(outcome: str, expired: bool, kind: str) -> None:
    assert bounce_kind(SimpleNamespace(outcome=outcome, expired=expired)) == kind  # type: ignore[arg-type]
    assert kind in DSN_KINDS
