"""Native range partitions of ``positions`` and ``position_attributes`` (no TimescaleDB).

One partition per UTC day (``PROCESSOR_PARTITION_INTERVAL_DAYS`` days), created ahead of
time and on demand before a write needs one. Records whose time is implausible (before
2010 or beyond the days created ahead) land in the ``*_default`` partition, so a device
with a clock decades off does not make thousands of partitions. When a day's partition is
created later, its rows already in the default partition are moved into it first, in the
same transaction, so the attach never fails.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg

from processor.settings import Settings

TABLES = ("positions", "position_attributes")
DAY_MS = 86_400_000
EARLIEST_MS = 1_262_304_000_000  # 2010-01-01T00:00:00Z: older times are implausible
_LOCK_BASE = 0x70617274  # advisory lock namespace: "part"


def period_of(ts_ms: int, days: int) -> int:
    """The index of the partition period holding ``ts_ms`` (periods of ``days`` days)."""
    return ts_ms // (DAY_MS * days)


def partition_name(table: str, period: int, days: int) -> str:
    start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=period * days)
    return f"{table}_p{start:%Y%m%d}"


class PartitionManager:
    """Creates the partitions a batch needs, remembering those known to exist."""

    def __init__(self, settings: Settings) -> None:
        self._days = settings.partition_interval_days
        self._ahead = settings.partitions_ahead
        self._known: set[int] = set()

    def plausible(self, period: int, now_ms: int) -> bool:
        """Whether a period gets a partition of its own (else rows go to the default)."""
        first = period_of(EARLIEST_MS, self._days)
        last = period_of(now_ms, self._days) + self._ahead + 1
        return first <= period <= last

    async def ensure_for(self, conn: asyncpg.Connection, ts_values: list[int]) -> int:
        """Create missing partitions for these record times; return how many were made."""
        now_ms = int(time.time() * 1000)
        needed = {period_of(ts, self._days) for ts in ts_values} - self._known
        made = 0
        for period in sorted(needed):
            if self.plausible(period, now_ms):
                made += await ensure_period(conn, period, self._days)
            self._known.add(period)
        return made

    async def ensure_ahead(self, conn: asyncpg.Connection) -> int:
        """Create the partitions for today and the configured days ahead."""
        now = period_of(int(time.time() * 1000), self._days)
        made = 0
        for period in range(now, now + self._ahead + 1):
            made += await ensure_period(conn, period, self._days)
            self._known.add(period)
        return made


async def ensure_ahead(conn: asyncpg.Connection, settings: Settings) -> int:
    """Create today's and the next days' partitions (used by migrate and at start-up)."""
    return await PartitionManager(settings).ensure_ahead(conn)


async def ensure_period(conn: asyncpg.Connection, period: int, days: int) -> int:
    """Create one period's partition of every time table if missing; 1 if created."""
    lo = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=period * days)
    hi = lo + timedelta(days=days)
    created = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_BASE, period)
        for table in TABLES:
            name = partition_name(table, period, days)
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                continue
            await conn.execute(
                f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            await conn.execute(
                f"WITH moved AS (DELETE FROM {table}_default WHERE ts >= $1 AND ts < $2 "
                f"RETURNING *) INSERT INTO {name} SELECT * FROM moved",
                lo,
                hi,
            )
            await conn.execute(
                f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ('{lo.isoformat()}')"
                f" TO ('{hi.isoformat()}')"
            )
            created = 1
    return created
