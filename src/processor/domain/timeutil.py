"""Millisecond timestamps: ISO 8601 in and out, without reading any clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MS: Final = -62_135_596_800_000  # 0001-01-01T00:00:00.000Z
MAX_MS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class TimeFormatError(ValueError):
    """A time value that is neither milliseconds nor ISO 8601."""


def parse_iso_ms(text: str) -> int:
    """Parse ISO 8601 text to milliseconds since the epoch; naive times are UTC."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise TimeFormatError(f"not an ISO 8601 time: {text!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_time_ms(value: object) -> int:
    """Accept integer milliseconds, a digit string of milliseconds or ISO 8601 text."""
    if isinstance(value, bool):
        raise TimeFormatError(f"not a time: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        return parse_iso_ms(stripped)
    raise TimeFormatError(f"not a time: {value!r}")


def format_ms(ms: int) -> str:
    """Format milliseconds as ISO 8601 UTC with milliseconds (``2024-06-01T12:00:00.000Z``).

    Values outside the years 1–9999 (only a broken device clock produces them) are printed
    as the plain integer so that output never fails.
    """
    if not MIN_MS <= ms <= MAX_MS:
        return str(ms)
    moment = _EPOCH + timedelta(milliseconds=ms)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def format_opt(ms: int | None) -> str | None:
    """:func:`format_ms` that passes ``None`` through."""
    return None if ms is None else format_ms(ms)
