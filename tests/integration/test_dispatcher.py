"""The webhook dispatcher against a real local HTTP server and real PostgreSQL.

The receiver is a threaded ``http.server`` on 127.0.0.1 that scripts each request's fate
(answer 200, answer 500, or hang past the client's timeout) and records every arrival.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import asyncpg
import pytest
from pydantic import AnyUrl, SecretStr

import processor
from processor.adapters.dispatcher import (
    Dispatcher,
    RouteError,
    Router,
    backoff_delay,
    install,
    make_http_client,
    retry_after_s,
)
from processor.adapters.outbox import EventContext, build_event, record_events, retry_events
from processor.settings import Settings

MIGRATION = Path(processor.__file__).parent / "migrations" / "0003_outbox.sql"

Fate = Literal["ok", "fail", "hang"]


@dataclass
class Arrival:
    event_id: str
    sequence: int
    entry_key: str
    type: str
    path: str
    headers: dict[str, str]
    fate: Fate
    arrived: float
    acked: float | None = None


@dataclass
class Receiver:
    """Records arrivals; ``plan(body, nth_arrival_of_this_event)`` decides each fate."""

    plan: Callable[[dict[str, Any], int], Fate] = lambda body, n: "ok"
    hang_s: float = 1.0
    hold: threading.Event | None = None
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def arrive(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Arrival:
        with self.lock:
            n = sum(1 for a in self.arrivals if a.event_id == body["event_id"])
            arrival = Arrival(
                event_id=body["event_id"],
                sequence=body["sequence"],
                entry_key=body["entry_key"],
                type=body["type"],
                path=path,
                headers=headers,
                fate=self.plan(body, n),
                arrived=time.monotonic(),
            )
            self.arrivals.append(arrival)
            return arrival

    def deduplicated(self) -> set[str]:
        with self.lock:
            return {a.event_id for a in self.arrivals}

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)


def order_violations(receiver: Receiver, outbox: list[asyncpg.Record]) -> list[str]:
    """Events that arrived before the previous event of their entry had been acknowledged."""
    acked: dict[int, float] = {}
    first: dict[int, float] = {}
    for a in receiver.arrivals:
        first.setdefault(a.sequence, a.arrived)
        if a.acked is not None:
            acked[a.sequence] = min(acked.get(a.sequence, a.acked), a.acked)
    by_entry: dict[str, list[int]] = defaultdict(list)
    for row in outbox:
        by_entry[row["entry_key"]].append(row["id"])
    problems = []
    for key, ids in by_entry.items():
        for before, after in itertools.pairwise(ids):
            if after in first and (before not in acked or first[after] < acked[before]):
                problems.append(f"{key}: {after} arrived before {before} was acknowledged")
    return problems


def make_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            headers = {k.lower(): v for k, v in self.headers.items()}
            arrival = receiver.arrive(self.path, headers, body)
            held = receiver.hold
            if held is not None:
                held.wait(30)  # the dispatcher is killed meanwhile: never an acknowledgement
                arrival.fate = "hang"
            if arrival.fate == "hang" and held is None:
                time.sleep(receiver.hang_s)
            status = 500 if arrival.fate == "fail" else 200
            if arrival.fate == "ok":
                arrival.acked = time.monotonic()
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout, killed dispatcher) is part of the script


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recv = Receiver()
    server = QuietServer(("127.0.0.1", 0), make_handler(recv))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    recv.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield recv
    finally:
        if recv.hold is not None:
            recv.hold.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
async def outbox_db(pg: asyncpg.Connection) -> asyncpg.Connection:
    await pg.execute("CREATE SCHEMA IF NOT EXISTS processor")
    await pg.execute(MIGRATION.read_text())
    await pg.execute("TRUNCATE processor.outbox RESTART IDENTITY")
    return pg


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    try:
        yield p
    finally:
        await p.close()


def hook_settings(settings: Settings, receiver: Receiver, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_routes": {"*": f"{receiver.url}/hook"},
        "webhook_timeout_s": 0.5,
        "webhook_backoff_initial_s": 0.02,
        "webhook_backoff_max_s": 0.2,
        "webhook_max_attempts": 50,
    }
    return settings.model_copy(update={**values, **changes})


async def seed(conn: asyncpg.Connection, entries: int, per_entry: int) -> list[asyncpg.Record]:
    """``per_entry`` stage result changes for each entry, interleaved across entries."""
    events = [
        build_event(
            "stage_result.updated",
            {"stage": 2, "entry": e, "rank": k, "total_ms": 1000 * k},
            EventContext(event=1, entry_number=100 + e),
        )
        for k in range(1, per_entry + 1)
        for e in range(1, entries + 1)
    ]
    await record_events(conn, events)
    return await outbox(conn)


async def outbox(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM processor.outbox ORDER BY id")


async def run_until_settled(dispatchers: list[Dispatcher], conn: asyncpg.Connection) -> None:
    """Run the dispatchers until no event is pending (or 60 s pass)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in dispatchers]
    try:
        for _ in range(1200):
            pending = await conn.fetchval(
                "SELECT count(*) FROM processor.outbox WHERE status = 'pending'"
            )
            if pending == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("events still pending after 60 s")
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def event_ids(rows: list[asyncpg.Record]) -> set[str]:
    return {str(r["event_id"]) for r in rows}


