"""Durable spools, selected by ``ESPRELAY_SPOOL_URL``: embedded SQLite or shared PostgreSQL."""

from __future__ import annotations

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import ConfigError
from esprelay.spool.base import NewPart, Spool, SpoolStats, new_message_id

__all__ = ["NewPart", "Spool", "SpoolStats", "new_message_id", "open_spool"]


def open_spool(
    url: str,
    *,
    exclusive: bool = False,
    owner: str | None = None,
    auto_migrate: bool = True,
    pool_size: int = 10,
    clock: Clock = SYSTEM_CLOCK,
) -> Spool:
    """Build (not yet open) the spool named by ``url``.

    ``exclusive`` is for ``serve``: the process that delivers from the spool.  An
    SQLite spool then belongs to this process alone; a PostgreSQL spool is shared by
    design, and takes back at open only the leases held under ``owner`` (this
    instance's id in an earlier life).  Admin commands open either one shared.
    ``auto_migrate`` and ``pool_size`` apply to PostgreSQL.  ``clock`` is the SQLite
    spool's time; a PostgreSQL spool reads the time from its server and waits on
    ``clock`` (see esprelay.spool.postgres).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from esprelay.spool.sqlite import SqliteSpool, path_from_url

        return SqliteSpool(path_from_url(url), exclusive=exclusive, clock=clock)
    if scheme in ("postgresql", "postgres"):
        from esprelay.spool.postgres import PostgresSpool

        return PostgresSpool(
            url,
            owner=owner if exclusive else None,
            auto_migrate=auto_migrate,
            pool_size=pool_size,
            clock=clock,
        )
    raise ConfigError(
        f"ESPRELAY_SPOOL_URL: unsupported spool scheme {scheme!r}"
        " (use sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE)"
    )
