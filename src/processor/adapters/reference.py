"""Reference data in PostgreSQL: IO mapping seeds, devices, and the course file.

The course file (DOMAIN.md, "Course file and offline replay") is one event's configuration
as JSON. :func:`import_course` upserts it by natural keys, creating devices that are
missing; :func:`export_course` writes the same shape back with ids, in a stable order, so
import → export → import → export is byte-identical. Files are parsed here, with errors
that name the file and line (:class:`ReferenceFileError`); the CLI turns those into exit 2.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import asyncpg
import orjson

from processor.core.attributes import IoElement

DATA_DIR = Path(__file__).resolve().parents[3] / "data"
IO_CSV = DATA_DIR / "io-elements-fmb.csv"
SEEDED_MODELS: tuple[tuple[str, str], ...] = (("Teltonika", "FMB920"), ("Teltonika", "FMC130"))
IO_CSV_HEADER = ("io_id", "name", "bytes", "signed", "multiplier", "unit", "values")
IMEI: Final = re.compile(r"[0-9]{15}")
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# The choices of the snapshot's select fields; defaults are those of the replay parser, so
# an imported course behaves live as the same file does in `processor replay`.
EVENT_STATUS: Final = ("draft", "live", "finished")
STAGE_KIND: Final = ("special", "liaison")
START_MODE: Final = ("gate", "scheduled")
STAGE_STATUS: Final = ("scheduled", "open", "closed")
GEOFENCE_KIND: Final = ("start", "split", "finish", "waypoint", "speed_zone", "forbidden_zone")
ENTRY_STATUS: Final = ("active", "withdrawn", "dsq")


class ReferenceFileError(Exception):
    """A reference file is missing or malformed; the message names the file and line."""


def read_io_csv(path: Path = IO_CSV) -> list[IoElement]:
    """Parse the FMB/FMC IO element table into mapping elements."""
    rows = _read_csv(path, IO_CSV_HEADER)
    elements = []
    for line, row in rows:
        try:
            elements.append(_io_element(row))
        except (ValueError, KeyError) as exc:
            raise ReferenceFileError(f"{path}:{line}: {exc}") from exc
    return elements


def _io_element(row: dict[str, str]) -> IoElement:
    signed = row["signed"].strip().lower()
    if signed not in {"true", "false"}:
        raise ValueError(f"signed must be true or false, got {row['signed']!r}")
    return IoElement.from_row(
        int(row["io_id"]),
        row["name"].strip(),
        size=int(row["bytes"]),
        signed=signed == "true",
        multiplier=float(row["multiplier"] or 1),
        offset=float(row.get("offset") or 0),
        unit=row["unit"].strip() or None,
        values=_csv_values(row["values"].strip()),
    )


def _csv_values(text: str) -> object:
    """``0=off;1=on`` → labels, ``ascii``/``hex`` as is; a range note like ``0..5`` → none."""
    if not text or "=" not in text:
        return text if text in {"ascii", "hex"} else None
    labels = {}
    for pair in text.split(";"):
        key, _, label = pair.partition("=")
        labels[str(int(key))] = label.strip()
    return labels


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows with their line numbers; the header must name every required column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ReferenceFileError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceFileError(f"{path}: cannot read: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    missing = [name for name in required if name not in (reader.fieldnames or [])]
    if missing:
        raise ReferenceFileError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
    rows = []
    for row in reader:
        if None in row or any(value is None for value in row.values()):
            raise ReferenceFileError(f"{path}:{reader.line_num}: wrong number of columns")
        rows.append((reader.line_num, row))
    return rows


# --- IO mapping seeds ----------------------------------------------------------------------


async def seed_io_mappings(
    conn: asyncpg.Connection,
    elements: Sequence[IoElement],
    models: Sequence[tuple[str, str]] = SEEDED_MODELS,
) -> int:
    """Add the device models and the IO mapping rows they lack; return the rows added.

    Rows already there are left alone: an organiser's corrections in Directus win.
    """
    async with conn.transaction():
        before = await conn.fetchval("SELECT count(*) FROM io_mappings")
        for manufacturer, model in models:
            model_id = await _ensure_device_model(conn, manufacturer, model)
            await conn.executemany(
                """
                INSERT INTO io_mappings
                    (device_model, io_id, name, bytes, signed, multiplier, "offset", unit, "values")
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)
                ON CONFLICT (device_model, io_id) DO NOTHING
                """,
                [_mapping_row(model_id, element) for element in elements],
            )
        after = await conn.fetchval("SELECT count(*) FROM io_mappings")
    return int(after - before)


async def _ensure_device_model(conn: asyncpg.Connection, manufacturer: str, model: str) -> int:
    existing = await conn.fetchval("SELECT id FROM device_models WHERE model = $1", model)
    if existing is not None:
        return int(existing)
    inserted = await conn.fetchval(
        "INSERT INTO device_models (manufacturer, model) VALUES ($1, $2)"
        " ON CONFLICT (model) DO NOTHING RETURNING id",
        manufacturer,
        model,
    )
    return int(
        inserted or await conn.fetchval("SELECT id FROM device_models WHERE model = $1", model)
    )


def _mapping_row(model_id: int, element: IoElement) -> tuple[object, ...]:
    values = element.values_json()
    return (
        model_id,
        element.io_id,
        element.name,
        element.size,
        element.signed,
        Decimal(str(element.multiplier)),
        Decimal(str(element.offset)),
        element.unit,
        None if values is None else orjson.dumps(values).decode(),
    )


# --- devices -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One line of a devices CSV (``imei,model,label``)."""

    line: int
    imei: str
    model: str | None
    label: str | None


