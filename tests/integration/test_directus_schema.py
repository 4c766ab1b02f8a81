"""The Directus tables: bootstrap from the snapshot, then ``schema check`` against real PostgreSQL.

Each test works in a PostgreSQL schema of its own (``search_path``), so dropping a column
here never disturbs another test sharing the session database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlencode

import asyncpg
import pytest
from click.testing import CliRunner

from processor.adapters.directus_schema import bootstrap, check_schema, load_schema
from processor.adapters.reference import read_io_csv
from processor.adapters.schema_cli import schema as schema_cli

pytestmark = pytest.mark.integration


@pytest.fixture
async def scratch(pg: asyncpg.Connection) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL schema, first on ``pg``'s search_path; dropped afterwards."""
    name = f"dx_{uuid.uuid4().hex[:10]}"
    await pg.execute(f'CREATE SCHEMA "{name}"')
    await pg.execute(f'SET search_path TO "{name}"')
    try:
        yield name
    finally:
        await pg.execute("RESET search_path")
        await pg.execute(f'DROP SCHEMA "{name}" CASCADE')


def scoped_url(database_url: str, schema: str) -> str:
    return f"{database_url}?{urlencode({'search_path': schema})}"


async def test_bootstrap_from_the_snapshot_then_check_passes(
    pg: asyncpg.Connection, scratch: str
) -> None:
    assert await check_schema(pg) != []
    created = await bootstrap(pg)
    assert set(created) == set(load_schema().tables)
    assert await check_schema(pg) == []


async def test_bootstrap_is_idempotent(pg: asyncpg.Connection, scratch: str) -> None:
    await bootstrap(pg)
    assert await bootstrap(pg) == []
    assert await check_schema(pg) == []


async def test_dropping_a_column_is_reported_by_table_and_column(
    pg: asyncpg.Connection, scratch: str
) -> None:
    await bootstrap(pg)
    await pg.execute('ALTER TABLE stages DROP COLUMN "opens_at"')
    assert await check_schema(pg) == ["missing column stages.opens_at (timestamp with time zone)"]


async def test_missing_table_wrong_type_and_missing_natural_key_are_each_one_line(
    pg: asyncpg.Connection, scratch: str
) -> None:
    await bootstrap(pg)
    await pg.execute("DROP TABLE anomalies")
    await pg.execute("ALTER TABLE entries ALTER COLUMN valid_from TYPE text")
    await pg.execute("DROP INDEX start_times_stage_entry_unique")
    assert sorted(await check_schema(pg)) == [
        "column entries.valid_from has type text, expected timestamp with time zone",
        "missing table anomalies (Directus collection)",
        "missing unique index on start_times (stage, entry)",
    ]


async def test_single_column_unique_from_the_snapshot_is_checked(
    pg: asyncpg.Connection, scratch: str
) -> None:
    await bootstrap(pg)
    await pg.execute("ALTER TABLE devices DROP CONSTRAINT devices_imei_unique")
    assert await check_schema(pg) == ["missing unique index on devices (imei)"]


async def test_bootstrap_on_existing_tables_only_adds_the_natural_keys(
    pg: asyncpg.Connection, scratch: str
) -> None:
    """What an organiser gets after `directus schema apply`: tables, but no composite keys."""
    await bootstrap(pg)
    await pg.execute("DROP INDEX penalties_stage_entry_reason_geofence_seq_unique")
    assert await check_schema(pg) == [
        "missing unique index on penalties (stage, entry, reason, geofence, seq)"
    ]
    assert await bootstrap(pg) == []
    assert await check_schema(pg) == []


async def test_penalty_without_geofence_conflicts_on_its_natural_key(
    pg: asyncpg.Connection, scratch: str
) -> None:
    await bootstrap(pg)
    event = await pg.fetchval("INSERT INTO events (name) VALUES ('E') RETURNING id")
    stage = await pg.fetchval(
        "INSERT INTO stages (event, name) VALUES ($1, 'SS1') RETURNING id", event
    )
    entry = await pg.fetchval(
        "INSERT INTO entries (event, number) VALUES ($1, 7) RETURNING id", event
    )
    upsert = """
        INSERT INTO penalties (stage, entry, geofence, reason, seq, seconds)
        VALUES ($1, $2, NULL, 'jump_start', 0, $3)
        ON CONFLICT (stage, entry, reason, geofence, seq) DO UPDATE SET seconds = EXCLUDED.seconds
    """
    await pg.execute(upsert, stage, entry, 60)
    await pg.execute(upsert, stage, entry, 120)
    assert await pg.fetch("SELECT seconds FROM penalties") == [(120,)]


async def _sql(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def scratch_url(database_url: str) -> Iterator[str]:
    """A database URL whose search_path is a fresh schema (for the CLI, outside any loop)."""
    name = f"dx_{uuid.uuid4().hex[:10]}"
    asyncio.run(_sql(database_url, f'CREATE SCHEMA "{name}"'))
    try:
        yield scoped_url(database_url, name)
    finally:
        asyncio.run(_sql(database_url, f'DROP SCHEMA "{name}" CASCADE'))


def test_cli_check_names_the_dropped_column_and_exits_1(
    scratch_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCESSOR_DATABASE_URL", scratch_url)
    runner = CliRunner()
    result = runner.invoke(schema_cli, ["bootstrap"])
    assert result.exit_code == 0, result.output
    assert f"{2 * len(read_io_csv())} IO mapping rows added" in result.output
    assert runner.invoke(schema_cli, ["check"]).exit_code == 0

    asyncio.run(_sql(scratch_url, "ALTER TABLE timing_records DROP COLUMN confidence"))
    result = runner.invoke(schema_cli, ["check"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "missing column timing_records.confidence (character varying)"
    ]


def test_cli_bootstrap_print_shows_the_ddl_without_a_database() -> None:
    result = CliRunner().invoke(schema_cli, ["bootstrap", "--print"])
    assert result.exit_code == 0
    assert 'CREATE TABLE IF NOT EXISTS "io_mappings"' in result.output
    assert (
        'CREATE UNIQUE INDEX IF NOT EXISTS "penalties_stage_entry_reason_geofence_seq_unique"'
        in result.output
    )
    assert "NULLS NOT DISTINCT" in result.output


def test_cli_missing_snapshot_file_exits_2_naming_it() -> None:
    result = CliRunner().invoke(schema_cli, ["check", "--snapshot", "/nonexistent/snap.yaml"])
    assert result.exit_code == 2
    assert "/nonexistent/snap.yaml: no such file" in result.output
    assert "Traceback" not in result.output
