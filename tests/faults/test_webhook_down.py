"""Fault injection: the webhook receiver goes away while ``processor events dispatch`` runs.

The dispatcher must keep the events pending (never dead, never dropped) while the
receiver refuses connections, say so in its logs and metrics, and deliver every event
once the receiver is back on the same address, each entry's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from processor.adapters.outbox import EventContext, build_event, record_events
from processor.settings import Settings

from .helpers import Service, report
from .servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTRIES = 5


RECEIVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        with open(sys.argv[2], "ab") as out:
            out.write(body.replace(b"\\n", b" ") + b"\\n")
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass

ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever(0.05)
"""


@dataclass
class Receiver:
    """A webhook receiver process, killed and started again on the same port."""

    journal: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-c", RECEIVER, str(self.port), str(self.journal)]
        self.process = subprocess.Popen(args)
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise AssertionError("the webhook receiver did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL: the listening socket and every open connection go at once."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    @property
    def arrivals(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_bytes().splitlines() if line]

    def count(self) -> int:
        return len(self.arrivals)

    def event_ids(self) -> set[str]:
        return {a["event_id"] for a in self.arrivals}


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    recv = Receiver(tmp_path / "arrivals.jsonl")
    recv.start()
    try:
        yield recv
    finally:
        recv.stop()


async def seed(url: str, first_rank: int, per_entry: int) -> None:
    """``per_entry`` result changes for each entry, interleaved across entries."""
    events = [
        build_event(
            "stage_result.updated",
            {"stage": 2, "entry": e, "rank": k, "total_ms": 1000 * k},
            EventContext(event=1, entry_number=100 + e),
        )
        for k in range(first_rank, first_rank + per_entry)
        for e in range(1, ENTRIES + 1)
    ]
    conn = await asyncpg.connect(url)
    try:
        await record_events(conn, events)
    finally:
        await conn.close()


async def outbox_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM processor.outbox GROUP BY 1")
    finally:
        await conn.close()
    return {r["status"]: r["n"] for r in rows}


async def outbox_rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT * FROM processor.outbox ORDER BY id")
    finally:
        await conn.close()


def start_dispatcher(settings: Settings, receiver: Receiver, log: Path) -> Service:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_DATABASE_URL=settings.database_dsn(),
        PROCESSOR_WEBHOOK_ROUTES=json.dumps({"*": f"http://127.0.0.1:{receiver.port}/hook"}),
        PROCESSOR_WEBHOOK_TIMEOUT_S="1",
        PROCESSOR_WEBHOOK_BACKOFF_INITIAL_S="0.05",
        PROCESSOR_WEBHOOK_BACKOFF_MAX_S="0.5",
        PROCESSOR_WEBHOOK_MAX_ATTEMPTS="100000",
        PROCESSOR_HTTP_HOST="127.0.0.1",
        PROCESSOR_HTTP_PORT=str(port),
        PROCESSOR_LOG_FORMAT="console",
    )
    args = [sys.executable, "-m", "processor", "events", "dispatch", "--poll-interval", "0.05"]
    with log.open("ab") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Service(process, port, log)


async def wait_for(condition: Any, seconds: float, what: str, service: Service) -> float:
    started = time.monotonic()
    while not await condition():
        assert service.process.poll() is None, service.output()[-3000:]
        if time.monotonic() - started > seconds:
            raise AssertionError(f"timed out waiting for {what}: " + service.output()[-3000:])
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def order_kept(rows: list[asyncpg.Record], arrivals: list[dict[str, Any]]) -> bool:
    """Each entry's events were first posted in outbox order."""
    first: dict[int, int] = {}
    for position, body in enumerate(arrivals):
        first.setdefault(body["sequence"], position)
    by_entry: dict[str, list[int]] = {}
    for row in rows:
        by_entry.setdefault(row["entry_key"], []).append(first[row["id"]])
    return all(seq == sorted(seq) for seq in by_entry.values())


async def test_events_stay_pending_while_the_receiver_is_down_and_arrive_after(
    fault_settings: Settings, fault_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    await seed(fault_db, first_rank=1, per_entry=4)
    dispatcher = start_dispatcher(fault_settings, receiver, tmp_path / "dispatch.log")
    try:
        await wait_for(
            lambda: _true(receiver.count() >= 4 * ENTRIES), 30, "first events", dispatcher
        )
        receiver.stop()
        down = time.monotonic()
        await seed(fault_db, first_rank=5, per_entry=6)
        failed = lambda: _true(  # noqa: E731 - a one-line poll condition
            dispatcher.metric("processor_events_failed_total", 'reason="connection"') >= 10
        )
        await wait_for(failed, 30, "failed attempts to be counted", dispatcher)
        await asyncio.sleep(2)  # a longer outage: still nothing may be given up
        while_down = await outbox_counts(fault_db)
        receiver.start()
        back = time.monotonic()
        settled = lambda: _settled(fault_db)  # noqa: E731
        delivered_after = await wait_for(settled, 60, "every event delivered", dispatcher)
        failures = dispatcher.metric("processor_events_failed_total", 'reason="connection"')
        assert await dispatcher.stop() == 0, dispatcher.output()[-3000:]
    finally:
        dispatcher.kill()
        receiver.stop()

    assert while_down.get("pending", 0) == 6 * ENTRIES
    assert while_down.get("dead", 0) == 0
    assert "delivery failed, will retry" in dispatcher.output()
    rows = await outbox_rows(fault_db)
    assert {r["status"] for r in rows} == {"delivered"}
    assert receiver.event_ids() == {str(r["event_id"]) for r in rows}
    assert order_kept(rows, receiver.arrivals)
    report(
        "webhook receiver down",
        receiver_down=back - down,
        all_delivered_after_up=delivered_after,
        failed_attempts=int(failures),
        events=len(rows),
    )


async def _true(value: bool) -> bool:
    return value


async def _settled(url: str) -> bool:
    counts = await outbox_counts(url)
    return set(counts) == {"delivered"}
