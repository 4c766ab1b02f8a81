"""directus/snapshot.yaml follows the Directus snapshot format and holds DOMAIN.md's collections."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from processor.adapters.directus_schema import (
    NATURAL_KEYS_PATH,
    SNAPSHOT_PATH,
    bootstrap_statements,
    load_schema,
)

# DOMAIN.md, "Collections (owned by Directus)": collection → key fields, and unique keys.
DOMAIN: dict[str, list[str]] = {
    "device_models": ["id", "manufacturer", "model"],
    "io_mappings": [
        "id", "device_model", "io_id", "name", "bytes", "signed", "multiplier", "offset",
        "unit", "values",
    ],
    "devices": ["id", "imei", "device_model", "label", "active"],
    "events": ["id", "name", "starts_at", "ends_at", "timezone", "status", "rules"],
    "stages": [
        "id", "event", "name", "sequence", "kind", "opens_at", "closes_at", "start_mode",
        "status",
    ],
    "geofences": [
        "id", "event", "stage", "kind", "name", "sequence", "geometry", "radius_m",
        "speed_limit_kmh", "waypoint_type", "penalty_s",
    ],
    "entries": [
        "id", "event", "number", "name", "class", "device", "valid_from", "valid_to", "status",
    ],
    "start_times": ["id", "stage", "entry", "scheduled_at"],
    "timing_records": [
        "id", "event", "stage", "entry", "geofence", "kind", "pass", "ts", "before_ts",
        "after_ts", "method", "distance_m", "speed_kmh", "confidence", "source",
    ],
    "penalties": ["id", "stage", "entry", "geofence", "reason", "seconds", "details", "seq"],
    "stage_results": [
        "id", "stage", "entry", "status", "start_ts", "finish_ts", "elapsed_ms", "penalty_ms",
        "total_ms", "rank", "class_rank", "gap_ms", "waypoints_validated", "waypoints_total",
        "updated_at",
    ],
    "anomalies": [
        "id", "event", "entry", "device_imei", "kind", "severity", "started_at", "ended_at",
        "details",
    ],
}  # fmt: skip
DOMAIN_UNIQUE = {
    ("device_models", ("model",)),
    ("devices", ("imei",)),
    ("io_mappings", ("device_model", "io_id")),
    ("start_times", ("stage", "entry")),
    ("timing_records", ("stage", "entry", "geofence", "kind", "pass")),
    ("penalties", ("stage", "entry", "reason", "geofence", "seq")),
    ("stage_results", ("stage", "entry")),
    ("anomalies", ("device_imei", "kind", "started_at")),
}
JSON_FIELDS = {"values", "rules", "geometry", "details"}
TIME_FIELDS = {
    "starts_at", "ends_at", "opens_at", "closes_at", "valid_from", "valid_to", "scheduled_at",
    "ts", "before_ts", "after_ts", "start_ts", "finish_ts", "updated_at", "started_at", "ended_at",
}  # fmt: skip
M2O = {
    "device_model": "device_models",
    "device": "devices",
    "event": "events",
    "stage": "stages",
    "entry": "entries",
    "geofence": "geofences",
}
# Directus field types (@directus/constants TYPES) and what PostgreSQL calls them.
DIRECTUS_TYPES = {
    "bigInteger": "bigint",
    "boolean": "boolean",
    "dateTime": "timestamp without time zone",
    "decimal": "numeric",
    "float": "real",
    "integer": "integer",
    "json": "jsonb",
    "string": "character varying",
    "text": "text",
    "timestamp": "timestamp with time zone",
    "uuid": "uuid",
}
FIELD_META_KEYS = {
    "collection", "conditions", "display", "display_options", "field", "group", "hidden",
    "interface", "note", "options", "readonly", "required", "sort", "special", "translations",
    "validation", "validation_message", "width",
}  # fmt: skip
FIELD_SCHEMA_KEYS = {
    "data_type", "default_value", "foreign_key_column", "foreign_key_table",
    "generation_expression", "has_auto_increment", "is_generated", "is_indexed", "is_nullable",
    "is_primary_key", "is_unique", "max_length", "name", "numeric_precision", "numeric_scale",
    "table",
}  # fmt: skip


@pytest.fixture(scope="module")
def snap() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SNAPSHOT_PATH.read_text(encoding="utf-8"))
    return data


def fields_of(snap: dict[str, Any], collection: str) -> dict[str, dict[str, Any]]:
    return {f["field"]: f for f in snap["fields"] if f["collection"] == collection}


def test_header_is_a_version_1_postgres_snapshot_of_directus_11(snap: dict[str, Any]) -> None:
    assert list(snap) == [
        "version", "directus", "vendor", "collections", "fields", "systemFields", "relations",
    ]  # fmt: skip
    assert snap["version"] == 1
    assert str(snap["directus"]).startswith("11.")
    assert snap["vendor"] == "postgres"


def test_collections_are_exactly_those_of_domain_md(snap: dict[str, Any]) -> None:
    names = [c["collection"] for c in snap["collections"]]
    assert names == sorted(DOMAIN), "directus schema snapshot sorts collections by name"
    assert "positions" not in names
    assert "position_attributes" not in names


def test_each_collection_has_directus_meta_and_a_schema_of_its_name(snap: dict[str, Any]) -> None:
    for item in snap["collections"]:
        assert set(item) == {"collection", "meta", "schema"}
        assert item["meta"]["collection"] == item["collection"]
        assert item["schema"] == {"name": item["collection"]}  # apply validates exactly this
        assert item["meta"]["singleton"] is False


@pytest.mark.parametrize("collection", sorted(DOMAIN))
def test_every_key_field_of_domain_md_is_a_field(snap: dict[str, Any], collection: str) -> None:
    fields = fields_of(snap, collection)
    assert set(DOMAIN[collection]) <= set(fields), set(DOMAIN[collection]) - set(fields)


def test_fields_follow_the_snapshot_field_format(snap: dict[str, Any]) -> None:
    for item in snap["fields"]:
        where = f"{item['collection']}.{item['field']}"
        assert set(item) == {"collection", "field", "type", "meta", "schema"}, where
        assert item["type"] in DIRECTUS_TYPES, where
        assert set(item["meta"]) >= FIELD_META_KEYS, where
        assert set(item["schema"]) >= FIELD_SCHEMA_KEYS, where
        assert item["meta"]["collection"] == item["schema"]["table"] == item["collection"], where
        assert item["meta"]["field"] == item["schema"]["name"] == item["field"], where
        assert item["schema"]["data_type"] == DIRECTUS_TYPES[item["type"]], where


def test_fields_are_sorted_by_collection_then_sort(snap: dict[str, Any]) -> None:
    keys = [(f["collection"], f["meta"]["sort"]) for f in snap["fields"]]
    assert keys == sorted(keys)


def test_ids_are_auto_increment_integer_primary_keys(snap: dict[str, Any]) -> None:
    for collection in DOMAIN:
        schema = fields_of(snap, collection)["id"]["schema"]
        assert schema["is_primary_key"], collection
        assert schema["has_auto_increment"], collection
        assert schema["default_value"] == f"nextval('{collection}_id_seq'::regclass)"


def test_geometry_and_other_structures_are_json_and_times_are_timestamptz(
    snap: dict[str, Any],
) -> None:
    for item in snap["fields"]:
        if item["field"] in JSON_FIELDS:
            assert item["type"] == "json", item["field"]
            assert item["meta"]["special"] == ["cast-json"]
        if item["field"] in TIME_FIELDS:
            assert item["type"] == "timestamp", item["field"]


def test_every_reference_is_an_m2o_relation_with_a_foreign_key(snap: dict[str, Any]) -> None:
    relations = {(r["collection"], r["field"]): r for r in snap["relations"]}
    references = [(f["collection"], f["field"]) for f in snap["fields"] if f["field"] in M2O]
    assert sorted(relations) == sorted(references)
    for (collection, field), relation in relations.items():
        target = M2O[field]
        assert relation["related_collection"] == target
        assert relation["meta"]["many_collection"] == collection
        assert relation["meta"]["one_collection"] == target
        assert relation["schema"]["foreign_key_table"] == target
        assert relation["schema"]["constraint_name"] == f"{collection}_{field}_foreign"
        item = fields_of(snap, collection)[field]
        assert item["meta"]["special"] == ["m2o"]
        assert item["schema"]["foreign_key_table"] == target
        assert item["type"] == "integer"


def test_unique_keys_are_those_of_domain_md() -> None:
    schema = load_schema()
    assert {(k.table, k.columns) for k in schema.unique_keys} == DOMAIN_UNIQUE


def test_natural_keys_file_names_only_snapshot_columns() -> None:
    keys = yaml.safe_load(NATURAL_KEYS_PATH.read_text(encoding="utf-8"))
    assert all(len(item["columns"]) > 1 for item in keys)


def test_bootstrap_ddl_is_generated_from_the_snapshot() -> None:
    statements = bootstrap_statements(load_schema())
    creates = [s for s in statements if s.startswith("CREATE TABLE")]
    assert len(creates) == len(DOMAIN)
    assert any('"offset" numeric(18, 9) NOT NULL DEFAULT 0' in s for s in creates)
    assert any('"imei" character varying(20) NOT NULL CONSTRAINT' in s for s in creates)
    fks = [s for s in statements if "FOREIGN KEY" in s]
    assert len(fks) == len(yaml.safe_load(SNAPSHOT_PATH.read_text())["relations"])


def test_snapshot_is_what_the_authoring_script_writes() -> None:
    path = Path(SNAPSHOT_PATH).with_name("generate_snapshot.py")
    spec = importlib.util.spec_from_file_location("generate_snapshot", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert yaml.safe_load(SNAPSHOT_PATH.read_text(encoding="utf-8")) == module.snapshot()
