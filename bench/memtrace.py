"""Resident memory of a process over a run, split by phase.

``VmHWM`` says how high a server's memory went, not when: while messages were still
arriving (DATA held in memory, spool writes) or while they were delivered (bodies read
back, requests built and sent).  :class:`RssTrace` samples ``VmRSS`` on a thread and
keeps the highest figure of each phase, which :meth:`mark` ends.
"""

from __future__ import annotations

import threading
from pathlib import Path

#: Seconds between samples: a 10 MB message arrives in a few of them on loopback.
INTERVAL = 0.02


def rss_mb(pid: int) -> float:
    """The process's resident memory now, in MB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssTrace:
    """Sample ``pid``'s RSS from :meth:`start` to :meth:`stop`; :attr:`peaks` holds the
    highest sample of each phase, in order (the first begins at :meth:`start`)."""

    def __init__(self, pid: int, *, interval: float = INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.peaks: list[float] = [0.0]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-trace", daemon=True)

    def start(self) -> RssTrace:
        self._thread.start()
        return self

    def mark(self) -> None:
        """End the current phase (its last sample taken now) and begin the next."""
        self._take()
        self.peaks.append(0.0)

    def stop(self) -> list[float]:
        self._done.set()
        self._thread.join()
        self._take()
        return self.peaks

    def _take(self) -> None:
        self.peaks[-1] = max(self.peaks[-1], rss_mb(self.pid))

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self._take()
