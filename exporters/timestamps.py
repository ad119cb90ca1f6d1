"""Event times as alert lines write them."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339_millis(ts: float) -> str:
    """Epoch seconds to `2024-05-01T12:00:00.123Z` (ECS `@timestamp` style)."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
