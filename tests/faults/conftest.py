"""Fixtures of the fault-injection suite: private servers that tests may restart or kill.

Never the machine's shared PostgreSQL and Redis: other runs use them at the same time.
One private PostgreSQL cluster per test session (a fresh database per test), one private
Redis (AOF on, fsync always) per test; both are removed in teardown, even on failure.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from processor.adapters.migrations import migrate
from processor.settings import Settings, load_settings

from .servers import PrivatePostgres, PrivateRedis


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL 15 cluster of this session, started; destroyed at the end."""
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


async def prepare_database(url: str) -> None:
    """Owned migrations, the Directus tables and the IO mappings (as tests/conftest.py)."""
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, load_settings(database_url=url))
        from processor.adapters import directus_schema, reference

        await directus_schema.bootstrap(conn)
        await reference.seed_io_mappings(conn, reference.read_io_csv())
    finally:
        await conn.close()


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
def fault_db(private_pg: PrivatePostgres) -> str:
    """A fresh, migrated database on the private cluster (the cluster may be restarted)."""
    if not private_pg.running():  # a previous test failed while the server was down
        private_pg.start()
    name = f"faults_{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_database(private_pg.url(), name))
    url = private_pg.url(name)
    asyncio.run(prepare_database(url))
    return url


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of this test, persistence on; killed and removed afterwards."""
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def fault_settings(
    fault_db: str, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings pointing at the private servers."""
    for key in list(os.environ):
        if key.startswith("PROCESSOR_"):
            monkeypatch.delenv(key)
    return load_settings(
        database_url=fault_db,
        redis_url=private_redis.url,
        stream="faults:records",
        dead_letter_stream="faults:records:dead",
        live_prefix="faults:live",
        consumer=f"faults-{uuid.uuid4().hex[:6]}",
        http_port=0,
        log_format="console",
    )
