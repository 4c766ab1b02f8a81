"""Outbox and webhook dispatcher throughput, each beside a same-run reference.

Run: ``python -m benchmarks.events_bench [--events N] [--entries E] [--concurrency C]``
with PostgreSQL at ``PROCESSOR_DATABASE_URL`` (a scratch database is created and dropped).

- record: ``record_events`` in transactions of 100 events (fingerprint, version lookup,
  insert, notify), beside a bare ``INSERT … SELECT unnest`` of the same columns into a
  twin table without any lookup.
- claim: one claim round (the ``DISTINCT ON`` head scan) with the whole backlog pending.
- dispatch: ``Dispatcher.drain`` posting every event to a local asyncio HTTP sink,
  beside the same envelopes posted by httpx at the same concurrency with no database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

import processor
from benchmarks.common import print_table
from processor.adapters.dispatcher import _CLAIM, Dispatcher, make_http_client
from processor.adapters.outbox import DomainEvent, EventContext, build_event, record_events
from processor.logs import configure_logging
from processor.settings import load_settings

MIGRATION = Path(processor.__file__).parent / "migrations" / "0003_outbox.sql"
ADMIN_URL = os.environ.get(
    "PROCESSOR_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on a keep-alive connection with an empty 200, in one write."""
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextmanager
def sink_server() -> Iterator[str]:
    """A minimal HTTP/1.1 sink on its own thread and event loop."""
    loop = asyncio.new_event_loop()
    ready: list[int] = []
    started = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        server = await asyncio.start_server(_sink, "127.0.0.1", 0, backlog=512)
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield f"http://127.0.0.1:{ready[0]}/hook"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def make_events(count: int, entries: int) -> list[DomainEvent]:
    return [
        build_event(
            "stage_result.updated",
            {"stage": 2, "entry": i % entries, "rank": i // entries, "total_ms": i * 37},
            EventContext(event=1, entry_number=i % entries),
        )
        for i in range(count)
    ]


async def bench_record(conn: asyncpg.Connection, events: list[DomainEvent]) -> list[object]:
    start = time.perf_counter()
    for i in range(0, len(events), 100):
        async with conn.transaction():
            await record_events(conn, events[i : i + 100])
    recorded = len(events) / (time.perf_counter() - start)

    await conn.execute("CREATE TABLE processor.outbox_twin (LIKE processor.outbox INCLUDING ALL)")
    start = time.perf_counter()
    for i in range(0, len(events), 100):
        chunk = events[i : i + 100]
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO processor.outbox_twin
                   (event_id, type, subject, version, fingerprint, entry_key, occurred_at, body)
                   SELECT e, t, s, 1, f, k, now(), b::jsonb FROM unnest($1::uuid[], $2::text[],
                   $3::text[], $4::text[], $5::text[], $6::text[]) AS u(e, t, s, f, k, b)""",
                [uuid.uuid4() for _ in chunk],
                [e.type for e in chunk],
                [e.subject for e in chunk],
                [e.fingerprint for e in chunk],
                [e.entry_key for e in chunk],
                [processor_json(e.body) for e in chunk],
            )
    bare = len(events) / (time.perf_counter() - start)
    return ["record_events (tx of 100)", recorded, "bare INSERT unnest", bare, recorded / bare]


def processor_json(body: Any) -> str:
    return orjson.dumps(body).decode()


async def bench_claim(conn: asyncpg.Connection, concurrency: int) -> list[object]:
    """Best of five claim rounds over the full backlog, each rolled back."""
    await conn.execute("ANALYZE processor.outbox")  # as autovacuum would have by then
    pending = await conn.fetchval("SELECT count(*) FROM processor.outbox WHERE status='pending'")
    times = []
    for _ in range(5):
        tx = conn.transaction()
        await tx.start()
        start = time.perf_counter()
        await conn.fetch(_CLAIM, concurrency, 30.0, uuid.uuid4())
        times.append(time.perf_counter() - start)
        await tx.rollback()
    best_ms = min(times) * 1000
    return [f"claim round, {pending:,} pending", f"{best_ms:.1f} ms", "", "", ""]


async def bench_dispatch(url: str, dsn: str, count: int, concurrency: int) -> list[object]:
    settings = load_settings(database_url=dsn, webhook_routes={"*": url}, http_port=0)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=8)
    try:
        async with make_http_client(settings, concurrency) as http:
            start = time.perf_counter()
            claimed = await Dispatcher(pool, settings, http, concurrency=concurrency).drain()
            rate = claimed / (time.perf_counter() - start)
            body = b'{"event_id":"x","row":{"rank":1},"context":{}}'
            sem = asyncio.Semaphore(concurrency)

            async def post() -> None:
                async with sem:
                    (await http.post(url, content=body)).raise_for_status()

            start = time.perf_counter()
            await asyncio.gather(*(post() for _ in range(count)))
            raw = count / (time.perf_counter() - start)
    finally:
        await pool.close()
    return [f"dispatch ({concurrency} in flight)", rate, "bare httpx POST", raw, rate / raw]


async def main(count: int, entries: int, concurrency: int) -> None:
    configure_logging("console", "warning")
    name = f"bench_events_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    rows: list[list[object]] = []
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE SCHEMA processor")
            await conn.execute(MIGRATION.read_text())
            rows.append(await bench_record(conn, make_events(count, entries)))
            rows.append(await bench_claim(conn, concurrency))
        finally:
            await conn.close()
        with sink_server() as url:
            rows.append(await bench_dispatch(url, dsn, count, concurrency))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{count:,} events over {entries:,} entries")
    print_table(["measure", "events/s", "reference", "ref events/s", "ratio"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.entries, args.concurrency))
