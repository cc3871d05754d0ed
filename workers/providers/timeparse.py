"""Parse the time formats providers put in rate-limit headers and bodies.

Go durations (``6m0s``, ``2m59.56s``, ``20ms``, ``1h2m``), protobuf durations (``"47s"``,
``"1.5s"``), plain seconds (``"2"``, ``"0.5"``), RFC 3339 timestamps
(``2025-08-21T12:40:59Z``) and HTTP dates (``Wed, 21 Oct 2015 07:28:00 GMT``).
Every parser returns None for a value it cannot read; it never raises.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from email.utils import parsedate_to_datetime

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration_s(text: str | None) -> float | None:
    """Seconds in a Go/protobuf duration (``1m30.5s``) or a bare number of seconds."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def parse_rfc3339_s(text: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (``Z`` or an offset; fractions allowed)."""
    if not text:
        return None
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def parse_http_date_s(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def parse_retry_after_s(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a ``retry-after`` value: a number of seconds or an HTTP date."""
    if value is None:
        return None
    seconds = parse_duration_s(value)
    if seconds is not None:
        return seconds
    moment = parse_http_date_s(value)
    return None if moment is None else max(0.0, moment - now_s)
