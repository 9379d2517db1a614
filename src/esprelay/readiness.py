"""The relay's own readiness checks for ``/readyz``: SMTP, spool, providers.

Readiness means "can take mail and keep it".  In queue mode (a spool) that is the SMTP
listener and the spool: while every provider's circuit breaker is open the spool keeps
accepting, and delivery resumes when the ESP does; a replica taken out of the load
balancer for an ESP outage (or a 429 storm) would only refuse mail that could wait.
Provider health then counts only in the breaker metrics and the logs.  In passthrough
mode (``ESPRELAY_DELIVERY_MODE=passthrough``, no spool) a message is accepted only once
a provider took it, so there provider health is readiness: the ``providers`` check.

A check is a coroutine function that answers ``None`` when ready and otherwise says
why not (:data:`esprelay.httpapi.ReadinessCheck`); one that raises counts as not ready.
Other subsystems add theirs with ``Relay.add_readiness_check``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from esprelay.dispatch import ProviderSet
from esprelay.httpapi import ReadinessCheck
from esprelay.intake import IntakeState
from esprelay.spool import Spool


def relay_checks(
    *,
    state: IntakeState,
    listening: Callable[[], bool],
    spool: Spool | None,
    providers: ProviderSet,
) -> list[tuple[str, ReadinessCheck]]:
    """The checks, by name; ``listening`` says whether the SMTP port takes connections,
    ``spool`` is None in passthrough mode, the one mode where providers count."""

    async def smtp() -> str | None:
        if state.draining:
            return "shutting down"
        if not listening():
            return "not listening"
        return None

    async def spool_ok() -> str | None:
        if spool is None:
            return None  # passthrough mode: no spool
        await spool.stats()  # raises SpoolError if unreadable
        path = getattr(spool, "path", None)  # file-backed spools (SQLite)
        if path is None:
            return None
        return await asyncio.to_thread(_file_writable, str(path))

    async def providers_ok() -> str | None:
        if providers.all_open():
            return "every provider's circuit breaker is open"
        return None

    if spool is not None:  # queue mode: the spool keeps what the providers cannot take
        return [("smtp", smtp), ("spool", spool_ok)]
    return [("smtp", smtp), ("spool", spool_ok), ("providers", providers_ok)]


def _file_writable(path: str) -> str | None:
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"spool file {path} is not writable"
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return "spool directory is not writable"
    return None
