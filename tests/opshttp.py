"""Helpers for tests of the operations HTTP endpoint of a running relay."""

from __future__ import annotations

import smtplib

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.relayproc import RelayProcess

TOKEN = "test-admin-token-0123456789"


def http(relay: RelayProcess) -> httpx.Client:
    assert relay.http_port, f"the relay's HTTP endpoint is not up:\n{relay.log}"
    return httpx.Client(base_url=f"http://127.0.0.1:{relay.http_port}", timeout=10)


def admin(relay: RelayProcess, token: str = TOKEN) -> httpx.Client:
    client = http(relay)
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def scrape(relay: RelayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (sample name, labels), parsed by prometheus_client."""
    with http(relay) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def send(relay: RelayProcess, rcpt: str = "ops@example.org", subject: str = "m") -> str:
    """Send one small message; return its spool id from the 250 reply."""
    raw = (
        f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.data(raw)
    assert code == 250, reply
    return reply.decode().rsplit("queued as ", 1)[1].strip()
