"""Versioned, idempotent migrations of the tables the processor owns.

The processor owns ``positions``, ``position_attributes`` and schema ``processor``; it never
creates or alters a Directus table (ARCHITECTURE.md rule 2). Migrations are applied in
version order, each once and in its own transaction, tracked in
``processor.schema_migrations``; an advisory lock keeps concurrent instances from racing.
Versions 1 and 2 are built in (their DDL depends on whether TimescaleDB is available);
later versions are the SQL files ``src/processor/migrations/NNNN_name.sql``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg

from processor.adapters import partitions
from processor.logs import get_logger
from processor.settings import Settings

log = get_logger("migrations")

MIGRATION_LOCK = 0x70726F63  # advisory lock key: "proc"

_POSITIONS_COLUMNS = """
    device_id   bigint           NOT NULL,
    ts          timestamptz      NOT NULL,
    received_at timestamptz      NOT NULL,
    lat         double precision NOT NULL,
    lon         double precision NOT NULL,
    alt         integer          NOT NULL,
    angle       smallint         NOT NULL,
    satellites  smallint         NOT NULL,
    speed       integer          NOT NULL,
    priority    smallint         NOT NULL,
    event_io    integer          NOT NULL,
    codec       smallint         NOT NULL,
    generation  smallint,
    io          jsonb            NOT NULL,
    stream_id   text             NOT NULL,
    PRIMARY KEY (device_id, ts)
"""

# ``attributes`` becomes json in migration 6 (0006_attributes_json.sql).
_ATTRIBUTES_COLUMNS = """
    device_id       bigint      NOT NULL,
    ts              timestamptz NOT NULL,
    attributes      jsonb       NOT NULL,
    mapping_version integer     NOT NULL,
    PRIMARY KEY (device_id, ts)
"""

Apply = Callable[[asyncpg.Connection, Settings, bool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Apply
    checksum: str


async def timescale_available(conn: asyncpg.Connection, settings: Settings) -> bool:
    """Whether positions should be a hypertable, per ``PROCESSOR_TIMESCALE``."""
    if settings.timescale == "off":
        return False
    row = await conn.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    if not row and settings.timescale == "on":
        raise RuntimeError("PROCESSOR_TIMESCALE=on but the timescaledb extension is not available")
    return bool(row)


async def _positions(conn: asyncpg.Connection, settings: Settings, timescale: bool) -> None:
    await _time_table(conn, settings, timescale, "positions", _POSITIONS_COLUMNS)
    if timescale and settings.compression_after:
        await conn.execute(
            "ALTER TABLE positions SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'device_id', "
            "timescaledb.compress_orderby = 'ts')"
        )
        await conn.execute(
            "SELECT add_compression_policy('positions', $1::interval, if_not_exists => true)",
            settings.compression_after,
        )


async def _attributes(conn: asyncpg.Connection, settings: Settings, timescale: bool) -> None:
    await _time_table(conn, settings, timescale, "position_attributes", _ATTRIBUTES_COLUMNS)


async def _time_table(
    conn: asyncpg.Connection, settings: Settings, timescale: bool, table: str, columns: str
) -> None:
    """A table keyed by (device_id, ts): a hypertable, or natively range-partitioned on ts."""
    if timescale:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
        await conn.execute(
            "SELECT create_hypertable($1::regclass, by_range('ts', $2::interval), "
            "if_not_exists => true)",
            table,
            settings.chunk_interval,
        )
        return
    await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns}) PARTITION BY RANGE (ts)")
    await conn.execute(f"CREATE TABLE IF NOT EXISTS {table}_default PARTITION OF {table} DEFAULT")


def _sql_migration(sql: str) -> Apply:
    async def apply(conn: asyncpg.Connection, settings: Settings, timescale: bool) -> None:
        await conn.execute(sql)

    return apply


def all_migrations() -> list[Migration]:
    """Built-in migrations plus the SQL files shipped in ``processor/migrations``."""
    found = [
        Migration(1, "positions", _positions, "builtin-1"),
        Migration(2, "position_attributes", _attributes, "builtin-2"),
    ]
    folder = resources.files("processor") / "migrations"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".sql"):
            continue
        version_text, _, rest = item.name.partition("_")
        sql = item.read_text(encoding="utf-8")
        checksum = hashlib.sha256(sql.encode()).hexdigest()[:16]
        found.append(Migration(int(version_text), rest[:-4], _sql_migration(sql), checksum))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {sorted(versions)}")
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS processor")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS processor.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["version"]
            for r in await conn.fetch("SELECT version FROM processor.schema_migrations")
        }
        timescale = await timescale_available(conn, settings)
        for migration in all_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await migration.apply(conn, settings, timescale)
                await conn.execute(
                    "INSERT INTO processor.schema_migrations (version, name, checksum)"
                    " VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied.append(f"{migration.version:04d}_{migration.name}")
            log.info("migration applied", version=migration.version, name=migration.name)
        if not timescale:
            await partitions.ensure_ahead(conn, settings)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied
