"""The Directus-owned schema: read from the snapshot, created for development, checked at start.

Directus owns the business tables (ARCHITECTURE.md rule 2). Their one definition is
``directus/snapshot.yaml`` (the format ``npx directus schema snapshot`` writes) plus
``directus/natural-keys.yaml``, the composite unique keys a snapshot cannot carry.
:func:`bootstrap` creates the same tables from those files on a database without Directus;
:func:`check_schema` lists, one line each, every table, column, type and unique key the
processor relies on that the database lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import yaml

DIRECTUS_DIR: Final = Path(__file__).resolve().parents[3] / "directus"
SNAPSHOT_PATH: Final = DIRECTUS_DIR / "snapshot.yaml"
NATURAL_KEYS_PATH: Final = DIRECTUS_DIR / "natural-keys.yaml"

# Directus field type → PostgreSQL data types the processor can work with.
COMPATIBLE: Final[Mapping[str, frozenset[str]]] = {
    "integer": frozenset({"integer", "bigint"}),
    "bigInteger": frozenset({"bigint"}),
    "string": frozenset({"character varying", "text"}),
    "text": frozenset({"text", "character varying"}),
    "boolean": frozenset({"boolean"}),
    "json": frozenset({"jsonb", "json"}),
    "timestamp": frozenset({"timestamp with time zone"}),
    "decimal": frozenset({"numeric"}),
    "float": frozenset({"real", "double precision", "numeric"}),
}
_BOOTSTRAP_LOCK: Final = 7_311_500_401  # pg_advisory_xact_lock key: one bootstrap at a time


class SchemaFileError(Exception):
    """The snapshot or natural-keys file is missing or not in the expected format."""


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a collection that has a database column."""

    table: str
    name: str
    type: str
    data_type: str
    nullable: bool = True
    primary: bool = False
    unique: bool = False
    indexed: bool = False
    auto_increment: bool = False
    default: object = None
    max_length: int | None = None
    precision: int | None = None
    scale: int | None = None


@dataclass(frozen=True, slots=True)
class ForeignKey:
    """A many-to-one relation: ``table.column`` references ``target.target_column``."""

    table: str
    column: str
    target: str
    target_column: str
    constraint: str
    on_delete: str
    on_update: str


@dataclass(frozen=True, slots=True)
class UniqueKey:
    """A unique key the processor upserts on (``ON CONFLICT``)."""

    table: str
    columns: tuple[str, ...]
    nulls_not_distinct: bool = False

    @property
    def index_name(self) -> str:
        """The index name bootstrap gives it (Directus style, under 63 characters)."""
        return f"{self.table}_{'_'.join(self.columns)}_unique"[:63]


@dataclass(frozen=True, slots=True)
class DirectusSchema:
    """The tables, columns, relations and unique keys of the Directus collections."""

    tables: Mapping[str, tuple[Column, ...]]
    foreign_keys: tuple[ForeignKey, ...]
    unique_keys: tuple[UniqueKey, ...]


def load_schema(
    snapshot_path: Path = SNAPSHOT_PATH, natural_keys_path: Path = NATURAL_KEYS_PATH
) -> DirectusSchema:
    """Read the snapshot and the natural keys into a :class:`DirectusSchema`."""
    snapshot = load_snapshot(snapshot_path)
    columns = _columns(snapshot)
    tables = {name: tuple(c for c in columns if c.table == name) for name in _tables(snapshot)}
    single = [UniqueKey(c.table, (c.name,)) for c in columns if c.unique and not c.primary]
    composite = _natural_keys(_read_yaml(natural_keys_path), tables)
    return DirectusSchema(tables, _foreign_keys(snapshot), (*single, *composite))


def load_snapshot(path: Path = SNAPSHOT_PATH) -> dict[str, Any]:
    """The snapshot as a dictionary, after checking its header and sections."""
    data = _read_yaml(path)
    if not isinstance(data, dict) or data.get("version") != 1:
        raise SchemaFileError(f"{path}: not a Directus schema snapshot (version: 1)")
    if data.get("vendor") != "postgres":
        raise SchemaFileError(f"{path}: vendor must be postgres, got {data.get('vendor')!r}")
    for section in ("collections", "fields", "relations"):
        if not isinstance(data.get(section), list):
            raise SchemaFileError(f"{path}: {section} must be a list")
    return data


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SchemaFileError(f"{path}: no such file") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise SchemaFileError(f"{path}: {exc}") from exc


