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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

import orjson

from processor.domain.model import IoValue, Position
from processor.domain.timeutil import MAX_MS, MIN_MS, TimeFormatError, parse_iso_ms

if TYPE_CHECKING:
    from _csv import Reader

COLUMNS: Final = (
    "imei", "ts", "lat", "lon", "alt", "angle", "sat", "speed",
    "priority", "event_io", "received_at", "io",
)  # fmt: skip
REQUIRED: Final = frozenset({"imei", "ts", "lat", "lon"})
MAX_U64: Final = 2**64 - 1
_EMPTY_IO: Final = frozenset({"", "{}"})


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
        yield from _rows(reader)
    except csv.Error as exc:  # e.g. an unterminated quote swallowing the file
        raise PositionsError(reader.line_num, None, f"not CSV: {exc}") from exc


def _rows(reader: Reader) -> Iterator[Position]:
    try:
        header = next(reader)
    except StopIteration:
        raise PositionsError(1, None, "the file is empty (expected a header)") from None
    index = _header(header)
    width = len(header)
    # An absent column reads the empty string appended after the row's own fields.
    picks = tuple(index.get(name, width) for name in COLUMNS)
    for row in reader:
        if len(row) != width:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            raise PositionsError(
                reader.line_num, None, f"{len(row)} fields, the header has {width}"
            )
        row.append("")
        yield _position([row[i] for i in picks], reader.line_num)


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


def _position(values: list[str], line: int) -> Position:
    """A row's position: the common shape fast, anything else through :func:`_careful`."""
    imei, ts, lat, lon, alt, angle, sat, speed, priority, event_io, received, io = values
    try:
        y = float(lat)
        x = float(lon)
        t = int(ts)
        r = int(received)
        if not (
            -90.0 <= y <= 90.0
            and -180.0 <= x <= 180.0
            and MIN_MS <= t <= MAX_MS
            and MIN_MS <= r <= MAX_MS
            and imei
            and imei == imei.strip()
        ):
            raise ValueError(line)  # let the careful path say what is wrong
        return Position(
            imei, t, y, x, int(alt), int(angle), int(sat), int(speed), int(priority),
            int(event_io), r, _io(io, line),
        )  # fmt: skip
    except ValueError:
        return _careful(values, line)


def _careful(values: list[str], line: int) -> Position:
    """Parse a row field by field: empty optional fields, ISO times, precise errors."""
    imei, ts_text, lat, lon, alt, angle, sat, speed, priority, event_io, received, io = values
    imei = imei.strip()
    if not imei:
        raise PositionsError(line, "imei", "is empty")
    ts = _time(ts_text, line, "ts")
    return Position(
        imei,
        ts,
        _coordinate(lat, line, "lat", 90.0),
        _coordinate(lon, line, "lon", 180.0),
        _int(alt, line, "alt"),
        _int(angle, line, "angle"),
        _int(sat, line, "sat"),
        _int(speed, line, "speed"),
        _int(priority, line, "priority"),
        _int(event_io, line, "event_io"),
        _time(received, line, "received_at") if received.strip() else ts,
        _io(io, line),
    )


def _time(text: str, line: int, column: str) -> int:
    try:
        ms = int(text)
    except ValueError:
        try:
            ms = parse_iso_ms(text)
        except TimeFormatError as exc:
            message = f"not milliseconds or ISO 8601: {text!r}"
            raise PositionsError(line, column, message) from exc
    if not MIN_MS <= ms <= MAX_MS:
        raise PositionsError(line, column, f"{ms} is outside the years 1-9999")
    return ms


def _int(text: str, line: int, column: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        if not text.strip():
            return 0
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
    if text in _EMPTY_IO or not text.strip():
        return {}
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PositionsError(line, "io", f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PositionsError(line, "io", "must be a JSON object of IO id to value")
    out: dict[int, IoValue] = {}
    for key, raw in data.items():
        io_id = int(key) if key.isdigit() and len(key) <= 5 else -1
        if not 0 <= io_id <= 65535:
            raise PositionsError(line, "io", f"IO id {key!r} is not an integer 0-65535")
        if type(raw) is int and 0 <= raw <= MAX_U64:
            out[io_id] = raw
        else:
            out[io_id] = _io_value(raw, line, key)
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
