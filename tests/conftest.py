"""Shared fixtures: real PostgreSQL and Redis, isolated per test session and per test.

Each test session gets a database of its own (created here, dropped at the end), so
several runs can share one server. Each test gets stream names of its own in Redis.
Integration tests never mock either service.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from processor.adapters.migrations import migrate
from processor.settings import Settings, load_settings

ADMIN_URL = os.environ.get(
    "PROCESSOR_TEST_DATABASE_URL",
    os.environ.get("PROCESSOR_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
REDIS_URL = os.environ.get(
    "PROCESSOR_TEST_REDIS_URL", os.environ.get("PROCESSOR_REDIS_URL", "redis://127.0.0.1:6379/0")
)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin_execute(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, empty database for this test session, dropped afterwards."""
    import asyncio

    name = f"ptest_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(ADMIN_URL, name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def stream_prefix() -> Iterator[str]:
    """A unique key prefix for this test; every key under it is deleted afterwards."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def settings(database_url: str, stream_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings pointing at this session's database and this test's streams."""
    for key in list(os.environ):
        if key.startswith("PROCESSOR_"):
            monkeypatch.delenv(key)
    return load_settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        stream=f"{stream_prefix}:records",
        dead_letter_stream=f"{stream_prefix}:records:dead",
        live_prefix=f"{stream_prefix}:live",
        consumer=f"test-{uuid.uuid4().hex[:6]}",
        http_port=0,
        log_format="console",
    )


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this session's database."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def aredis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


# --- a migrated database (owned migrations, Directus tables, IO mappings) -----------------

_OWNED = ("positions", "position_attributes")


async def _prepare(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, load_settings(database_url=database_url))
        try:
            from processor.adapters import directus_schema
        except ImportError:
            return
        await directus_schema.bootstrap(conn)
        from processor.adapters import reference

        await reference.seed_io_mappings(conn, reference.read_io_csv())
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def migrated_database(database_url: str) -> str:
    """This session's database with the owned migrations applied (and Directus tables)."""
    asyncio.run(_prepare(database_url))
    return database_url


@pytest.fixture
async def clean_db(migrated_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the migrated database with positions and attributes emptied."""
    conn = await asyncpg.connect(migrated_database)
    try:
        await conn.execute("TRUNCATE " + ", ".join(_OWNED))
        yield conn
    finally:
        await conn.close()


RACE_TABLES = (
    "timing_records", "penalties", "stage_results", "anomalies", "start_times", "entries",
    "geofences", "stages", "events", "devices",
)  # fmt: skip


async def reset_race_data(conn: asyncpg.Connection) -> None:
    """Empty the race and device collections (IO mappings and models stay): for tests that
    count what is in them, since the session database is shared between tests."""
    await conn.execute("TRUNCATE " + ", ".join(RACE_TABLES) + " CASCADE")
