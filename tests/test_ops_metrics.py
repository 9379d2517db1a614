"""/healthz, /readyz and /metrics of a real relay; the counters must match exactly."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from esprelay.metrics import RelayMetrics, rejection_reason
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.opshttp import TOKEN, admin, http, scrape, send, value
from tests.providers.test_postmark import PostmarkAPI
from tests.providers.test_postmark import relay_env as postmark_env
from tests.relayproc import RelayProcess

LIFETIME = 4.0


def test_health_and_readiness(relay: RelayProcess) -> None:
    with http(relay) as client:
        assert client.get("/healthz").text == "ok\n"
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "checks": {"smtp": "ok", "spool": "ok"},  # queue mode: providers do not count
        }
        assert client.get("/nope").status_code == 404
        assert client.post("/healthz").status_code == 405


def test_readiness_fails_when_the_spool_directory_is_gone(
    relay: RelayProcess, tmp_path: Path
) -> None:
    (tmp_path / "data").rename(tmp_path / "moved")
    try:
        with http(relay) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["ready"] is False
            assert ready.json()["checks"]["spool"] == "spool directory is not writable"
            assert client.get("/healthz").status_code == 200  # alive all the same
    finally:
        (tmp_path / "moved").rename(tmp_path / "data")
    with http(relay) as client:
        assert client.get("/readyz").status_code == 200


def test_queue_mode_stays_ready_when_every_provider_circuit_is_open(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """An ESP outage must not take every replica out of the balancer: the spool keeps
    accepting, and that is what readiness means in queue mode."""
    (tmp_path / "outbox").write_text("not a directory\n")
    relay = relay_factory(
        {"ESPRELAY_BREAKER_THRESHOLD": "1", "ESPRELAY_BREAKER_COOLDOWN": "1h"}
    ).start()
    send(relay)
    relay.wait_for_log(r"deferred id=")
    with http(relay) as client:
        ready = client.get("/readyz")
        alive = client.get("/healthz")
        detail = client.get("/healthz?detail=1")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "checks": {"smtp": "ok", "spool": "ok"}}
    send(relay, subject="still accepted")  # and the spool still takes mail
    # Provider health is told in /healthz's detail (and the metrics), not in readiness.
    assert alive.status_code == 200 and alive.text == "ok\n"
    assert detail.status_code == 200
    [(name, breaker)] = detail.json()["providers"].items()
    assert name == "outbox" and breaker["circuit"] == "open" and breaker["opens"] == 1
    assert detail.json()["status"] == "ok" and breaker["retry_in"] > 3000


def test_passthrough_mode_is_not_ready_when_every_provider_circuit_is_open(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """Without a spool a message is accepted only once a provider took it: there provider
    health is readiness."""
    (tmp_path / "outbox").write_text("not a directory\n")
    relay = relay_factory(
        {
            "ESPRELAY_DELIVERY_MODE": "passthrough",
            "ESPRELAY_BREAKER_THRESHOLD": "1",
            "ESPRELAY_BREAKER_COOLDOWN": "1h",
        }
    ).start()
    with http(relay) as client:
        assert client.get("/readyz").status_code == 200
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt("ops@example.org")[0] == 250
        code, _ = smtp.data(b"From: app@example.com\r\nSubject: m\r\n\r\nbody\r\n")
    assert 400 <= code < 500
    with http(relay) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["providers"] == "every provider's circuit breaker is open"


def test_http_endpoint_can_be_switched_off(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory({"ESPRELAY_HTTP_ENABLED": "false"}).start()
    assert relay.http_port == 0
    assert "http listening" not in relay.log


@pytest.mark.slow
def test_metrics_count_exactly(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    # The outbox path is a plain file: every delivery fails (a transient
    # configuration error) until it is removed.
    blocker = tmp_path / "outbox"
    blocker.write_text("not a directory\n")
    relay = relay_factory(
        {
            "ESPRELAY_RETRY_CONFIG_ERROR": "1h",  # one attempt each, until retried by hand
            "ESPRELAY_BREAKER_THRESHOLD": "1000",  # no circuit breaking in this count
            "ESPRELAY_BOUNCE_MODE": "off",  # no bounces (DSNs) added to the count
            "ESPRELAY_MAX_QUEUE_LIFETIME": str(LIFETIME),
            "ESPRELAY_MAX_MESSAGE_SIZE": "10K",
            "ESPRELAY_ADMIN_TOKEN": TOKEN,
        }
    ).start()

    started = time.time()
    early = [send(relay, subject=f"early {i}") for i in range(3)]
    relay.wait_for_log(r"deferred id=", count=3)
    samples = scrape(relay)
    assert value(samples, "esprelay_messages_accepted_total") == 3
    assert value(samples, "esprelay_deliveries_total", provider="outbox", outcome="deferred") == 3
    assert value(samples, "esprelay_spool_depth") == 3
    assert value(samples, "esprelay_spool_messages", state="queued") == 3
    assert value(samples, "esprelay_spool_oldest_message_age_seconds") > 0

    # Two refusals: a malformed recipient (553) and a message over the size limit (552).
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt("no-at-sign")[0] == 553
        assert smtp.rcpt("ops@example.org")[0] == 250
        assert smtp.data(b"Subject: big\r\n\r\n" + b"x" * 20000 + b"\r\n")[0] == 552

    # Past the queue lifetime, two of the early ones are retried by hand: they fail.
    time.sleep(max(0.0, started + LIFETIME + 0.3 - time.time()))
    with admin(relay) as client:
        for message_id in early[:2]:
            assert client.post(f"/api/messages/{message_id}/retry").status_code == 200
    relay.wait_for_log(r"failed id=", count=2)

    # The outbox becomes usable: four new messages and the third early one are delivered.
    blocker.unlink()
    for i in range(4):
        send(relay, subject=f"late {i}")
    relay.wait_delivered(4)
    with admin(relay) as client:
        assert client.post(f"/api/messages/{early[2]}/retry").status_code == 200
    relay.wait_delivered(5)
    relay.wait_for_log(rf"delivered id={early[2]}")

    samples = scrape(relay)
    assert value(samples, "esprelay_messages_accepted_total") == 7
    assert value(samples, "esprelay_deliveries_total", provider="outbox", outcome="delivered") == 5
    assert value(samples, "esprelay_deliveries_total", provider="outbox", outcome="deferred") == 3
    assert value(samples, "esprelay_deliveries_total", provider="outbox", outcome="failed") == 2
    assert (
        value(
            samples,
            "esprelay_delivery_attempt_seconds_count",
            provider="outbox",
            outcome="delivered",
        )
        == 5
    )
    assert value(samples, "esprelay_delivery_latency_seconds_count", provider="outbox") == 5
    # The early one waited for its retry: at least the queue lifetime.
    assert value(samples, "esprelay_delivery_latency_seconds_sum", provider="outbox") >= LIFETIME
    assert (
        value(samples, "esprelay_messages_rejected_total", stage="rcpt", reason="bad_address") == 1
    )
    assert value(samples, "esprelay_messages_rejected_total", stage="data", reason="too_large") == 1
    assert (
        sum(v for (name, _), v in samples.items() if name == "esprelay_messages_rejected_total")
        == 2
    )
    assert value(samples, "esprelay_spool_messages", state="delivered") == 5
    assert value(samples, "esprelay_spool_messages", state="failed") == 2
    assert value(samples, "esprelay_spool_depth") == 0
    assert value(samples, "esprelay_spool_oldest_message_age_seconds") == 0
    # Labels never carry an address, a domain or an id.
    with http(relay) as client:
        text = client.get("/metrics").text
    for secret in ("example.org", "example.com", *early):
        assert secret not in text


def test_smtp_sessions_open_gauge(relay: RelayProcess) -> None:
    sessions = [smtplib.SMTP("127.0.0.1", relay.port, timeout=10) for _ in range(2)]
    try:
        for smtp in sessions:
            smtp.ehlo("client.test")
        assert value(scrape(relay), "esprelay_smtp_sessions_open") == 2
    finally:
        for smtp in sessions:
            smtp.quit()
    deadline = time.monotonic() + 5
    while value(scrape(relay), "esprelay_smtp_sessions_open") != 0:
        assert time.monotonic() < deadline, "sessions still counted after QUIT"
        time.sleep(0.05)


def test_esp_http_statuses_and_outcomes_through_postmark(
    relay_factory: type[RelayProcess],
) -> None:
    """A real HTTP provider against the fake Postmark API: 200s, a 500 retried, a 422."""
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

    with FakeESP(respond) as esp:
        relay = relay_factory({**postmark_env(esp), "ESPRELAY_BOUNCE_MODE": "off"}).start()
        for subject in ("fine", "flaky", "bad"):
            send(relay, subject=subject)
        relay.wait_for_log(r"delivered id=", count=2)
        relay.wait_for_log(r"failed id=", count=1)
        samples = scrape(relay)
    responses = "esprelay_provider_http_responses_total"
    assert value(samples, responses, provider="postmark", status="200") == 2
    assert value(samples, responses, provider="postmark", status="500") == 1
    assert value(samples, responses, provider="postmark", status="422") == 1
    deliveries = "esprelay_deliveries_total"
    assert value(samples, deliveries, provider="postmark", outcome="delivered") == 2
    assert value(samples, deliveries, provider="postmark", outcome="deferred") == 1
    assert value(samples, deliveries, provider="postmark", outcome="failed") == 1
    assert value(samples, "esprelay_messages_accepted_total") == 3


def test_registries_are_per_relay() -> None:
    one, two = RelayMetrics(), RelayMetrics()
    one.message_accepted()
    assert b"esprelay_messages_accepted_total 1.0" in one.exposition()
    assert b"esprelay_messages_accepted_total 0.0" in two.exposition()


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("250 2.1.5 Recipient OK", None),
        ("354 End data with <CR><LF>.<CR><LF>", None),
        ("553 5.1.3 Error: malformed address", "bad_address"),
        ("452 4.5.3 Too many recipients (at most 2 per message)", "too_many_recipients"),
        ("452 4.3.1 Insufficient system storage", "spool_full"),
        ("552 Error: Too much mail data", "too_large"),
        ("421 4.3.2 Service shutting down, try again later", "shutting_down"),
        ("530 5.7.0 Authentication required", "auth_required"),
        ("503 Error: need RCPT command", "bad_sequence"),
        ("599 Something new", "other_5xx"),
    ],
)
def test_rejection_reason(reply: str, reason: str | None) -> None:
    assert rejection_reason(reply) == reason


def test_readyz_turns_503_while_draining(relay: RelayProcess) -> None:
    """A balancer polling /readyz stops sending sessions as soon as SIGTERM arrives."""
    import signal

    assert relay.proc is not None
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250  # a transaction holds the drain open
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for_log("shutting down")
        with http(relay) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["smtp"] == "shutting down"
            assert client.get("/healthz").status_code == 200
        assert smtp.rcpt("ops@example.org")[0] == 250
        assert smtp.data(b"Subject: last one\r\n\r\nx\r\n")[0] == 250
    assert relay.proc.wait(20) == 0  # the first SIGTERM finishes the drain
    assert len(relay.delivered_ids()) == 1
