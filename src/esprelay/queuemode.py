"""Queue mode: the spool, the delivery workers that drain it, and what hangs off them.

With ``ESPRELAY_DELIVERY_MODE=queue`` a message is answered ``250`` once it is in the
spool; :class:`QueueMode` owns what happens after that: the :class:`Deliverer` that
leases and delivers it, the :class:`~esprelay.failures.FailureNotifier` that bounces a
message failed for good, and the retention purge (:mod:`esprelay.purge`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx

from esprelay.backoff import RetryPolicy
from esprelay.config import Settings
from esprelay.delivery import Deliverer, OutcomeHook
from esprelay.dispatch import ProviderSet
from esprelay.failures import FailureNotifier
from esprelay.purge import purge_forever
from esprelay.spool import open_spool


class QueueMode:
    """The spool, its delivery workers, their failure notices and the retention purge."""

    def __init__(
        self,
        settings: Settings,
        *,
        owner: str,
        client: httpx.AsyncClient,
        providers: ProviderSet,
        default_chain: tuple[str, ...],
        retention: Callable[[], tuple[float, float]],
        on_outcome: OutcomeHook,
    ) -> None:
        """``retention()`` is (delivered, failed) in seconds, asked for at each purge."""
        self.spool = open_spool(
            settings.spool_url,
            exclusive=True,
            owner=owner,
            auto_migrate=settings.spool_auto_migrate,
            pool_size=settings.spool_pool_size,
        )
        self.notifier = FailureNotifier(
            spool=self.spool,
            client=client,
            hostname=settings.hostname,
            bounce_mode=settings.bounce_mode,
            bounce_from=settings.bounce_from,
            webhook_url=settings.failure_webhook_url,
            default_chain=default_chain,
            wake=lambda: self.deliverer.wake(),
        )
        self.deliverer = Deliverer(
            self.spool,
            providers,
            default_chain=default_chain,
            owner=owner,
            concurrency=settings.delivery_concurrency,
            memory_budget=settings.delivery_memory,
            lease_time=settings.lease_time,
            poll_interval=settings.poll_interval,
            policy=RetryPolicy(
                retry_initial=settings.retry_initial,
                retry_max=settings.retry_max,
                retry_config_error=settings.retry_config_error,
                max_queue_lifetime=settings.max_queue_lifetime,
            ),
            on_failed=self.notifier.on_failed,
            on_outcome=on_outcome,
        )
        self._retention = retention
        self._purge_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.spool.open()

    def start(self) -> None:
        """Deliver from the spool, and purge it."""
        self.deliverer.start()
        self._purge_task = asyncio.create_task(
            purge_forever(self.spool, self._retention), name="esprelay-purge"
        )

    def set_default_chain(self, chain: tuple[str, ...]) -> None:
        """The providers for messages spooled without a chain (a routes reload)."""
        self.deliverer.set_default_chain(chain)
        self.notifier.default_chain = chain

    async def stop(self, grace: float) -> None:
        """Stop purging and delivering; give deliveries and notices ``grace`` seconds."""
        if self._purge_task is not None:
            self._purge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge_task
        await self.deliverer.stop(grace=grace)
        await self.notifier.wait(timeout=grace or 1.0)

    async def close(self) -> None:
        await self.spool.close()
