"""Shared scaffolding for the error-mapping tests of the HTTP providers.

One esprelay process, one fake ESP, four messages told apart by their Subject; the
fake answers each case from its own script (then success), and remembers when each
request came so the waits can be checked from below (never from above).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from esprelay.testing.fakeesp import Recorded, Reply, Responder


@dataclass
class Cases:
    """``respond`` answers a request with the next scripted reply of its case."""

    subject_of: Callable[[Recorded], str]
    success: Responder
    scripts: dict[str, list[Reply]]
    seen: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def respond(self, request: Recorded) -> Reply:
        case = self.subject_of(request).removeprefix("case ")
        with self._lock:
            self.seen.setdefault(case, []).append(time.monotonic())
            script = self.scripts.get(case, [])
            reply = script.pop(0) if script else None
        return reply if reply is not None else self.success(request)

    def calls(self, case: str) -> int:
        with self._lock:
            return len(self.seen.get(case, []))

    def gap(self, case: str) -> float:
        """Seconds between the first and the second request of a case."""
        with self._lock:
            first, second = self.seen[case][:2]
        return second - first


def case_message(case: str) -> bytes:
    return (
        f"From: app@example.com\r\nTo: ops@example.org\r\nSubject: case {case}\r\n"
        f"\r\nerror case {case}\r\n"
    ).encode()
