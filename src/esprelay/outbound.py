"""The outbound side: the one HTTP client, and the routed providers that share it.

Every provider and the failure webhook post through one ``httpx.AsyncClient``
(:func:`esprelay.httpclient.make_client`), whose responses the metrics count under the
name of the provider (as routed) whose API host it is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from esprelay.config import Settings
from esprelay.dispatch import ProviderSet
from esprelay.httpclient import make_client
from esprelay.metrics import RelayMetrics
from esprelay.providers import Provider, ProviderConfig
from esprelay.routing import RoutingTable

log = logging.getLogger("esprelay")


def outbound_client(
    settings: Settings, routing: RoutingTable, metrics: RelayMetrics
) -> httpx.AsyncClient:
    """The shared client, its responses counted in ``metrics``."""
    hosts = _provider_hosts(routing.providers, settings.failure_webhook_url)
    client, transport = make_client(
        timeout=settings.provider_timeout,
        max_connections=max(10, settings.delivery_concurrency),
        transport=settings.http_transport,
        event_hooks=metrics.httpx_event_hooks(hosts),
    )
    log.info("http transport: %s", transport)
    return client


def routed_providers(
    settings: Settings, routing: RoutingTable, client: httpx.AsyncClient
) -> ProviderSet:
    """The providers ``routing`` names, on ``client``, each behind its circuit breaker."""
    built: dict[str, Provider] = {
        name: config.build(client, name) for name, config in routing.providers.items()
    }
    return ProviderSet(
        built,
        breaker_threshold=settings.breaker_threshold,
        breaker_cooldown=settings.breaker_cooldown,
        # A wait for a rate limit ends in time for one request before the lease does.
        max_wait=max(0.0, settings.lease_time - settings.provider_timeout),
    )


def _provider_hosts(
    providers: Mapping[str, ProviderConfig], webhook_url: str | None
) -> dict[str, str]:
    """API host -> provider name (as routed), for the HTTP status metrics' label."""
    hosts: dict[str, str] = {}
    for name, config in providers.items():
        for url in config.settings.api_urls():
            host = urlsplit(url).hostname
            if host:
                hosts.setdefault(host, name)
    if webhook_url:
        host = urlsplit(webhook_url).hostname
        if host:
            hosts.setdefault(host, "failure_webhook")
    return hosts
