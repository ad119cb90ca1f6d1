"""Durations as people write them: 30s, 15m, 24h, 7d, 2w, or a bare number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | int | float, allow_infinite: bool = False) -> float:
    """Seconds in `text`; compound forms such as 1h30m work. NaN is never a duration;
    infinity only where `allow_infinite` (a reorder window that sorts everything). Raises
    ValueError."""
    value = _parse(text)
    if math.isnan(value):
        raise ValueError(f"duration {text!r} is not a number")
    if math.isinf(value) and not allow_infinite:
        raise ValueError(f"duration {text!r} is not finite")
    return value


def _parse(text: str | int | float) -> float:
    if isinstance(text, bool):
        raise ValueError(f"duration {text!r} is a boolean")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration {text} is negative")
        return float(text)
    s = str(text).strip().lower()
    if not s:
        raise ValueError("empty duration")
    try:
        value = float(s)
    except ValueError:
        pos, total = 0, 0.0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ValueError(
                f"duration {text!r} is not of the form 30s, 15m, 24h, 7d (or a number of seconds)"
            ) from None
        return total
    if value < 0:
        raise ValueError(f"duration {text} is negative")
    return value


def format_duration(seconds: float) -> str:
    """A short human form: 9 days, 3.5 hours, 12 minutes, 40 seconds."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds / size
            text = f"{n:.0f}" if n >= 10 else f"{n:.1f}".removesuffix(".0")
            return f"{text} {unit}{'' if text == '1' else 's'}"
    return f"{seconds:.0f} second{'' if round(seconds) == 1 else 's'}"
