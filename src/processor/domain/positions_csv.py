"""Parse ``positions.csv`` (DOMAIN.md) into positions, naming line and column of any error.

Header ``imei,ts,lat,lon,alt,angle,sat,speed,priority,event_io,received_at,io`` (any
order; ``imei``, ``ts``, ``lat``, ``lon`` required, the rest optional). ``ts`` and
``received_at`` are milliseconds or ISO 8601 (naive = UTC); an empty ``received_at``
means ``ts``. ``io`` is a JSON object of IO id → unsigned integer, ``{"$bigint": "…"}``
or ``{"$bytes": "<base64>"}``, and may be empty.
"""

from __future__ import annotations

import base64
import binascii
import csv
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Final

import orjson

from processor.domain.model import IoValue, Position
from processor.domain.timeutil import MAX_MS, MIN_MS, TimeFormatError, parse_iso_ms

COLUMNS: Final = (
    "imei", "ts", "lat", "lon", "alt", "angle", "sat", "speed",
    "priority", "event_io", "received_at", "io",
)  # fmt: skip
REQUIRED: Final = frozenset({"imei", "ts", "lat", "lon"})
MAX_U64: Final = 2**64 - 1


class PositionsError(ValueError):
    """A malformed positions file; ``line`` is 1-based (the header is line 1)."""

    def __init__(self, line: int, column: str | None, message: str) -> None:
        where = f"line {line}" + (f", column {column!r}" if column else "")
        super().__init__(f"{where}: {message}")
        self.line = line
        self.column = column


def parse_positions(lines: Iterable[str]) -> list[Position]:
    """All positions of a CSV text (an iterable of lines, e.g. an open file)."""
    return list(iter_positions(lines))


def iter_positions(lines: Iterable[str]) -> Iterator[Position]:
    """Positions one by one; raises :class:`PositionsError` at the first bad row."""
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise PositionsError(1, None, "the file is empty (expected a header)") from None
    index = _header(header)
    width = len(header)
    columns = {name: _getter(index.get(name)) for name in COLUMNS}
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            raise PositionsError(line, None, f"{len(row)} fields, the header has {width}")
        yield _position(row, columns, line)


def _getter(i: int | None) -> Callable[[list[str]], str]:
    """Read column ``i`` of a row; an absent column reads as empty."""
    if i is None:
        return lambda _row: ""
    return lambda row: row[i]


def _header(header: list[str]) -> dict[str, int]:
    names = [name.strip().lstrip("\ufeff") for name in header]
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        raise PositionsError(1, unknown[0], f"unknown column; expected {','.join(COLUMNS)}")
    if len(set(names)) != len(names):
        raise PositionsError(1, None, "a column is named twice")
    missing = sorted(REQUIRED - set(names))
    if missing:
        raise PositionsError(1, missing[0], "required column is missing")
    return {name: i for i, name in enumerate(names)}


def _position(row: list[str], col: dict[str, Callable[[list[str]], str]], line: int) -> Position:
    imei = col["imei"](row).strip()
    if not imei:
        raise PositionsError(line, "imei", "is empty")
    ts = _time(col["ts"](row), line, "ts")
    received = col["received_at"](row)
    return Position(
        imei=imei,
        ts=ts,
        lat=_coordinate(col["lat"](row), line, "lat", 90.0),
        lon=_coordinate(col["lon"](row), line, "lon", 180.0),
        alt=_int(col["alt"](row), line, "alt"),
        angle=_int(col["angle"](row), line, "angle"),
        sat=_int(col["sat"](row), line, "sat"),
        speed=_int(col["speed"](row), line, "speed"),
        priority=_int(col["priority"](row), line, "priority"),
        event_io=_int(col["event_io"](row), line, "event_io"),
        received_at=_time(received, line, "received_at") if received.strip() else ts,
        io=_io(col["io"](row), line),
    )


def _time(text: str, line: int, column: str) -> int:
    value = text.strip()
    try:
        ms = int(value) if value.lstrip("-").isdigit() else parse_iso_ms(value)
    except TimeFormatError as exc:
        raise PositionsError(line, column, f"not milliseconds or ISO 8601: {text!r}") from exc
    if not MIN_MS <= ms <= MAX_MS:
        raise PositionsError(line, column, f"{ms} is outside the years 1-9999")
    return ms


def _int(text: str, line: int, column: str) -> int:
    value = text.strip()
    if not value:
        return 0
    try:
        return int(value)
    except ValueError as exc:
        raise PositionsError(line, column, f"not an integer: {text!r}") from exc


def _coordinate(text: str, line: int, column: str, bound: float) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise PositionsError(line, column, f"not a number: {text!r}") from exc
    if not math.isfinite(value) or abs(value) > bound:
        raise PositionsError(line, column, f"{text!r} is outside ±{bound:g} degrees")
    return value


def _io(text: str, line: int) -> dict[int, IoValue]:
    value = text.strip()
    if not value:
        return {}
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise PositionsError(line, "io", f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PositionsError(line, "io", "must be a JSON object of IO id to value")
    out: dict[int, IoValue] = {}
    for key, raw in data.items():
        if not key.isdigit() or int(key) > 65535:
            raise PositionsError(line, "io", f"IO id {key!r} is not an integer 0-65535")
        out[int(key)] = _io_value(raw, line, key)
    return out


def _io_value(raw: object, line: int, key: str) -> IoValue:
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= MAX_U64:
        return raw
    if isinstance(raw, dict) and len(raw) == 1:
        if isinstance(raw.get("$bigint"), str) and raw["$bigint"].isdigit():
            number = int(raw["$bigint"])
            if number <= MAX_U64:
                return number
        if isinstance(raw.get("$bytes"), str):
            try:
                return base64.b64decode(raw["$bytes"], validate=True)
            except binascii.Error:
                pass
    raise PositionsError(line, "io", f"IO {key}: not an unsigned integer or sentinel: {raw!r}")