def _tables(snapshot: Mapping[str, Any]) -> list[str]:
    return [item["schema"]["name"] for item in snapshot["collections"] if item.get("schema")]


def _columns(snapshot: Mapping[str, Any]) -> list[Column]:
    """Fields with a database column (alias fields such as o2m have ``schema: null``)."""
    return [_column(item) for item in snapshot["fields"] if item.get("schema")]


def _column(item: Mapping[str, Any]) -> Column:
    schema = item["schema"]
    try:
        return Column(
            table=item["collection"],
            name=item["field"],
            type=item["type"],
            data_type=schema["data_type"],
            nullable=schema.get("is_nullable", True),
            primary=schema.get("is_primary_key", False),
            unique=schema.get("is_unique", False),
            indexed=schema.get("is_indexed", False),
            auto_increment=schema.get("has_auto_increment", False),
            default=schema.get("default_value"),
            max_length=schema.get("max_length"),
            precision=schema.get("numeric_precision"),
            scale=schema.get("numeric_scale"),
        )
    except KeyError as exc:
        where = f"{item.get('collection')}.{item.get('field')}"
        raise SchemaFileError(f"snapshot field {where}: lacks {exc}") from exc


def _foreign_keys(snapshot: Mapping[str, Any]) -> tuple[ForeignKey, ...]:
    keys = []
    for item in snapshot["relations"]:
        schema = item.get("schema")
        if not schema or not item.get("related_collection"):
            continue
        keys.append(
            ForeignKey(
                table=schema["table"],
                column=schema["column"],
                target=schema["foreign_key_table"],
                target_column=schema["foreign_key_column"],
                constraint=schema["constraint_name"],
                on_delete=schema.get("on_delete") or "NO ACTION",
                on_update=schema.get("on_update") or "NO ACTION",
            )
        )
    return tuple(keys)


def _natural_keys(data: Any, tables: Mapping[str, Sequence[Column]]) -> list[UniqueKey]:
    if not isinstance(data, list):
        raise SchemaFileError("natural keys: expected a list of {table, columns}")
    keys = []
    for item in data:
        table, columns = item.get("table"), tuple(item.get("columns") or ())
        known = {column.name for column in tables.get(table, ())}
        if not columns or not set(columns) <= known:
            raise SchemaFileError(f"natural key {table} {columns}: not columns of the snapshot")
        keys.append(UniqueKey(table, columns, bool(item.get("nulls_not_distinct"))))
    return keys


# --- bootstrap -----------------------------------------------------------------------------


def bootstrap_statements(schema: DirectusSchema, existing: Iterable[str] = ()) -> list[str]:
    """The DDL creating the tables not in ``existing``, then relations, indexes and keys.

    Tables that exist are left alone, so this is safe on a Directus database: there it
    only adds the natural-key unique indexes. Foreign keys are added only to new tables.
    """
    present = set(existing)
    new = [table for table in schema.tables if table not in present]
    statements = [_create_table(table, schema.tables[table]) for table in new]
    statements += [_add_foreign_key(fk) for fk in schema.foreign_keys if fk.table in new]
    statements += [
        _create_index(column)
        for table in new
        for column in schema.tables[table]
        if column.indexed and not (column.primary or column.unique)
    ]
    statements += [_create_unique_index(key) for key in schema.unique_keys if len(key.columns) > 1]
    return statements


async def bootstrap(conn: asyncpg.Connection, schema: DirectusSchema | None = None) -> list[str]:
    """Create the Directus tables missing from the database; return the tables created."""
    schema = schema or load_schema()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK)
        existing = await _existing_tables(conn)
        # One round trip: the statements carry no parameters, so the simple protocol runs them.
        await conn.execute(";\n".join(bootstrap_statements(schema, existing)))
    return [table for table in schema.tables if table not in existing]


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _column_type(column: Column) -> str:
    if column.auto_increment:
        return "bigserial" if column.data_type == "bigint" else "serial"
    if column.data_type == "character varying" and column.max_length:
        return f"character varying({int(column.max_length)})"
    if column.data_type == "numeric" and column.precision:
        return f"numeric({int(column.precision)}, {int(column.scale or 0)})"
    return column.data_type


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _column_ddl(column: Column) -> str:
    parts = [_q(column.name), _column_type(column)]
    if column.primary:
        parts.append("PRIMARY KEY")
    elif not column.nullable:
        parts.append("NOT NULL")
    if column.unique and not column.primary:
        parts.append(f"CONSTRAINT {_q(f'{column.table}_{column.name}_unique')} UNIQUE")
    if column.default is not None and not column.auto_increment:
        parts.append(f"DEFAULT {_literal(column.default)}")
    return " ".join(parts)


