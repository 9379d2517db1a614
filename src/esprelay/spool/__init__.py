"""Durable spools: the embedded SQLite one, selected by ``ESPRELAY_SPOOL_URL``."""

from __future__ import annotations

from esprelay.errors import ConfigError
from esprelay.spool.base import NewPart, Spool, SpoolStats, new_message_id

__all__ = ["NewPart", "Spool", "SpoolStats", "new_message_id", "open_spool"]


def open_spool(url: str, *, exclusive: bool = False) -> Spool:
    """Build (not yet open) the spool named by ``url``.

    ``exclusive`` is for ``serve``: the process that owns the spool and delivers
    from it.  Admin commands open it shared.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from esprelay.spool.sqlite import SqliteSpool, path_from_url

        return SqliteSpool(path_from_url(url), exclusive=exclusive)
    raise ConfigError(
        f"ESPRELAY_SPOOL_URL: unsupported spool scheme {scheme!r} (use sqlite:///PATH)"
    )