def read_devices_csv(path: Path) -> list[DeviceRow]:
    """Parse a devices CSV; an IMEI is 15 digits, model and label may be empty."""
    devices = []
    seen: dict[str, int] = {}
    for line, row in _read_csv(path, ("imei", "model", "label")):
        imei = row["imei"].strip()
        if not IMEI.fullmatch(imei):
            raise ReferenceFileError(f"{path}:{line}: imei must be 15 digits, got {imei!r}")
        if imei in seen:
            raise ReferenceFileError(f"{path}:{line}: imei {imei} repeats line {seen[imei]}")
        seen[imei] = line
        devices.append(
            DeviceRow(line, imei, row["model"].strip() or None, row["label"].strip() or None)
        )
    return devices


async def import_devices(conn: asyncpg.Connection, devices: Sequence[DeviceRow], path: Path) -> int:
    """Upsert devices by IMEI (model and label updated); return how many rows were written."""
    models = {
        row["model"]: row["id"] for row in await conn.fetch("SELECT id, model FROM device_models")
    }
    for device in devices:
        if device.model is not None and device.model not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ReferenceFileError(
                f"{path}:{device.line}: unknown model {device.model!r} (known: {known})"
            )
    async with conn.transaction():
        await conn.executemany(
            """
            INSERT INTO devices (imei, device_model, label) VALUES ($1, $2, $3)
            ON CONFLICT (imei) DO UPDATE
                SET device_model = EXCLUDED.device_model, label = EXCLUDED.label
            """,
            [(d.imei, models.get(d.model) if d.model else None, d.label) for d in devices],
        )
    return len(devices)


# --- course file ---------------------------------------------------------------------------


class CourseFormatError(ValueError):
    """A course file's content is invalid; the message starts with the JSON path."""


@dataclass(frozen=True, slots=True)
class EventIn:
    name: str
    starts_at: datetime | None
    ends_at: datetime | None
    timezone: str | None
    status: str
    rules: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StageIn:
    name: str
    sequence: int
    kind: str
    opens_at: datetime | None
    closes_at: datetime | None
    start_mode: str
    status: str


@dataclass(frozen=True, slots=True)
class GeofenceIn:
    stage: str | None  # stage name
    kind: str
    name: str
    sequence: int
    geometry: Mapping[str, Any]
    radius_m: float | None
    speed_limit_kmh: float | None
    waypoint_type: str | None
    penalty_s: int | None


@dataclass(frozen=True, slots=True)
class EntryIn:
    number: int
    name: str | None
    klass: str | None
    imei: str | None
    valid_from: datetime | None
    valid_to: datetime | None
    status: str


