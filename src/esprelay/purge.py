"""Retention: forget delivered and failed messages once they are old enough.

Every :data:`PURGE_INTERVAL` seconds the spool drops the delivered messages older than
``ESPRELAY_DELIVERED_RETENTION`` and the failed ones older than
``ESPRELAY_FAILED_RETENTION``; both may change on SIGHUP, so they are asked for anew
each time.  A purge that fails is logged and tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from esprelay.spool import Spool

log = logging.getLogger("esprelay")

PURGE_INTERVAL = 600.0


async def purge_forever(spool: Spool, retention: Callable[[], tuple[float, float]]) -> None:
    """Purge ``spool`` until cancelled; ``retention()`` is (delivered, failed) in seconds."""
    while True:
        now = time.time()
        try:
            delivered, failed = retention()
            removed = await spool.purge(
                delivered_before=now - delivered, failed_before=now - failed
            )
        except Exception:
            log.exception("spool purge failed")
        else:
            if removed:
                log.info("purged %d finished message(s) past their retention", removed)
        await asyncio.sleep(PURGE_INTERVAL)
