"""The ops HTTP server as configured: health, readiness, metrics and the admin API.

:func:`start_ops` builds :class:`esprelay.httpapi.OpsServer` from the settings and opens
it on ``ESPRELAY_HTTP_HOST:ESPRELAY_HTTP_PORT``, or answers None with
``ESPRELAY_HTTP_ENABLED`` off.  The admin API is on only with ``ESPRELAY_ADMIN_TOKEN``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from esprelay.config import Settings
from esprelay.httpapi import OpsServer, ReadinessCheck
from esprelay.listeners import listen_error
from esprelay.metrics import RelayMetrics
from esprelay.spool import Spool

log = logging.getLogger("esprelay")


async def start_ops(
    settings: Settings,
    *,
    spool: Spool | None,
    metrics: RelayMetrics,
    readiness: list[tuple[str, ReadinessCheck]],
    on_retry: Callable[[], None] | None,
    health: Callable[[], dict[str, Any]] | None = None,
) -> OpsServer | None:
    """The listening ops server; ``readiness`` is read at each request, so it may grow."""
    if not settings.http_enabled:
        return None
    http = OpsServer(
        spool=spool,
        metrics=metrics,
        admin_token=admin_secret(settings),
        readiness=readiness,
        on_retry=on_retry,
        health=health,
    )
    try:
        await http.start(settings.http_host, settings.http_port)
    except OSError as exc:
        raise listen_error("HTTP", settings.http_host, settings.http_port, exc) from None
    log.info(
        "http listening on %s:%d (admin api %s)",
        settings.http_host,
        http.port,
        "on" if http.admin_token else "off: no ESPRELAY_ADMIN_TOKEN",
    )
    return http


def admin_secret(settings: Settings) -> str | None:
    """ESPRELAY_ADMIN_TOKEN in the clear, or None (no admin API)."""
    token = settings.admin_token
    return None if token is None else token.get_secret_value()