@dataclass(frozen=True, slots=True)
class StartTimeIn:
    stage: str  # stage name
    entry: int  # entry number
    scheduled_at: datetime


@dataclass(frozen=True, slots=True)
class CourseIn:
    """A validated course file, references resolved to natural keys (names, numbers)."""

    event: EventIn
    stages: tuple[StageIn, ...]
    geofences: tuple[GeofenceIn, ...]
    entries: tuple[EntryIn, ...]
    start_times: tuple[StartTimeIn, ...]


def read_course(path: Path) -> CourseIn:
    """Read and validate a course file; errors name the file and the line or JSON path."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ReferenceFileError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ReferenceFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ReferenceFileError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
        ) from exc
    try:
        return parse_course(data)
    except CourseFormatError as exc:
        raise ReferenceFileError(f"{path}: {exc}") from exc


def parse_course(data: object) -> CourseIn:
    """Validate a decoded course file (DOMAIN.md) and resolve its internal references."""
    top = _obj(data, "course")
    stages_raw = _items(top.get("stages", []), "stages")
    stages = tuple(_stage(item, i) for i, item in enumerate(stages_raw))
    _distinct([s.name for s in stages], "stages", "name")
    stage_ref = _refs(stages_raw, [s.name for s in stages], "name")
    entries_raw = _items(top.get("entries", []), "entries")
    entries = tuple(_entry(item, f"entries[{i}]") for i, item in enumerate(entries_raw))
    _distinct([e.number for e in entries], "entries", "number")
    entry_ref = _refs(entries_raw, [e.number for e in entries], "number")
    return CourseIn(
        event=_event(_obj(top.get("event"), "event")),
        stages=stages,
        geofences=_geofences(top.get("geofences"), stage_ref),
        entries=entries,
        start_times=tuple(
            _start_time(item, f"start_times[{i}]", stage_ref, entry_ref)
            for i, item in enumerate(_items(top.get("start_times", []), "start_times"))
        ),
    )


def _refs(items: Sequence[Mapping[str, Any]], keys: Sequence[Any], natural: str) -> dict[Any, Any]:
    """File-local references → natural key: by the item's ``id`` and by the key itself."""
    refs: dict[Any, Any] = {key: key for key in keys}
    refs.update({item["id"]: key for item, key in zip(items, keys, strict=True) if "id" in item})
    return refs


def _event(item: Mapping[str, Any]) -> EventIn:
    return EventIn(
        name=_str(item.get("name"), "event.name"),
        starts_at=_time(item.get("starts_at"), "event.starts_at"),
        ends_at=_time(item.get("ends_at"), "event.ends_at"),
        timezone=_opt_str(item.get("timezone"), "event.timezone"),
        status=_choice(item.get("status"), EVENT_STATUS, "live", "event.status"),
        rules=_obj(item.get("rules") or {}, "event.rules"),
    )


def _stage(item: Mapping[str, Any], index: int) -> StageIn:
    where = f"stages[{index}]"
    return StageIn(
        name=_str(item.get("name"), f"{where}.name"),
        sequence=_int(item.get("sequence", index + 1), f"{where}.sequence"),
        kind=_choice(item.get("kind"), STAGE_KIND, "special", f"{where}.kind"),
        opens_at=_time(item.get("opens_at"), f"{where}.opens_at"),
        closes_at=_time(item.get("closes_at"), f"{where}.closes_at"),
        start_mode=_choice(item.get("start_mode"), START_MODE, "gate", f"{where}.start_mode"),
        status=_choice(item.get("status"), STAGE_STATUS, "open", f"{where}.status"),
    )


def _geofences(value: object, stage_ref: Mapping[Any, str]) -> tuple[GeofenceIn, ...]:
    if value is None:
        return ()
    collection = _obj(value, "geofences")
    if collection.get("type") != "FeatureCollection":
        raise CourseFormatError("geofences: must be a GeoJSON FeatureCollection")
    features = _items(collection.get("features", []), "geofences.features")
    out = tuple(_geofence(f, f"geofences.features[{i}]", stage_ref) for i, f in enumerate(features))
    _distinct([(g.stage, g.name) for g in out], "geofences", "name per stage")
    return out


