"""Authoring aid that wrote directus/snapshot.yaml (run: python directus/generate_snapshot.py).

The YAML file is the source of truth: the processor's ``schema bootstrap`` and ``schema
check`` read only the YAML. This script exists so a reviewer can see the collections of
DOMAIN.md at a glance and so the verbose Directus format (every meta and schema key, in
the order ``directus schema snapshot`` sorts them) is written consistently. Once an
organiser edits the model in Directus, replace the YAML with ``npx directus schema
snapshot directus/snapshot.yaml`` output instead of editing this script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DIRECTUS_VERSION = "11.10.0"
HERE = Path(__file__).resolve().parent

# Directus field type → (PostgreSQL data_type, interface, special).
TYPES: dict[str, tuple[str, str | None, list[str] | None]] = {
    "integer": ("integer", "input", None),
    "bigInteger": ("bigint", "input", None),
    "string": ("character varying", "input", None),
    "text": ("text", "input-multiline", None),
    "boolean": ("boolean", "boolean", ["cast-boolean"]),
    "json": ("jsonb", "input-code", ["cast-json"]),
    "timestamp": ("timestamp with time zone", "datetime", None),
    "decimal": ("numeric", "input", None),
}

STATUS_EVENT = ["draft", "live", "finished"]
STAGE_KIND = ["special", "liaison"]
START_MODE = ["gate", "scheduled"]
STAGE_STATUS = ["scheduled", "open", "closed"]
GEOFENCE_KIND = ["start", "split", "finish", "waypoint", "speed_zone", "forbidden_zone"]
ENTRY_STATUS = ["active", "withdrawn", "dsq"]
RESULT_STATUS = ["not_started", "running", "finished", "dnf"]
SEVERITY = ["info", "warning", "critical"]

# (field, type, options). Options: required, unique, default, length, precision/scale,
# m2o=(collection, on_delete), choices, note.
F = tuple[str, str, dict[str, Any]]
COLLECTIONS: dict[str, tuple[str, str, list[F]]] = {
    "device_models": (
        "memory",
        "Tracker models; each has its IO mapping table.",
        [
            ("manufacturer", "string", {"default": "Teltonika"}),
            ("model", "string", {"required": True, "unique": True, "note": "e.g. FMB920"}),
        ],
    ),
    "io_mappings": (
        "tune",
        "How each raw IO element of a model becomes a named attribute.",
        [
            ("device_model", "integer", {"required": True, "m2o": ("device_models", "CASCADE")}),
            ("io_id", "integer", {"required": True}),
            ("name", "string", {"required": True}),
            ("bytes", "integer", {"required": True, "default": 1, "note": "-1 = variable"}),
            ("signed", "boolean", {"required": True, "default": False}),
            ("multiplier", "decimal", {"required": True, "default": 1, "precision": (18, 9)}),
            ("offset", "decimal", {"required": True, "default": 0, "precision": (18, 9)}),
            ("unit", "string", {}),
            (
                "values",
                "json",
                {"note": 'Enum labels {"0": "off", "1": "on"}, or "ascii" / "hex"'},
            ),
        ],
    ),
    "devices": (
        "gps_fixed",
        "Trackers by IMEI.",
        [
            ("imei", "string", {"required": True, "unique": True, "length": 20}),
            ("device_model", "integer", {"m2o": ("device_models", "SET NULL")}),
            ("label", "string", {}),
            ("active", "boolean", {"required": True, "default": True}),
        ],
    ),
    "events": (
        "flag",
        "Races; rules is the JSON of DOMAIN.md.",
        [
            ("name", "string", {"required": True}),
            ("starts_at", "timestamp", {}),
            ("ends_at", "timestamp", {}),
            ("timezone", "string", {"default": "UTC"}),
            ("status", "string", {"required": True, "default": "draft", "choices": STATUS_EVENT}),
            ("rules", "json", {}),
        ],
    ),
    "stages": (
        "route",
        "Special stages and liaisons of an event.",
        [
            ("event", "integer", {"required": True, "m2o": ("events", "CASCADE")}),
            ("name", "string", {"required": True}),
            ("sequence", "integer", {"required": True, "default": 1}),
            ("kind", "string", {"required": True, "default": "special", "choices": STAGE_KIND}),
            ("opens_at", "timestamp", {}),
            ("closes_at", "timestamp", {}),
            ("start_mode", "string", {"required": True, "default": "gate", "choices": START_MODE}),
            (
                "status",
                "string",
                {"required": True, "default": "scheduled", "choices": STAGE_STATUS},
            ),
        ],
    ),
    "geofences": (
        "pin_drop",
        "Gates, waypoints and zones; geometry is GeoJSON.",
        [
            ("event", "integer", {"required": True, "m2o": ("events", "CASCADE")}),
            ("stage", "integer", {"m2o": ("stages", "CASCADE")}),
            ("kind", "string", {"required": True, "choices": GEOFENCE_KIND}),
            ("name", "string", {"required": True}),
            ("sequence", "integer", {"required": True, "default": 0}),
            ("geometry", "json", {"required": True, "note": "GeoJSON geometry, lon/lat"}),
            ("radius_m", "decimal", {"precision": (10, 3)}),
            ("speed_limit_kmh", "decimal", {"precision": (7, 2)}),
            ("waypoint_type", "string", {"note": "WPV, WPM, WPS, WPE, WPC, …"}),
            ("penalty_s", "integer", {}),
        ],
    ),
    "entries": (
        "sports_motorsports",
        "Competitors and the device tracking each one while valid.",
        [
            ("event", "integer", {"required": True, "m2o": ("events", "CASCADE")}),
            ("number", "integer", {"required": True}),
            ("name", "string", {}),
            ("class", "string", {}),
            ("device", "integer", {"m2o": ("devices", "SET NULL")}),
            ("valid_from", "timestamp", {}),
            ("valid_to", "timestamp", {}),
            ("status", "string", {"required": True, "default": "active", "choices": ENTRY_STATUS}),
        ],
    ),
    "start_times": (
        "schedule",
        "Scheduled start per stage and entry.",
        [
            ("stage", "integer", {"required": True, "m2o": ("stages", "CASCADE")}),
            ("entry", "integer", {"required": True, "m2o": ("entries", "CASCADE")}),
            ("scheduled_at", "timestamp", {"required": True}),
        ],
    ),
    "timing_records": (
        "timer",
        "Gate, split, waypoint and zone times (written by the processor).",
        [
            ("event", "integer", {"required": True, "m2o": ("events", "CASCADE")}),
            ("stage", "integer", {"required": True, "m2o": ("stages", "CASCADE")}),
            ("entry", "integer", {"required": True, "m2o": ("entries", "CASCADE")}),
            ("geofence", "integer", {"required": True, "m2o": ("geofences", "CASCADE")}),
            ("kind", "string", {"required": True}),
            ("pass", "integer", {"required": True, "default": 1}),
            ("ts", "timestamp", {"required": True}),
            ("before_ts", "timestamp", {}),
            ("after_ts", "timestamp", {}),
            ("method", "string", {}),
            ("distance_m", "decimal", {"precision": (12, 3)}),
            ("speed_kmh", "decimal", {"precision": (8, 2)}),
            ("confidence", "string", {}),
            ("source", "string", {"required": True, "default": "live"}),
        ],
    ),
    "penalties": (
        "gavel",
        "Penalties per stage and entry (written by the processor).",
        [
            ("stage", "integer", {"required": True, "m2o": ("stages", "CASCADE")}),
            ("entry", "integer", {"required": True, "m2o": ("entries", "CASCADE")}),
            ("geofence", "integer", {"m2o": ("geofences", "CASCADE")}),
            ("reason", "string", {"required": True}),
            ("seq", "integer", {"required": True, "default": 0}),
            ("seconds", "integer", {"required": True, "default": 0}),
            ("details", "json", {}),
        ],
    ),
    "stage_results": (
        "leaderboard",
        "Per stage and entry: times, penalties, ranks (written by the processor).",
        [
            ("stage", "integer", {"required": True, "m2o": ("stages", "CASCADE")}),
            ("entry", "integer", {"required": True, "m2o": ("entries", "CASCADE")}),
            ("status", "string", {"required": True, "choices": RESULT_STATUS}),
            ("start_ts", "timestamp", {}),
            ("finish_ts", "timestamp", {}),
            ("elapsed_ms", "bigInteger", {}),
            ("penalty_ms", "bigInteger", {"required": True, "default": 0}),
            ("total_ms", "bigInteger", {}),
            ("rank", "integer", {}),
            ("class_rank", "integer", {}),
            ("gap_ms", "bigInteger", {}),
            ("waypoints_validated", "integer", {"required": True, "default": 0}),
            ("waypoints_total", "integer", {"required": True, "default": 0}),
            ("updated_at", "timestamp", {}),
        ],
    ),
    "anomalies": (
        "warning",
        "Safety alerts (written by the processor).",
        [
            ("event", "integer", {"m2o": ("events", "CASCADE")}),
            ("entry", "integer", {"m2o": ("entries", "CASCADE")}),
            ("device_imei", "string", {"required": True, "length": 20}),
            ("kind", "string", {"required": True}),
            ("severity", "string", {"required": True, "choices": SEVERITY}),
            ("started_at", "timestamp", {"required": True}),
            ("ended_at", "timestamp", {}),
            ("details", "json", {}),
        ],
    ),
}


def collection(name: str, icon: str, note: str, sort: int) -> dict[str, Any]:
    meta = {
        "accountability": "all",
        "archive_app_filter": True,
        "archive_field": None,
        "archive_value": None,
        "collapse": "open",
        "collection": name,
        "color": None,
        "display_template": None,
        "group": None,
        "hidden": False,
        "icon": icon,
        "item_duplication_fields": None,
        "note": note,
        "preview_url": None,
        "singleton": False,
        "sort": sort,
        "sort_field": None,
        "translations": None,
        "unarchive_value": None,
        "versioning": False,
    }
    return {"collection": name, "meta": meta, "schema": {"name": name}}


def field_meta(table: str, name: str, kind: str, opts: dict[str, Any], sort: int) -> dict[str, Any]:
    _, interface, special = TYPES[kind]
    options = None
    display, display_options = None, None
    if "m2o" in opts:
        interface, special = "select-dropdown-m2o", ["m2o"]
    if "choices" in opts:
        interface = "select-dropdown"
        options = {"choices": [{"text": c, "value": c} for c in opts["choices"]]}
        display, display_options = "labels", {"choices": options["choices"]}
    return {
        "collection": table,
        "conditions": None,
        "display": display,
        "display_options": display_options,
        "field": name,
        "group": None,
        "hidden": False,
        "interface": interface,
        "note": opts.get("note"),
        "options": options,
        "readonly": False,
        "required": bool(opts.get("required")),
        "searchable": True,
        "sort": sort,
        "special": special,
        "translations": None,
        "validation": None,
        "validation_message": None,
        "width": "half" if kind not in {"json", "text"} else "full",
    }


def field_schema(table: str, name: str, kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    data_type = TYPES[kind][0]
    precision, scale = opts.get("precision", (None, None))
    if kind == "integer":
        precision, scale = 32, 0
    if kind == "bigInteger":
        precision, scale = 64, 0
    target = opts.get("m2o", (None, None))[0]
    return {
        "comment": None,
        "data_type": data_type,
        "default_value": opts.get("default"),
        "foreign_key_column": "id" if target else None,
        "foreign_key_table": target,
        "generation_expression": None,
        "has_auto_increment": False,
        "is_generated": False,
        "is_indexed": bool(target),
        "is_nullable": not opts.get("required"),
        "is_primary_key": False,
        "is_unique": bool(opts.get("unique")),
        "max_length": opts.get("length", 255) if kind == "string" else None,
        "name": name,
        "numeric_precision": precision,
        "numeric_scale": scale,
        "table": table,
    }


def id_field(table: str) -> dict[str, Any]:
    meta = field_meta(table, "id", "integer", {}, 1)
    meta.update(hidden=True, readonly=True, searchable=True)
    schema = field_schema(table, "id", "integer", {"required": True})
    schema.update(
        default_value=f"nextval('{table}_id_seq'::regclass)",
        has_auto_increment=True,
        is_primary_key=True,
        is_unique=True,
        is_indexed=True,
    )
    return {"collection": table, "field": "id", "meta": meta, "schema": schema, "type": "integer"}


def relation(table: str, name: str, target: str, on_delete: str) -> dict[str, Any]:
    return {
        "collection": table,
        "field": name,
        "meta": {
            "junction_field": None,
            "many_collection": table,
            "many_field": name,
            "one_allowed_collections": None,
            "one_collection": target,
            "one_collection_field": None,
            "one_deselect_action": "nullify",
            "one_field": None,
            "sort_field": None,
        },
        "related_collection": target,
        "schema": {
            "column": name,
            "constraint_name": f"{table}_{name}_foreign",
            "foreign_key_column": "id",
            "foreign_key_table": target,
            "on_delete": on_delete,
            "on_update": "NO ACTION",
            "table": table,
        },
    }


class _Dumper(yaml.SafeDumper):
    """Indent lists under their key, as js-yaml (used by ``directus schema snapshot``) does."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def snapshot() -> dict[str, Any]:
    collections, fields, relations = [], [], []
    for sort, (table, (icon, note, specs)) in enumerate(COLLECTIONS.items(), start=1):
        collections.append(collection(table, icon, note, sort))
        fields.append(id_field(table))
        for position, (name, kind, opts) in enumerate(specs, start=2):
            fields.append(
                {
                    "collection": table,
                    "field": name,
                    "meta": field_meta(table, name, kind, opts, position),
                    "schema": field_schema(table, name, kind, opts),
                    "type": kind,
                }
            )
            if "m2o" in opts:
                relations.append(relation(table, name, *opts["m2o"]))
    return {
        "version": 1,
        "directus": DIRECTUS_VERSION,
        "vendor": "postgres",
        "collections": sorted(collections, key=lambda c: c["collection"]),
        "fields": sorted(fields, key=lambda f: (f["collection"], f["meta"]["sort"])),
        "systemFields": [],
        "relations": sorted(relations, key=lambda r: (r["collection"], r["field"])),
    }


if __name__ == "__main__":
    text = yaml.dump(snapshot(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    (HERE / "snapshot.yaml").write_text(text, encoding="utf-8")