# --- pure parts --------------------------------------------------------------------------


def test_routes_prefer_exact_type_then_longest_prefix_then_star() -> None:
    router = Router(
        {
            "*": "https://hooks.example/all",
            "anomaly": "f-anomaly",
            "anomaly.opened": "f-opened",
            "stage_result.*": "https://hooks.example/results",
        },
        "http://directus:8055/",
    )
    assert router.target("anomaly.opened") == "http://directus:8055/flows/trigger/f-opened"
    assert router.target("anomaly.closed") == "http://directus:8055/flows/trigger/f-anomaly"
    assert router.target("stage_result.updated") == "https://hooks.example/results"
    assert router.target("penalty.created") == "https://hooks.example/all"
    assert Router({"anomaly.": "https://x/a"}, None).target("penalty.created") is None


def test_a_flow_id_route_needs_the_directus_url() -> None:
    with pytest.raises(RouteError, match="PROCESSOR_DIRECTUS_URL"):
        Router({"*": "0b8c3a52-7e8e-4a43-9d3f-1b7e1b2b9c11"}, None)


def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_full() -> None:
    assert [backoff_delay(n, 1.0, 300.0, 1.0) for n in (1, 2, 3, 10)] == [1, 2, 4, 300]
    assert backoff_delay(3, 1.0, 300.0, 0.0) == 2.0
    assert backoff_delay(1000, 1.0, 300.0, 0.5) == 225.0
    assert retry_after_s(" 30 ") == 30.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") is None


# --- delivery ----------------------------------------------------------------------------


@pytest.mark.integration
async def test_events_arrive_once_each_as_flow_triggers_with_token(
    outbox_db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings, receiver: Receiver
) -> None:
    rows = await seed(outbox_db, entries=4, per_entry=5)
    cfg = hook_settings(
        settings,
        receiver,
        directus_url=AnyUrl(receiver.url),
        webhook_routes={"stage_result.": "flow-42"},
        webhook_token=SecretStr("s3cret"),
    )
    async with make_http_client(cfg) as http:
        claimed = await Dispatcher(pool, cfg, http).drain()

    assert claimed == 20
    assert sorted(a.event_id for a in receiver.arrivals) == sorted(event_ids(rows))
    first = receiver.arrivals[0]
    assert first.path == "/flows/trigger/flow-42"
    assert first.headers["authorization"] == "Bearer s3cret"
    assert first.headers["idempotency-key"] == first.event_id
    assert {r["status"] for r in await outbox(outbox_db)} == {"delivered"}
    assert order_violations(receiver, await outbox(outbox_db)) == []


@pytest.mark.integration
async def test_failed_and_timed_out_deliveries_are_retried_and_arrive_later(
    outbox_db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings, receiver: Receiver
) -> None:
    rows = await seed(outbox_db, entries=3, per_entry=4)

    def plan(body: dict[str, Any], nth: int) -> Fate:
        # The first two tries of every third event fail; the first of others hangs.
        if body["sequence"] % 3 == 0:
            return "fail" if nth < 2 else "ok"
        if body["sequence"] % 3 == 1:
            return "hang" if nth == 0 else "ok"
        return "ok"

    receiver.plan, receiver.hang_s = plan, 0.8
    cfg = hook_settings(settings, receiver, webhook_timeout_s=0.3)
    async with make_http_client(cfg) as http:
        await run_until_settled([Dispatcher(pool, cfg, http, poll_interval_s=0.02)], outbox_db)

    after = await outbox(outbox_db)
    assert {r["status"] for r in after} == {"delivered"}
    assert receiver.deduplicated() == event_ids(rows)
    attempts = {r["id"]: r["attempts"] for r in after}
    assert {attempts[i] for i in attempts if i % 3 == 0} == {3}
    assert {attempts[i] for i in attempts if i % 3 == 1} == {2}
    assert {attempts[i] for i in attempts if i % 3 == 2} == {1}
    assert order_violations(receiver, after) == []


@pytest.mark.integration
async def test_per_entry_order_holds_with_two_dispatchers_and_random_failures(
    outbox_db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings, receiver: Receiver
) -> None:
    rows = await seed(outbox_db, entries=6, per_entry=8)

    def plan(body: dict[str, Any], nth: int) -> Fate:
        # A deterministic script: about 1 in 3 tries fails, 1 in 12 hangs.
        digest = hashlib.sha256(f"{body['event_id']}:{nth}".encode()).digest()
        h = digest[0] % 12
        return "hang" if h == 0 else "fail" if h < 4 else "ok"

    receiver.plan, receiver.hang_s = plan, 0.5
    cfg = hook_settings(settings, receiver, webhook_timeout_s=0.2)
    async with make_http_client(cfg) as http:
        dispatchers = [
            Dispatcher(pool, cfg, http, concurrency=4, poll_interval_s=0.02) for _ in range(2)
        ]
        await run_until_settled(dispatchers, outbox_db)

    after = await outbox(outbox_db)
    assert {r["status"] for r in after} == {"delivered"}
    assert receiver.deduplicated() == event_ids(rows)
    assert order_violations(receiver, after) == []