def _geofence(feature: Mapping[str, Any], where: str, stage_ref: Mapping[Any, str]) -> GeofenceIn:
    props = _obj(feature.get("properties") or {}, f"{where}.properties")
    geometry = _obj(feature.get("geometry"), f"{where}.geometry")
    if not isinstance(geometry.get("type"), str) or "coordinates" not in geometry:
        raise CourseFormatError(f"{where}.geometry: must be a GeoJSON geometry")
    stage = props.get("stage")
    if stage is not None and stage not in stage_ref:
        raise CourseFormatError(f"{where}.properties.stage: no stage with id or name {stage!r}")
    penalty = props.get("penalty_s")
    return GeofenceIn(
        stage=None if stage is None else stage_ref[stage],
        kind=_choice(props.get("kind"), GEOFENCE_KIND, None, f"{where}.properties.kind"),
        name=_str(props.get("name"), f"{where}.properties.name"),
        sequence=_int(props.get("sequence", 0), f"{where}.properties.sequence"),
        geometry=geometry,
        radius_m=_number(props.get("radius_m"), f"{where}.properties.radius_m"),
        speed_limit_kmh=_number(
            props.get("speed_limit_kmh"), f"{where}.properties.speed_limit_kmh"
        ),
        waypoint_type=_opt_str(props.get("waypoint_type"), f"{where}.properties.waypoint_type"),
        penalty_s=None if penalty is None else _int(penalty, f"{where}.properties.penalty_s"),
    )


def _entry(item: Mapping[str, Any], where: str) -> EntryIn:
    imei = item.get("imei")
    if isinstance(imei, int) and not isinstance(imei, bool):
        imei = str(imei)
    if imei is not None and not (isinstance(imei, str) and IMEI.fullmatch(imei)):
        raise CourseFormatError(f"{where}.imei: must be 15 digits, got {imei!r}")
    return EntryIn(
        number=_int(item.get("number"), f"{where}.number"),
        name=_opt_str(item.get("name"), f"{where}.name"),
        klass=_opt_str(item.get("class"), f"{where}.class"),
        imei=imei,
        valid_from=_time(item.get("valid_from"), f"{where}.valid_from"),
        valid_to=_time(item.get("valid_to"), f"{where}.valid_to"),
        status=_choice(item.get("status"), ENTRY_STATUS, "active", f"{where}.status"),
    )


def _start_time(
    item: Mapping[str, Any], where: str, stage_ref: Mapping[Any, str], entry_ref: Mapping[Any, int]
) -> StartTimeIn:
    stage = item.get("stage")
    if stage not in stage_ref:
        raise CourseFormatError(f"{where}.stage: no stage with id or name {stage!r}")
    number = item.get("entry_number")
    entry = entry_ref.get(item.get("entry")) if number is None else number
    if entry not in entry_ref.values():
        shown = item.get("entry") if number is None else number
        raise CourseFormatError(f"{where}.entry: no entry with id or number {shown!r}")
    scheduled = _time(item.get("scheduled_at"), f"{where}.scheduled_at")
    if scheduled is None:
        raise CourseFormatError(f"{where}.scheduled_at: is required")
    return StartTimeIn(stage_ref[stage], int(entry), scheduled)  # type: ignore[arg-type]


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CourseFormatError(f"{where}: must be an object")
    return value


