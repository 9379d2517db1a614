"""Connection and error limits shared by every listener of one bridge."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Guards:
    """Limits and shared counters of one bridge (all listeners together)."""

    max_connections: int = 200
    max_connections_per_client: int = 20
    max_errors: int = 10
    data_timeout: float = 600.0
    junk_command_limit: int = 100
    max_session_seconds: float = 1800.0  # 0: no limit
    total: int = 0
    per_client: collections.Counter[str] = field(default_factory=collections.Counter)
