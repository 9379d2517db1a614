"""Prometheus metrics for one relay, in its own registry.

Each :class:`Relay` owns a :class:`RelayMetrics` with a private
``CollectorRegistry`` (never prometheus-client's global one), so two relays in one
process, or one test after another, never share or collide on a counter.

Labels stay low-cardinality by construction: provider names (from configuration),
outcomes, SMTP stages, reasons and HTTP status codes from fixed small sets.  Never a
recipient, a sender, a domain or a message id.

Besides the counters the relay updates as things happen, the registry holds the
standard process and platform collectors (``process_*``, ``python_info``,
``python_gc_*``: a private registry does not get them by itself) and one collector read
at scrape time for the providers (:meth:`RelayMetrics.watch_providers`): each one's
circuit-breaker state, its configured rate and concurrency limits, and what those
limits held back.  The README lists every metric; ``contrib/`` has a Grafana dashboard
and Prometheus alert rules built on them.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from esprelay import __version__
from esprelay.breaker import BreakerState
from esprelay.models import MessageState
from esprelay.smtp.replies import AUTH_BLOCKED, AUTH_INVALID
from esprelay.spool.base import SpoolStats

if TYPE_CHECKING:
    from esprelay.delivery import Outcome
    from esprelay.dispatch import ProviderSet

__all__ = ["CONTENT_TYPE", "RelayMetrics", "rejection_reason"]

#: What ``generate_latest`` writes: the classic Prometheus text format, which every
#: scraper reads (prometheus-client's own HTTP server answers with it by default).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds; from a fast ESP answer to a slow one near the provider timeout.
ATTEMPT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds from the SMTP 250 to the provider's acceptance; retries make this long-tailed.
LATENCY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)

# The reply codes esprelay and aiosmtpd use for refusals, by enhanced status or code.
_REASONS_BY_ENHANCED = {
    "4.3.1": "spool_full",
    "4.3.2": "shutting_down",
    "4.5.3": "too_many_recipients",
    "5.1.3": "bad_address",
    "5.3.4": "too_large",
}
_REASONS_BY_CODE = {
    "421": "shutting_down",
    "451": "local_error",
    "452": "spool_full",
    "500": "syntax",
    "501": "syntax",
    "502": "not_implemented",
    "503": "bad_sequence",
    "504": "not_implemented",
    "530": "auth_required",
    "535": "auth_failed",
    "538": "encryption_required",
    "550": "refused",
    "552": "too_large",
    "553": "bad_address",
    "554": "refused",
}
_REPLY = re.compile(r"^([45]\d\d)[ -](?:([45]\.\d{1,3}\.\d{1,3})\b)?")

#: The mechanisms the engines offer; any other name is counted as "other".
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
#: Why a login failed, by the reply that refused it.
_AUTH_REASONS = {AUTH_INVALID: "invalid_credentials", AUTH_BLOCKED: "too_many_failures"}
#: What a delivery attempt came to (esprelay.delivery.Outcome.outcome).
OUTCOMES = ("delivered", "partial", "deferred", "failed")
#: The kinds of DSN (bounce) queued (esprelay.failures.bounce_kind).
DSN_KINDS = ("failed", "expired", "partial")


def rejection_reason(reply: str) -> str | None:
    """A short reason for a negative SMTP reply, or None if ``reply`` is not one."""
    match = _REPLY.match(reply)
    if match is None:
        return None
    code, enhanced = match.groups()
    if enhanced and enhanced in _REASONS_BY_ENHANCED:
        return _REASONS_BY_ENHANCED[enhanced]
    return _REASONS_BY_CODE.get(code, f"other_{code[0]}xx")


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            # A private registry, with the collectors the global one has by default.
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        r = self.registry
        self.build_info = Gauge(
            "esprelay_build_info",
            "Always 1: the running version, Python and SMTP engine as labels.",
            ["version", "python", "engine"],
            registry=r,
        )
        self.auth_failures = Counter(
            "esprelay_smtp_auth_failures",
            "Failed SMTP AUTH attempts, by mechanism and reason.",
            ["mechanism", "reason"],
            registry=r,
        )
        self.dsns = Counter(
            "esprelay_dsns",
            "Delivery status notifications (bounces) queued for failed messages, by kind"
            " (failed: refused by the ESP; expired: past the queue lifetime; partial: the"
            " recipients an ESP refused while taking the others).",
            ["kind"],
            registry=r,
        )
        self.accepted = Counter(
            "esprelay_messages_accepted",
            "Messages accepted over SMTP and committed to the spool.",
            registry=r,
        )
        self.rejected = Counter(
            "esprelay_messages_rejected",
            "Negative replies to MAIL, RCPT or DATA, by stage and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.deliveries = Counter(
            "esprelay_deliveries",
            "Delivery attempts by provider and outcome (delivered, partial, deferred, failed).",
            ["provider", "outcome"],
            registry=r,
        )
        self.partial_recipients = Counter(
            "esprelay_delivery_partial_recipients",
            "Recipients of partial deliveries (the provider refused some recipients only),"
            " by provider and fate (accepted, bounced, retried).",
            ["provider", "fate"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "esprelay_delivery_attempt_seconds",
            "Time one delivery attempt took, by provider and outcome.",
            ["provider", "outcome"],
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.latency_seconds = Histogram(
            "esprelay_delivery_latency_seconds",
            "Time from SMTP acceptance to delivery by the provider, retries included.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_responses = Counter(
            "esprelay_provider_http_responses",
            "HTTP responses from the providers' APIs, by provider and status code.",
            ["provider", "status"],
            registry=r,
        )
        self.smtp_sessions = Gauge(
            "esprelay_smtp_sessions_open", "SMTP sessions open now.", registry=r
        )
        self.spool_messages = Gauge(
            "esprelay_spool_messages", "Messages in the spool, by state.", ["state"], registry=r
        )
        self.spool_depth = Gauge(
            "esprelay_spool_depth",
            "Messages not yet finished (queued plus in flight).",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "esprelay_spool_oldest_message_age_seconds",
            "Age of the oldest queued message (0 when none waits).",
            registry=r,
        )
        self.spool_scrape_errors = Counter(
            "esprelay_spool_scrape_errors",
            "Scrapes that could not read the spool's statistics.",
            registry=r,
        )
        # ESP event webhooks (esprelay.events); the provider label is a configured name
        # (or "unknown" for a path that names none), the reason a fixed word.
        self.events_received = Counter(
            "esprelay_events_received",
            "Verified ESP events stored in the inbox, by provider and kind.",
            ["provider", "kind"],
            registry=r,
        )
        self.events_duplicates = Counter(
            "esprelay_events_duplicates",
            "Verified ESP events the inbox had already (an ESP's retry), by provider.",
            ["provider"],
            registry=r,
        )
        self.events_unknown_message = Counter(
            "esprelay_events_unknown_message",
            "Stored ESP events that name no message in the spool, by provider.",
            ["provider"],
            registry=r,
        )
        self.events_rejected = Counter(
            "esprelay_events_rejected",
            "ESP event requests refused (signature, credentials, stale, replayed, topic,"
            " malformed, too_large, rate_limited, ...), by provider and reason.",
            ["provider", "reason"],
            registry=r,
        )
        # A shared (PostgreSQL) spool's statements sent and waited for: with the
        # messages accepted, its round trips per message (bench/README.md).
        self.spool_round_trips = Counter(
            "esprelay_spool_round_trips",
            "Database round trips of the shared (PostgreSQL) spool.",
            registry=r,
        )
        self._round_trips_seen = 0
        # What the ESP events did (esprelay.events.processor): a recipient's status changed
        # (by the event's kind), and the DSNs sent from events (failure, success, delay).
        self.events_status_changes = Counter(
            "esprelay_events_status_changes",
            "Recipient status changes made by ESP events, by kind.",
            ["kind"],
            registry=r,
        )
        self.events_dsns = Counter(
            "esprelay_events_dsns",
            "Delivery status notifications queued from ESP events, by kind"
            " (failure, success, delay).",
            ["kind"],
            registry=r,
        )
        for state in MessageState:
            self.spool_messages.labels(state.value)
        for mechanism in (*AUTH_MECHANISMS, "other"):
            for reason in _AUTH_REASONS.values():
                self.auth_failures.labels(mechanism, reason)
        for kind in DSN_KINDS:
            self.dsns.labels(kind)
        self._providers = _ProviderCollector()
        r.register(self._providers)
        self._outcome_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    # region hooks the relay wires in

    def set_build_info(self, engine: str) -> None:
        """Say which esprelay runs, on which Python, with which SMTP engine."""
        self.build_info.clear()
        self.build_info.labels(__version__, platform.python_version(), engine).set(1)

    def watch_providers(self, providers: ProviderSet) -> None:
        """Report ``providers``' breakers and limits at every scrape (replaces the last),
        and count their deliveries from zero, so that rates and alerts see every one."""
        self._providers.providers = providers
        for name in providers.providers:
            for outcome in OUTCOMES:
                self.deliveries.labels(name, outcome)

    def auth_failed(self, mechanism: str, reply: str) -> None:
        """Called with every AUTH attempt refused: its mechanism and the reply."""
        mechanism = mechanism.upper()
        if mechanism not in AUTH_MECHANISMS:
            mechanism = "other"
        self.auth_failures.labels(mechanism, _AUTH_REASONS.get(reply, "other")).inc()

    def dsn_sent(self, kind: str) -> None:
        """Called with the kind (``DSN_KINDS``) of every bounce queued."""
        self.dsns.labels(kind).inc()

    def message_accepted(self) -> None:
        self.accepted.inc()

    def smtp_reply(self, stage: str, reply: str) -> None:
        """Called with every refusal (4xx, 5xx) to MAIL, RCPT and DATA; counts them."""
        reason = rejection_reason(reply)
        if reason is not None:
            self.rejected.labels(stage, reason).inc()

    def delivery_outcome(self, outcome: Outcome) -> None:
        """The Deliverer's ``on_outcome`` hook."""
        provider = outcome.provider
        key = (provider, outcome.outcome)
        # labels() looks the child up under a lock on every call: keep them.
        children = self._outcome_children.get(key)
        if children is None:
            children = self._outcome_children[key] = (
                self.deliveries.labels(*key),
                self.attempt_seconds.labels(*key),
                self.latency_seconds.labels(provider),
            )
        deliveries, attempt_seconds, latency_seconds = children
        deliveries.inc()
        attempt_seconds.observe(outcome.elapsed)
        if outcome.outcome == "delivered" or outcome.accepted:
            latency_seconds.observe(max(0.0, time.time() - outcome.message.created_at))
        if outcome.outcome == "partial":
            for fate, count in (
                ("accepted", len(outcome.accepted)),
                ("bounced", len(outcome.bounced)),
                ("retried", len(outcome.retried)),
            ):
                if count:
                    self.partial_recipients.labels(provider, fate).inc(count)

    def httpx_event_hooks(
        self, provider_for_host: Mapping[str, str]
    ) -> dict[str, list[Callable[[Any], Awaitable[None]]]]:
        """``event_hooks`` for the shared ``httpx.AsyncClient``: count every response.

        The provider label comes from the request's host (an API host named in the
        configuration); any other host is counted as ``other``.
        """

        children: dict[tuple[str, int], Any] = {}

        async def on_response(response: httpx.Response) -> None:
            key = (response.request.url.host, response.status_code)
            child = children.get(key)
            if child is None:
                provider = provider_for_host.get(key[0], "other")
                child = children[key] = self.provider_responses.labels(provider, str(key[1]))
            child.inc()

        return {"response": [on_response]}

    def observe_spool(self, stats: SpoolStats, now: float | None = None) -> None:
        for state in MessageState:
            self.spool_messages.labels(state.value).set(stats.counts.get(state, 0))
        self.spool_depth.set(stats.depth)
        if stats.oldest_queued_at is None:
            self.spool_oldest_age.set(0)
        else:
            now = time.time() if now is None else now
            self.spool_oldest_age.set(max(0.0, now - stats.oldest_queued_at))

    def observe_round_trips(self, count: int) -> None:
        """The spool's own running count of round trips (``PostgresSpool.round_trips``)."""
        if count > self._round_trips_seen:
            self.spool_round_trips.inc(count - self._round_trips_seen)
            self._round_trips_seen = count

    # endregion

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ProviderCollector:
    """The providers' breakers and limits, read when scraped."""

    def __init__(self) -> None:
        self.providers: ProviderSet | None = None

    def describe(self) -> list[Metric]:
        return []  # nothing to check against the registry's names at registration

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "esprelay_provider_circuit_state",
            "1 for the state each provider's circuit breaker is in (closed, open, half_open).",
            labels=["provider", "state"],
        )
        opens = CounterMetricFamily(
            "esprelay_provider_circuit_opens",
            "Times a provider's circuit breaker opened.",
            labels=["provider"],
        )
        rate = GaugeMetricFamily(
            "esprelay_provider_rate_limit",
            "Configured message rate per provider (messages a second; absent: no limit).",
            labels=["provider"],
        )
        burst = GaugeMetricFamily(
            "esprelay_provider_rate_limit_burst",
            "Messages a provider's rate limit lets through at once.",
            labels=["provider"],
        )
        concurrency = GaugeMetricFamily(
            "esprelay_provider_concurrency_limit",
            "Configured messages in a provider's hands at once (absent: no limit).",
            labels=["provider"],
        )
        in_flight = GaugeMetricFamily(
            "esprelay_provider_in_flight",
            "Messages in a provider's hands now (providers with a concurrency limit).",
            labels=["provider"],
        )
        throttled = CounterMetricFamily(
            "esprelay_provider_throttled",
            "Messages that waited for a provider's rate or concurrency limit.",
            labels=["provider", "limit"],
        )
        waited = CounterMetricFamily(
            "esprelay_provider_throttle_wait_seconds",
            "Seconds messages waited for a provider's rate or concurrency limit.",
            labels=["provider", "limit"],
        )
        deferred = CounterMetricFamily(
            "esprelay_provider_throttle_deferred",
            "Messages not sent through a provider because its limit's wait would have"
            " outlasted the lease (deferred, or sent by the route's next provider).",
            labels=["provider", "limit"],
        )
        families = (state, opens, rate, burst, concurrency, in_flight, throttled, waited, deferred)
        providers = self.providers
        if providers is None:
            yield from families
            return
        for name, breaker in providers.breakers.items():
            current = breaker.state
            for each in BreakerState:
                state.add_metric([name, each.value], 1.0 if each is current else 0.0)
            opens.add_metric([name], breaker.opens)
        for name, provider in providers.providers.items():
            limits: list[tuple[str, Any]] = []
            if provider.rate_limit is not None:
                rate.add_metric([name], provider.rate_limit.rate)
                burst.add_metric([name], provider.rate_limit.burst)
                limits.append(("rate", provider.rate_limit))
            if provider.concurrency is not None:
                concurrency.add_metric([name], provider.concurrency.limit)
                in_flight.add_metric([name], provider.concurrency.in_flight)
                limits.append(("concurrency", provider.concurrency))
            for kind, limit in limits:
                throttled.add_metric([name, kind], limit.waits)
                waited.add_metric([name, kind], limit.waited_seconds)
                deferred.add_metric([name, kind], limit.deferred)
        yield from families
