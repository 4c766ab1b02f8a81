"""Attribute backfill throughput over stored positions, beside same-run references.

Run: ``python -m benchmarks.backfill_bench [--positions N] [--devices D] [--chunk C]`` with
PostgreSQL at ``PROCESSOR_DATABASE_URL`` (a scratch database is created and dropped).

N positions of D FMB920 trackers (15 IO elements each, as the pipeline stores them) are
loaded, then:

- backfill, first: every attribute row is new (insert path);
- backfill, after a multiplier change: every row is rewritten (update path);
- backfill, nothing changed: rows are compared and none written;
- reference, keyset read only: the same chunked ``(device_id, ts)`` scan, no decoding;
- reference, decode only: the same rows decoded in Python with no database.

Target: >= 50,000 positions/s for the backfill.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from benchmarks.common import BASE_TS_MS, make_imei, make_payload, print_table
from processor.adapters import directus_schema, reference
from processor.adapters.mappings import MappingCache
from processor.adapters.migrations import migrate
from processor.adapters.positions_store import init_connection
from processor.logs import configure_logging
from processor.settings import load_settings
from processor.tools.backfill import _BEFORE_ALL, _CHUNK, Backfill, BackfillSpec, attribute_rows

TARGET = 50_000
ADMIN_URL = os.environ.get(
    "PROCESSOR_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
COLUMNS = ("device_id", "ts", "received_at", "lat", "lon", "alt", "angle", "satellites",
           "speed", "priority", "event_io", "codec", "generation", "io", "stream_id")  # fmt: skip


def position_rows(count: int, devices: int) -> list[tuple[object, ...]]:
    rng = random.Random(7)
    out = []
    for i in range(count):
        ts = BASE_TS_MS + (i // devices) * 1000
        p = make_payload(rng, ts)
        when = EPOCH + dt.timedelta(milliseconds=ts)
        out.append((int(make_imei(i % devices)), when, when, p["lat"], p["lon"], p["alt"],
                    p["angle"], p["sat"], p["speed"], 0, 0, 142, None,
                    orjson.dumps(p["io"]), "0-0"))  # fmt: skip
    return out


async def load(conn: asyncpg.Connection, dsn: str, count: int, devices: int) -> None:
    await migrate(conn, load_settings(database_url=dsn, timescale="off"))
    await directus_schema.bootstrap(conn)
    await reference.seed_io_mappings(conn, reference.read_io_csv())
    await conn.executemany(
        "INSERT INTO devices (imei, device_model, label, active) "
        "SELECT $1, id, $1, true FROM device_models WHERE model = 'FMB920'",
        [(make_imei(d),) for d in range(devices)],
    )
    await init_connection(conn)
    rows = position_rows(count, devices)
    for i in range(0, len(rows), 100_000):
        await conn.copy_records_to_table(
            "positions", records=rows[i : i + 100_000], columns=COLUMNS
        )
    await conn.execute("ANALYZE positions")


async def timed_backfill(
    conn: asyncpg.Connection, writer: asyncpg.Connection, spec: BackfillSpec, chunk: int
) -> float:
    """Positions/s of one full run, reading on ``conn`` while writing on ``writer``."""
    cache = MappingCache("FMB920", 1.0)
    job = Backfill(conn, spec, cache, chunk=chunk, restart=True, writer=writer)
    await job.prepare()
    start = time.perf_counter()
    summary = await job.run()
    return summary.session_rows / (time.perf_counter() - start)


async def read_only(conn: asyncpg.Connection, spec: BackfillSpec, chunk: int) -> tuple[float, list]:
    rows_all: list = []
    after = _BEFORE_ALL
    start = time.perf_counter()
    while rows := await conn.fetch(_CHUNK, spec.start, spec.end, None, *after, chunk):
        after = (rows[-1][0], rows[-1][1])
        rows_all.extend(rows)
    return len(rows_all) / (time.perf_counter() - start), rows_all


async def main(count: int, devices: int, chunk: int) -> None:
    configure_logging("console", "warning")
    name = f"bench_backfill_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    try:
        conn = await asyncpg.connect(dsn)
        try:
            t = time.perf_counter()
            await load(conn, dsn, count, devices)
            took = time.perf_counter() - t
            print(f"loaded {count:,} positions of {devices:,} devices in {took:.0f} s")
            # Plain connections, as the CLI uses: one reads, one writes.
            reader, writer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
            try:
                rows = await measure(reader, writer, count, devices, chunk)
            finally:
                await reader.close()
                await writer.close()
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print_table(["measure", "positions/s", "vs target 50,000"], rows)


async def measure(
    conn: asyncpg.Connection, writer: asyncpg.Connection, count: int, devices: int, chunk: int
) -> list[list[object]]:
    span = dt.timedelta(seconds=count // devices + 1)
    start = EPOCH + dt.timedelta(milliseconds=BASE_TS_MS)
    spec = BackfillSpec(start, start + span)
    rows: list[list[object]] = []
    first = await timed_backfill(conn, writer, spec, chunk)
    rows.append(["backfill, first (insert)", first, f"{first / TARGET:.2f}x"])
    await conn.execute(
        "UPDATE io_mappings SET multiplier = multiplier * 10 WHERE io_id IN (66, 67) AND "
        "device_model = (SELECT id FROM device_models WHERE model = 'FMB920')"
    )
    changed = await timed_backfill(conn, writer, spec, chunk)
    rows.append(["backfill, multiplier changed (update)", changed, f"{changed / TARGET:.2f}x"])
    same = await timed_backfill(conn, writer, spec, chunk)
    rows.append(["backfill, nothing changed", same, f"{same / TARGET:.2f}x"])
    read_rate, fetched = await read_only(conn, spec, chunk)
    rows.append(["reference: keyset read only", read_rate, ""])
    cache = MappingCache("FMB920", 1.0)
    await cache.load(conn)
    t = time.perf_counter()
    attribute_rows(fetched, cache)
    rows.append(
        ["reference: decode only (no database)", len(fetched) / (time.perf_counter() - t), ""]
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--chunk", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(main(args.positions, args.devices, args.chunk))
