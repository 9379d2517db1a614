"""Prometheus metrics for one relay, in its own registry.

Each :class:`Relay` owns a :class:`RelayMetrics` with a private
``CollectorRegistry`` (never prometheus-client's global one), so two relays in one
process, or one test after another, never share or collide on a counter.

Labels stay low-cardinality by construction: provider names (from configuration),
outcomes, SMTP stages, reasons and HTTP status codes from fixed small sets.  Never a
recipient, a sender, a domain or a message id.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from esprelay.models import MessageState
from esprelay.spool.base import SpoolStats

if TYPE_CHECKING:
    from esprelay.delivery import Outcome

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
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
        self._outcome_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    # region hooks the relay wires in

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
