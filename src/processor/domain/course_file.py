"""Parse a course file (DOMAIN.md) into a :class:`~processor.domain.model.Course`.

Ids are kept when present (a database export has them) and generated deterministically
when absent: after the largest integer id, in list order. Geofences and start times may
refer to a stage by id or by name, start times to an entry by id (``entry``) or by number
(``entry_number``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from processor.domain.geometry import polygon_rings
from processor.domain.model import (
    GATE_KINDS,
    GEOFENCE_KINDS,
    ZONE_KINDS,
    Course,
    CourseError,
    Entry,
    Event,
    Geofence,
    Id,
    Rules,
    Stage,
    StartTime,
    ids_in_order,
    time_or_none,
    unique,
)

_STAGE_KINDS = ("special", "liaison")
_START_MODES = ("gate", "scheduled")
_STAGE_STATUSES = ("scheduled", "open", "closed")
_ENTRY_STATUSES = ("active", "withdrawn", "dsq")


def course_from_dict(data: Mapping[str, Any]) -> Course:
    """Validate a course file and build the course."""
    if not isinstance(data, Mapping):
        raise CourseError("course: must be a JSON object")
    event = _event(_mapping(data.get("event", {}), "event"))
    stages = _stages(_list(data.get("stages", []), "stages"))
    geofences = _geofences(data.get("geofences"), stages)
    entries = _entries(_list(data.get("entries", []), "entries"))
    start_times = _start_times(_list(data.get("start_times", []), "start_times"), stages, entries)
    return Course(event, stages, geofences, entries, start_times)


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CourseError(f"{where}: must be an object")
    return cast(Mapping[str, Any], value)


def _list(value: object, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        raise CourseError(f"{where}: must be a list")
    return [_mapping(item, f"{where}[{index}]") for index, item in enumerate(value)]


def _choice(value: object, choices: Sequence[str], default: str, where: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise CourseError(f"{where}: must be one of {', '.join(choices)}, got {value!r}")
    return cast(str, value)


def _int(value: object, where: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CourseError(f"{where}: must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise CourseError(f"{where}: must be an integer, got {value!r}")
    return int(value)


def _opt_number(value: object, where: str, positive: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CourseError(f"{where}: must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise CourseError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _opt_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise CourseError(f"{where}: must be a string, got {value!r}")
    return value


def _event(data: Mapping[str, Any]) -> Event:
    event_id = data.get("id", 1)
    if isinstance(event_id, bool) or not isinstance(event_id, int | str):
        raise CourseError(f"event.id: must be an integer or a string, got {event_id!r}")
    return Event(
        id=event_id,
        name=_opt_str(data.get("name"), "event.name") or "",
        rules=Rules.from_dict(data.get("rules"), "event.rules"),
        starts_at=time_or_none(data.get("starts_at"), "event.starts_at"),
        ends_at=time_or_none(data.get("ends_at"), "event.ends_at"),
        timezone=_opt_str(data.get("timezone"), "event.timezone"),
        status=_opt_str(data.get("status"), "event.status") or "live",
    )


def _stages(items: list[Mapping[str, Any]]) -> tuple[Stage, ...]:
    ids = ids_in_order(items)
    unique(ids, "stages")
    stages = []
    for index, (stage_id, item) in enumerate(zip(ids, items, strict=True)):
        where = f"stages[{index}]"
        stage = Stage(
            id=stage_id,
            name=_opt_str(item.get("name"), f"{where}.name") or f"Stage {index + 1}",
            sequence=_int(item.get("sequence"), f"{where}.sequence", default=index + 1),
            kind=cast(Any, _choice(item.get("kind"), _STAGE_KINDS, "special", f"{where}.kind")),
            opens_at=time_or_none(item.get("opens_at"), f"{where}.opens_at"),
            closes_at=time_or_none(item.get("closes_at"), f"{where}.closes_at"),
            start_mode=cast(
                Any, _choice(item.get("start_mode"), _START_MODES, "gate", f"{where}.start_mode")
            ),
            status=cast(
                Any, _choice(item.get("status"), _STAGE_STATUSES, "open", f"{where}.status")
            ),
        )
        stages.append(stage)
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise CourseError("stages: stage names must be unique (replay output names stages)")
    return tuple(stages)


def _stage_ref(value: object, stages: Sequence[Stage], where: str) -> Id:
    for stage in stages:
        if stage.id == value:
            return stage.id
    for stage in stages:
        if stage.name == value:
            return stage.id
    raise CourseError(f"{where}: no stage with id or name {value!r}")


def _geofences(value: object, stages: Sequence[Stage]) -> tuple[Geofence, ...]:
    if value is None:
        return ()
    collection = _mapping(value, "geofences")
    if collection.get("type") != "FeatureCollection":
        raise CourseError("geofences: must be a GeoJSON FeatureCollection")
    features = _list(collection.get("features", []), "geofences.features")
    props = [
        {**_mapping(f.get("properties") or {}, f"geofences.features[{i}].properties")}
        for i, f in enumerate(features)
    ]
    for feature, prop in zip(features, props, strict=True):
        if prop.get("id") is None and feature.get("id") is not None:
            prop["id"] = feature["id"]
    ids = ids_in_order(props)
    unique(ids, "geofences")
    out = []
    for index, (feature, prop, geofence_id) in enumerate(zip(features, props, ids, strict=True)):
        out.append(_geofence(feature, prop, geofence_id, stages, f"geofences.features[{index}]"))
    _check_names(out)
    return tuple(out)


def _geofence(
    feature: Mapping[str, Any],
    prop: Mapping[str, Any],
    geofence_id: Id,
    stages: Sequence[Stage],
    where: str,
) -> Geofence:
    kind = _choice(prop.get("kind"), sorted(GEOFENCE_KINDS), "", f"{where}.properties.kind")
    if not kind:
        raise CourseError(f"{where}.properties.kind: is required")
    stage_ref = prop.get("stage")
    geofence = Geofence(
        id=geofence_id,
        kind=kind,
        name=_opt_str(prop.get("name"), f"{where}.properties.name") or f"{kind} {geofence_id}",
        geometry=_mapping(feature.get("geometry"), f"{where}.geometry"),
        stage=None if stage_ref is None else _stage_ref(stage_ref, stages, f"{where}.stage"),
        sequence=_int(prop.get("sequence"), f"{where}.properties.sequence", default=0),
        radius_m=_opt_number(prop.get("radius_m"), f"{where}.properties.radius_m", True),
        speed_limit_kmh=_opt_number(prop.get("speed_limit_kmh"), f"{where}.properties.speed"),
        waypoint_type=_opt_str(prop.get("waypoint_type"), f"{where}.properties.waypoint_type"),
        penalty_s=_opt_number(prop.get("penalty_s"), f"{where}.properties.penalty_s"),
    )
    _check_geometry(geofence, where)
    return geofence


def _check_geometry(geofence: Geofence, where: str) -> None:
    geometry = geofence.geometry
    kind = geofence.kind
    expected = (
        ("LineString",)
        if kind in GATE_KINDS
        else ("Point",)
        if kind == "waypoint"
        else ("Polygon", "MultiPolygon")
    )
    if geometry.get("type") not in expected:
        raise CourseError(f"{where}.geometry: a {kind} must be a {' or '.join(expected)}")
    coordinates = geometry.get("coordinates")
    if not isinstance(coordinates, list) or not _nested(coordinates, _DEPTH[geometry["type"]]):
        raise CourseError(
            f"{where}.geometry.coordinates: not the nesting of a GeoJSON {geometry['type']}"
        )
    try:
        points = list(_coordinates(coordinates))
    except (TypeError, ValueError) as exc:
        raise CourseError(f"{where}.geometry.coordinates: {exc}") from exc
    minimum = 2 if kind in GATE_KINDS else 1 if kind == "waypoint" else 3
    if len(points) < minimum or (
        kind in ZONE_KINDS and not polygon_rings(geometry["type"], coordinates)
    ):
        raise CourseError(f"{where}.geometry: too few coordinates for a {kind}")
    if kind == "waypoint" and geofence.radius_m is None:
        raise CourseError(f"{where}.properties.radius_m: a waypoint needs a radius")
    if kind == "speed_zone" and geofence.speed_limit_kmh is None:
        raise CourseError(f"{where}.properties.speed_limit_kmh: a speed zone needs a limit")


# How many list levels sit above a position ([lon, lat]) in each geometry type.
_DEPTH = {"Point": 0, "LineString": 1, "Polygon": 2, "MultiPolygon": 3}


def _nested(value: object, depth: int) -> bool:
    """Whether ``value`` is ``depth`` levels of non-empty lists around positions."""
    if not isinstance(value, list) or not value:
        return False
    if depth == 0:
        return len(value) >= 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
    return all(_nested(item, depth - 1) for item in value)


def _coordinates(value: object) -> list[tuple[float, float]]:
    """Flatten GeoJSON coordinates to (lon, lat) pairs, checking ranges."""
    if not isinstance(value, list):
        raise TypeError("must be a list")
    if len(value) >= 2 and all(isinstance(v, int | float) for v in value[:2]):
        lon, lat = float(value[0]), float(value[1])
        if not (math.isfinite(lon) and math.isfinite(lat)):
            raise ValueError("coordinates must be finite")
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise ValueError(f"[{lon}, {lat}] is not a [lon, lat] in range")
        return [(lon, lat)]
    out: list[tuple[float, float]] = []
    for item in value:
        out.extend(_coordinates(item))
    return out


def _check_names(geofences: Sequence[Geofence]) -> None:
    seen: set[tuple[Id | None, str]] = set()
    for geofence in geofences:
        key = (geofence.stage, geofence.name)
        if key in seen:
            raise CourseError(
                f"geofences: name {geofence.name!r} is used twice on one stage"
                " (replay output names geofences)"
            )
        seen.add(key)


def _entries(items: list[Mapping[str, Any]]) -> tuple[Entry, ...]:
    ids = ids_in_order(items)
    unique(ids, "entries")
    entries = []
    for index, (entry_id, item) in enumerate(zip(ids, items, strict=True)):
        where = f"entries[{index}]"
        imei = item.get("imei")
        if isinstance(imei, int) and not isinstance(imei, bool):
            imei = str(imei)
        entries.append(
            Entry(
                id=entry_id,
                number=_int(item.get("number"), f"{where}.number"),
                name=_opt_str(item.get("name"), f"{where}.name") or "",
                klass=_opt_str(item.get("class"), f"{where}.class"),
                imei=_opt_str(imei, f"{where}.imei"),
                valid_from=time_or_none(item.get("valid_from"), f"{where}.valid_from"),
                valid_to=time_or_none(item.get("valid_to"), f"{where}.valid_to"),
                status=cast(
                    Any, _choice(item.get("status"), _ENTRY_STATUSES, "active", f"{where}.status")
                ),
            )
        )
    numbers = [entry.number for entry in entries]
    if len(set(numbers)) != len(numbers):
        raise CourseError("entries: entry numbers must be unique")
    return tuple(entries)


def _start_times(
    items: list[Mapping[str, Any]], stages: Sequence[Stage], entries: Sequence[Entry]
) -> tuple[StartTime, ...]:
    ids = ids_in_order(items)
    out = []
    seen: set[tuple[Id, Id]] = set()
    for index, (start_id, item) in enumerate(zip(ids, items, strict=True)):
        where = f"start_times[{index}]"
        stage = _stage_ref(item.get("stage"), stages, f"{where}.stage")
        entry = _entry_ref(item, entries, where)
        scheduled = time_or_none(item.get("scheduled_at"), f"{where}.scheduled_at")
        if scheduled is None:
            raise CourseError(f"{where}.scheduled_at: is required")
        if (stage, entry) in seen:
            raise CourseError(f"{where}: a second start time for the same stage and entry")
        seen.add((stage, entry))
        out.append(StartTime(start_id, stage, entry, scheduled))
    return tuple(out)


def _entry_ref(item: Mapping[str, Any], entries: Sequence[Entry], where: str) -> Id:
    if item.get("entry_number") is not None:
        number = item["entry_number"]
        for entry in entries:
            if entry.number == number:
                return entry.id
        raise CourseError(f"{where}.entry_number: no entry number {number!r}")
    value = item.get("entry")
    for entry in entries:
        if entry.id == value:
            return entry.id
    raise CourseError(f"{where}.entry: no entry with id {value!r}")


__all__ = ["course_from_dict"]
