"""deploy/roles.sql on a fresh database: each role can do its job and nothing else.

Runs on the private cluster (roles are cluster-wide objects; the shared server's must not
be touched). The processor itself runs as ``processor_app``: it starts, stores records
(a clock decades off included, which needs a partition of its own) and drains.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import pytest

from processor.settings import Settings

from ..integration.pipeline_helpers import entry
from .helpers import PROCESSOR, Producer, processor_env
from .servers import PrivatePostgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "roles.sql"
CONFIG = ["device_models", "devices", "entries", "events", "geofences", "io_mappings", "stages"]
RESULTS = ["timing_records", "penalties", "stage_results", "anomalies"]


def as_role(url: str, role: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


async def apply_roles(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(ROLES_SQL.read_text())
        await conn.execute(ROLES_SQL.read_text())  # idempotent: a second run changes nothing
    finally:
        await conn.close()


async def refused(url: str, sql: str) -> bool:
    """True when ``sql`` fails for lack of privilege (inside a rolled-back transaction)."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            try:
                await conn.execute(sql)
            except asyncpg.InsufficientPrivilegeError:
                return True
            raise _Rollback
    except _Rollback:
        return False
    finally:
        await conn.close()


class _Rollback(Exception):
    pass


async def test_the_app_role_reads_configuration_and_writes_only_results_and_its_tables(
    fault_db: str, private_pg: PrivatePostgres
) -> None:
    await apply_roles(fault_db)
    app = as_role(fault_db, "processor_app")
    for table in CONFIG:
        assert not await refused(app, f"SELECT * FROM {table} LIMIT 1")
        assert await refused(app, f"DELETE FROM {table}")
        assert await refused(app, f"UPDATE {table} SET id = id")
    assert await refused(app, "INSERT INTO devices (imei) VALUES ('356307040000001')")
    for table in RESULTS:
        assert not await refused(app, f"DELETE FROM {table}")
        assert not await refused(app, f"UPDATE {table} SET id = id")
    assert not await refused(app, "DELETE FROM positions")
    assert not await refused(app, "DELETE FROM processor.outbox")
    assert await refused(app, "DROP TABLE devices")
    assert await refused(app, "CREATE ROLE intruder")


async def test_the_analytics_role_reads_and_cannot_write_anything(fault_db: str) -> None:
    await apply_roles(fault_db)
    conn = await asyncpg.connect(fault_db)
    try:
        await conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'analyst') THEN"
            " CREATE ROLE analyst LOGIN IN ROLE processor_analytics; END IF; END $$"
        )
    finally:
        await conn.close()
    analyst = as_role(fault_db, "analyst")
    for table in ["positions", "position_attributes", *CONFIG, *RESULTS]:
        assert not await refused(analyst, f"SELECT * FROM {table} LIMIT 1")
        assert await refused(analyst, f"DELETE FROM {table}")
    assert await refused(analyst, "SELECT * FROM processor.outbox")
    assert await refused(analyst, "CREATE TABLE public.mine (x int)")


async def test_the_processor_runs_as_the_app_role(
    fault_settings: Settings, fault_db: str, tmp_path: Path
) -> None:
    await apply_roles(fault_db)
    entries = [entry(i % 20, i) for i in range(2_000)]
    entries += [entry(21, 0, ts=1_072_915_200_000, received_at=1_072_915_200_000)]  # 2004
    await Producer(fault_settings.redis_dsn(), fault_settings.stream, entries, 1e9).run()
    env = processor_env(
        fault_settings,
        PROCESSOR_DATABASE_URL=as_role(fault_db, "processor_app"),
        PROCESSOR_DOMAIN_ENABLED="true",
        PROCESSOR_HTTP_PORT="0",
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [PROCESSOR, "run", "--burst"],
        env=env,
        capture_output=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    conn = await asyncpg.connect(fault_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM positions") == len(entries)
        old = await conn.fetchval(
            "SELECT tableoid::regclass::text FROM positions WHERE ts < '2005-01-01'"
        )
    finally:
        await conn.close()
    print(f"\n[roles] processor_app stored {len(entries)} records; the 2004 one in {old}")