def _items(value: object, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        raise CourseFormatError(f"{where}: must be a list")
    return [_obj(item, f"{where}[{index}]") for index, item in enumerate(value)]


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise CourseFormatError(f"{where}: is required (a string)")
    return value


def _opt_str(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise CourseFormatError(f"{where}: must be a string, got {value!r}")
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CourseFormatError(f"{where}: must be an integer, got {value!r}")
    return value


def _number(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CourseFormatError(f"{where}: must be a number, got {value!r}")
    return float(value)


def _choice(value: object, choices: Sequence[str], default: str | None, where: str) -> str:
    if value is None and default is not None:
        return default
    if value not in choices:
        raise CourseFormatError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _time(value: object, where: str) -> datetime | None:
    """ISO 8601 (a time without offset is UTC) or milliseconds since the epoch."""
    if value is None:
        return None
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return EPOCH + timedelta(milliseconds=value)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise CourseFormatError(f"{where}: not a time: {value!r}") from exc
    raise CourseFormatError(f"{where}: must be ISO 8601 or milliseconds, got {value!r}")


def _distinct(keys: Sequence[object], where: str, what: str) -> None:
    seen: set[object] = set()
    for key in keys:
        if key in seen:
            raise CourseFormatError(f"{where}: {what} {key!r} is used twice")
        seen.add(key)


# --- course import -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What a course import wrote."""

    event_id: int
    stages: int
    geofences: int
    entries: int
    start_times: int
    devices_created: int


async def import_course(conn: asyncpg.Connection, course: CourseIn) -> ImportSummary:
    """Upsert a course by natural keys in one transaction; devices missing are created.

    Keys: the event by name, stages by name within the event, geofences by (stage, name),
    entries by number, start times by (stage, entry), devices by IMEI. Nothing is deleted.
    """
    async with conn.transaction():
        event_id = await _upsert_event(conn, course.event)
        stage_ids = {s.name: await _upsert_stage(conn, event_id, s) for s in course.stages}
        for geofence in course.geofences:
            stage_id = None if geofence.stage is None else stage_ids[geofence.stage]
            await _upsert_geofence(conn, event_id, stage_id, geofence)
        created = await _ensure_devices(conn, {e.imei for e in course.entries if e.imei})
        entry_ids = {e.number: await _upsert_entry(conn, event_id, e) for e in course.entries}
        await conn.executemany(
            """
            INSERT INTO start_times (stage, entry, scheduled_at) VALUES ($1, $2, $3)
            ON CONFLICT (stage, entry) DO UPDATE SET scheduled_at = EXCLUDED.scheduled_at
            """,
            [(stage_ids[t.stage], entry_ids[t.entry], t.scheduled_at) for t in course.start_times],
        )
    return ImportSummary(
        event_id,
        len(course.stages),
        len(course.geofences),
        len(course.entries),
        len(course.start_times),
        created,
    )


async def _upsert(
    conn: asyncpg.Connection, table: str, key: Mapping[str, object], values: Mapping[str, object]
) -> int:
    """Update the row matching ``key`` (lowest id first) or insert one; return its id.

    ``key`` columns are compared with IS NOT DISTINCT FROM, so a NULL stage matches NULL.
    Only the importer writes these tables by natural key, inside one transaction.
    """
    where = " AND ".join(f'"{c}" IS NOT DISTINCT FROM ${i}' for i, c in enumerate(key, 1))
    found = await conn.fetchval(
        f'SELECT id FROM "{table}" WHERE {where} ORDER BY id LIMIT 1', *key.values()
    )
    columns = {**key, **values}
    if found is not None:
        sets = ", ".join(f'"{c}" = ${i}' for i, c in enumerate(values, 2))
        await conn.execute(f'UPDATE "{table}" SET {sets} WHERE id = $1', found, *values.values())
        return int(found)
    names = ", ".join(f'"{c}"' for c in columns)
    slots = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return int(
        await conn.fetchval(
            f'INSERT INTO "{table}" ({names}) VALUES ({slots}) RETURNING id', *columns.values()
        )
    )


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


async def _upsert_event(conn: asyncpg.Connection, event: EventIn) -> int:
    values = {
        "starts_at": event.starts_at,
        "ends_at": event.ends_at,
        "timezone": event.timezone,
        "status": event.status,
        "rules": _json(event.rules),
    }
    return await _upsert(conn, "events", {"name": event.name}, values)


async def _upsert_stage(conn: asyncpg.Connection, event_id: int, stage: StageIn) -> int:
    values = {
        "sequence": stage.sequence,
        "kind": stage.kind,
        "opens_at": stage.opens_at,
        "closes_at": stage.closes_at,
        "start_mode": stage.start_mode,
        "status": stage.status,
    }
    return await _upsert(conn, "stages", {"event": event_id, "name": stage.name}, values)


async def _upsert_geofence(
    conn: asyncpg.Connection, event_id: int, stage_id: int | None, geofence: GeofenceIn
) -> int:
    values = {
        "kind": geofence.kind,
        "sequence": geofence.sequence,
        "geometry": _json(geofence.geometry),
        "radius_m": _decimal(geofence.radius_m),
        "speed_limit_kmh": _decimal(geofence.speed_limit_kmh),
        "waypoint_type": geofence.waypoint_type,
        "penalty_s": geofence.penalty_s,
    }
    key = {"event": event_id, "stage": stage_id, "name": geofence.name}
    return await _upsert(conn, "geofences", key, values)


async def _upsert_entry(conn: asyncpg.Connection, event_id: int, entry: EntryIn) -> int:
    device = None
    if entry.imei:
        device = await conn.fetchval("SELECT id FROM devices WHERE imei = $1", entry.imei)
    values = {
        "name": entry.name,
        "class": entry.klass,
        "device": device,
        "valid_from": entry.valid_from,
        "valid_to": entry.valid_to,
        "status": entry.status,
    }
    return await _upsert(conn, "entries", {"event": event_id, "number": entry.number}, values)


async def _ensure_devices(conn: asyncpg.Connection, imeis: set[str]) -> int:
    """Create the devices a course names but the database lacks; return how many."""
    if not imeis:
        return 0
    rows = await conn.fetch(
        "INSERT INTO devices (imei) SELECT unnest($1::text[])"
        " ON CONFLICT (imei) DO NOTHING RETURNING id",
        sorted(imeis),
    )
    return len(rows)


def _decimal(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(repr(value))


# --- course export -------------------------------------------------------------------------


class EventNotFoundError(LookupError):
    """No event with the requested id."""


async def export_course(conn: asyncpg.Connection, event_id: int) -> dict[str, Any]:
    """The course file of one event, with database ids, in a stable order."""
    event = await conn.fetchrow(
        "SELECT id, name, starts_at, ends_at, timezone, status, rules::text FROM events"
        " WHERE id = $1",
        event_id,
    )
    if event is None:
        raise EventNotFoundError(f"no event with id {event_id}")
    stages = await conn.fetch(
        "SELECT id, name, sequence, kind, opens_at, closes_at, start_mode, status FROM stages"
        " WHERE event = $1 ORDER BY sequence, id",
        event_id,
    )
    geofences = await conn.fetch(
        "SELECT id, stage, kind, name, sequence, geometry::text, radius_m, speed_limit_kmh,"
        " waypoint_type, penalty_s FROM geofences WHERE event = $1 ORDER BY id",
        event_id,
    )
    entries = await conn.fetch(
        'SELECT e.id, e.number, e.name, e."class", d.imei, e.valid_from, e.valid_to, e.status'
        " FROM entries e LEFT JOIN devices d ON d.id = e.device"
        " WHERE e.event = $1 ORDER BY e.number, e.id",
        event_id,
    )
    start_times = await conn.fetch(
        "SELECT t.id, t.stage, t.entry, t.scheduled_at FROM start_times t"
        " JOIN stages s ON s.id = t.stage WHERE s.event = $1 ORDER BY t.stage, t.entry",
        event_id,
    )
    return {
        "event": {**_plain(event, exclude="rules"), "rules": orjson.loads(event["rules"] or "{}")},
        "stages": [_plain(row) for row in stages],
        "geofences": {
            "type": "FeatureCollection",
            "features": [_feature(row) for row in geofences],
        },
        "entries": [_plain(row) for row in entries],
        "start_times": [_plain(row) for row in start_times],
    }


def dump_course(course: Mapping[str, Any]) -> bytes:
    """The course file's bytes: indented JSON, sorted keys, a final newline."""
    return orjson.dumps(course, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def _feature(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": orjson.loads(row["geometry"]),
        "properties": _plain(row, exclude="geometry"),
    }


def _plain(row: asyncpg.Record, exclude: str = "") -> dict[str, Any]:
    return {key: _value(value) for key, value in row.items() if key != exclude}


def _value(value: object) -> object:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Decimal):
        return float(value)
    return value


def format_time(value: datetime) -> str:
    """ISO 8601 UTC with milliseconds, as every processor output writes times."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