def _create_table(table: str, columns: Sequence[Column]) -> str:
    body = ",\n  ".join(_column_ddl(column) for column in columns)
    return f"CREATE TABLE IF NOT EXISTS {_q(table)} (\n  {body}\n)"


def _add_foreign_key(fk: ForeignKey) -> str:
    return (
        f"ALTER TABLE {_q(fk.table)} ADD CONSTRAINT {_q(fk.constraint)} "
        f"FOREIGN KEY ({_q(fk.column)}) REFERENCES {_q(fk.target)} ({_q(fk.target_column)}) "
        f"ON DELETE {fk.on_delete} ON UPDATE {fk.on_update}"
    )


def _create_index(column: Column) -> str:
    name = f"{column.table}_{column.name}_index"[:63]
    return f"CREATE INDEX IF NOT EXISTS {_q(name)} ON {_q(column.table)} ({_q(column.name)})"


def _create_unique_index(key: UniqueKey) -> str:
    columns = ", ".join(_q(column) for column in key.columns)
    nulls = " NULLS NOT DISTINCT" if key.nulls_not_distinct else ""
    return (
        f"CREATE UNIQUE INDEX IF NOT EXISTS {_q(key.index_name)} "
        f"ON {_q(key.table)} ({columns}){nulls}"
    )


# --- check -------------------------------------------------------------------------------


async def check_schema(conn: asyncpg.Connection, schema: DirectusSchema | None = None) -> list[str]:
    """What the database lacks of the Directus schema, one line each; empty when all is there.

    Covers every table and column of the snapshot (the processor reads the configuration
    and writes the results), their types, and the unique keys it upserts on.
    """
    schema = schema or load_schema()
    columns = await _existing_columns(conn)
    tables = {table for table, _ in columns}
    problems: list[str] = []
    for table, expected in schema.tables.items():
        if table not in tables:
            problems.append(f"missing table {table} (Directus collection)")
            continue
        problems += [p for column in expected if (p := _column_problem(column, columns))]
    problems += await _unique_key_problems(conn, schema.unique_keys, columns)
    return problems


def _column_problem(column: Column, existing: Mapping[tuple[str, str], str]) -> str | None:
    where = f"{column.table}.{column.name}"
    actual = existing.get((column.table, column.name))
    if actual is None:
        return f"missing column {where} ({column.data_type})"
    if actual not in COMPATIBLE.get(column.type, frozenset({column.data_type})):
        return f"column {where} has type {actual}, expected {column.data_type}"
    return None


async def _unique_key_problems(
    conn: asyncpg.Connection,
    keys: Iterable[UniqueKey],
    columns: Mapping[tuple[str, str], str],
) -> list[str]:
    indexes = await _unique_indexes(conn)
    problems = []
    for key in keys:
        if any((key.table, column) not in columns for column in key.columns):
            continue  # already reported as a missing table or column
        found = indexes.get((key.table, frozenset(key.columns)))
        shown = f"{key.table} ({', '.join(key.columns)})"
        if found is None:
            problems.append(f"missing unique index on {shown}")
        elif key.nulls_not_distinct and not found:
            problems.append(f"unique index on {shown} must be NULLS NOT DISTINCT")
    return problems


async def _existing_tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    )
    return {row["table_name"] for row in rows}


async def _existing_columns(conn: asyncpg.Connection) -> dict[tuple[str, str], str]:
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
    )
    return {(row["table_name"], row["column_name"]): row["data_type"] for row in rows}


async def _unique_indexes(conn: asyncpg.Connection) -> dict[tuple[str, frozenset[str]], bool]:
    """Full (non-partial) unique indexes: (table, column set) → nulls not distinct."""
    rows = await conn.fetch(
        """
        SELECT c.relname AS table_name, i.indnullsnotdistinct AS nnd,
               array_agg(a.attname::text) AS columns
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
        WHERE n.nspname = current_schema() AND i.indisunique AND i.indpred IS NULL
          AND i.indexprs IS NULL
        GROUP BY i.indexrelid, c.relname, i.indnullsnotdistinct
        """
    )
    found: dict[tuple[str, frozenset[str]], bool] = {}
    for row in rows:
        key = (row["table_name"], frozenset(row["columns"]))
        found[key] = found.get(key, False) or row["nnd"]
    return found