@pytest.mark.integration
async def test_an_event_is_dead_after_max_attempts_and_its_entry_moves_on(
    outbox_db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings, receiver: Receiver
) -> None:
    await seed(outbox_db, entries=1, per_entry=3)
    receiver.plan = lambda body, nth: "fail" if body["sequence"] == 2 else "ok"
    cfg = hook_settings(settings, receiver, webhook_max_attempts=3)
    async with make_http_client(cfg) as http:
        await run_until_settled([Dispatcher(pool, cfg, http, poll_interval_s=0.02)], outbox_db)

        after = await outbox(outbox_db)
        assert [(r["status"], r["attempts"]) for r in after] == [
            ("delivered", 1),
            ("dead", 3),
            ("delivered", 1),
        ]
        assert after[1]["last_error"].startswith("HTTP 500")
        assert [a.sequence for a in receiver.arrivals] == [1, 2, 2, 2, 3]

        receiver.plan = lambda body, nth: "ok"
        assert await retry_events(outbox_db, dead=True) == 1
        assert await Dispatcher(pool, cfg, http).drain() == 1
    assert {r["status"] for r in await outbox(outbox_db)} == {"delivered"}


@pytest.mark.integration
async def test_events_without_a_route_are_skipped_not_posted(
    outbox_db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings, receiver: Receiver
) -> None:
    await seed(outbox_db, entries=1, per_entry=2)
    cfg = hook_settings(settings, receiver, webhook_routes={"anomaly.": f"{receiver.url}/a"})
    async with make_http_client(cfg) as http:
        await Dispatcher(pool, cfg, http).drain()
    after = await outbox(outbox_db)
    assert [(r["status"], r["attempts"]) for r in after] == [("skipped", 0), ("skipped", 0)]
    assert receiver.arrivals == []


@pytest.mark.integration
async def test_the_service_component_dispatches_only_when_routes_are_configured(
    outbox_db: asyncpg.Connection, settings: Settings, receiver: Receiver
) -> None:
    rows = await seed(outbox_db, entries=2, per_entry=2)
    idle = SimpleNamespace(settings=settings, background=[])
    await install(idle)
    assert idle.background == []

    runtime = SimpleNamespace(settings=hook_settings(settings, receiver), background=[])
    await install(runtime)
    stop = asyncio.Event()
    job = asyncio.create_task(runtime.background[0](stop))
    try:
        await wait_for(lambda: receiver.deduplicated() == event_ids(rows), 20, "deliveries")
    finally:
        stop.set()
        await asyncio.wait_for(job, 10)


# --- crash ------------------------------------------------------------------------------


def start_dispatcher(database_url: str, receiver: Receiver, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_DATABASE_URL=database_url,
        PROCESSOR_WEBHOOK_ROUTES=json.dumps({"*": f"{receiver.url}/hook"}),
        PROCESSOR_WEBHOOK_TIMEOUT_S="1",
        PROCESSOR_WEBHOOK_BACKOFF_INITIAL_S="0.05",
        PROCESSOR_HTTP_PORT="0",
        PROCESSOR_LOG_FORMAT="console",
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "processor",
                "events",
                "dispatch",
                "--poll-interval",
                "0.05",
                "--concurrency",
                "4",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.integration
@pytest.mark.slow
async def test_a_dispatcher_killed_mid_delivery_loses_nothing(
    outbox_db: asyncpg.Connection, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    rows = await seed(outbox_db, entries=4, per_entry=6)
    held = threading.Event()
    log = tmp_path / "dispatch.log"

    first = start_dispatcher(database_url, receiver, log)
    try:
        await wait_for(lambda: receiver.count() >= 8, 20, "eight deliveries")
        receiver.hold = held  # the next requests stay in flight until released
        arrived = receiver.count()
        await wait_for(lambda: receiver.count() > arrived, 10, "a request in flight")
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        receiver.hold = None
        held.set()

    in_flight = await outbox_db.fetchval(
        "SELECT count(*) FROM processor.outbox WHERE status = 'pending' AND leased_until > now()"
    )
    assert in_flight >= 1

    second = start_dispatcher(database_url, receiver, log)
    try:
        for _ in range(600):
            pending = await outbox_db.fetchval(
                "SELECT count(*) FROM processor.outbox WHERE status <> 'delivered'"
            )
            if pending == 0:
                break
            await asyncio.sleep(0.05)
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0, log.read_text()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()

    after = await outbox(outbox_db)
    assert {r["status"] for r in after} == {"delivered"}, log.read_text()
    assert receiver.deduplicated() == event_ids(rows)
    assert receiver.count() > len(rows)  # the ones in flight at the kill came again
    assert order_violations(receiver, after) == []
