"""Small readers the event sources share: JSON bodies, times, status codes, timestamps."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from esprelay.events.model import Rejected, malformed

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY_CODE = re.compile(r"^\s*([245])\d\d\b")


def json_body(body: bytes) -> Any:
    """The request body as JSON; 400 when it is not."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise malformed("the body is not JSON") from None


def json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise malformed(f"{what} is not a JSON object")
    return value


def text(value: Any) -> str | None:
    """A JSON string (or number) as text; None for anything else or an empty string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float):
        return str(value)
    return None


def epoch(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 time; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(_iso(value)).timestamp()
        except ValueError:
            return None
    return None


def _iso(value: str) -> str:
    """ISO 8601 as Python reads it: at most six digits of a second (Postmark sends seven)."""
    return re.sub(r"(\.\d{6})\d+", r"\1", value.strip())


def enhanced_status(*texts: str | None) -> str | None:
    """The first RFC 3463 code in ``texts`` (``5.1.1``), else the class of the first SMTP
    reply code found (``550 ...`` gives ``5.0.0``), else None."""
    for item in texts:
        if item:
            match = _ENHANCED.search(item)
            if match:
                return match.group(0)
    for item in texts:
        if item:
            match = _REPLY_CODE.match(item)
            if match:
                return f"{match.group(1)}.0.0"
    return None


def header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value else None


def check_timestamp(timestamp: str | None, now: float, tolerance: float) -> float:
    """A signed timestamp (seconds since the epoch) within ``tolerance`` of ``now``.

    403 ``stale`` when it is older or further in the future than that: a captured
    request cannot be replayed after the window, whatever else it carries.
    """
    if timestamp is None:
        raise Rejected(403, "signature", "no timestamp")
    try:
        value = float(timestamp.strip())
    except ValueError:
        raise Rejected(403, "signature", "the timestamp is not a number") from None
    if not math.isfinite(value) or abs(now - value) > tolerance:
        raise Rejected(403, "stale", f"timestamp {int(value) if math.isfinite(value) else value}")
    return value
