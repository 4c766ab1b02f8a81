"""Integration fixtures: a migrated (and, when available, Directus-bootstrapped) database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from processor.adapters.migrations import migrate
from processor.settings import load_settings

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
