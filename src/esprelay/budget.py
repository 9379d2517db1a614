"""A memory budget for large messages on their way to an ESP.

Turning a message into an API request makes several copies of it at once: the email
package's parse (the payload as text, then decoded), the JSON or multipart body, and
the HTTP client's buffers; about five to six times the message while it is built and
sent.  With hundreds of deliveries in flight, 10 MB messages would need gigabytes just
for that.  Building is CPU work under the GIL, so running many large builds at once is
no faster than running a few: :class:`ByteBudget` lets large deliveries through only
while the raw bytes of those in progress stay within a budget, in arrival order.  A
message larger than the whole budget goes through alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

#: Raw bytes of large messages being built and sent at once, per provider.
LARGE_MESSAGE_BUDGET = 32 * 1024 * 1024


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, future in self._waiters if not future.done())

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Wait until ``size`` bytes fit in the budget, hold them for the block."""
        size = max(0, min(size, self.capacity))
        if self._waiters or self.in_use + size > self.capacity:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((size, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release(size)  # granted just as we were cancelled
                else:
                    future.cancel()
                    self._grant()  # we may have been blocking those behind us
                raise
        else:
            self.in_use += size
        try:
            yield
        finally:
            self._release(size)

    def _release(self, size: int) -> None:
        self.in_use -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.in_use + size > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += size
            future.set_result(None)
