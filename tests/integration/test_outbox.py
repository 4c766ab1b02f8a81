"""The outbox: event building, deterministic identity, transactional recording, operator CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import processor
from processor.adapters.outbox import (
    DomainEvent,
    EventContext,
    EventError,
    build_event,
    list_events,
    record_events,
    retry_events,
)

MIGRATION = Path(processor.__file__).parent / "migrations" / "0003_outbox.sql"
T0 = dt.datetime(2026, 5, 1, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
async def outbox_db(pg: asyncpg.Connection) -> asyncpg.Connection:
    """This session's database with an empty outbox (the migration file applied as is)."""
    await pg.execute("CREATE SCHEMA IF NOT EXISTS processor")
    await pg.execute(MIGRATION.read_text())
    await pg.execute("TRUNCATE processor.outbox RESTART IDENTITY")
    return pg


def timing_row(entry: int, ts: dt.datetime, **changes: Any) -> dict[str, Any]:
    row = {
        "id": 7,
        "event": 1,
        "stage": 2,
        "entry": entry,
        "geofence": 30,
        "kind": "finish",
        "pass": 1,
        "ts": ts,
        "method": "interpolated",
        "confidence": "high",
    }
    return {**row, **changes}


def result_row(entry: int, rank: int, updated_at: dt.datetime = T0) -> dict[str, Any]:
    return {"id": entry, "stage": 2, "entry": entry, "rank": rank, "updated_at": updated_at}


async def outbox_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM processor.outbox ORDER BY id")


def test_event_body_carries_row_and_context_as_plain_json() -> None:
    event = build_event(
        "timing_record.created",
        timing_row(5, T0 + dt.timedelta(microseconds=123_456)),
        EventContext(entry_number=42),
    )
    assert event.body["row"]["ts"] == "2026-05-01T10:00:00.123Z"
    assert event.body["context"] == {
        "event": 1,
        "stage": 2,
        "entry": 5,
        "entry_number": 42,
        "device_imei": None,
    }
    assert event.subject == "timing_record:2:5:30:finish:1"
    assert event.entry_key == "1:42"


def test_anomaly_without_entry_is_ordered_by_device() -> None:
    row = {
        "event": 1,
        "entry": None,
        "device_imei": "356307042441013",
        "kind": "sos",
        "started_at": T0,
        "ended_at": None,
    }
    event = build_event("anomaly.opened", row)
    assert event.entry_key == "1:device:356307042441013"
    assert event.subject == "anomaly:356307042441013:sos:2026-05-01T10:00:00.000Z"


def test_unknown_type_and_missing_key_column_are_refused() -> None:
    with pytest.raises(EventError, match="unknown event type"):
        build_event("timing_record.deleted", timing_row(1, T0))
    with pytest.raises(EventError, match="pass"):
        build_event("timing_record.created", {"stage": 2, "entry": 1, "geofence": 3, "kind": "x"})


@pytest.mark.integration
async def test_recording_twice_creates_each_event_once(outbox_db: asyncpg.Connection) -> None:
    events = [
        build_event("timing_record.created", timing_row(e, T0), EventContext(entry_number=e))
        for e in range(1, 4)
    ]
    async with outbox_db.transaction():
        assert await record_events(outbox_db, events) == 3
    async with outbox_db.transaction():
        assert await record_events(outbox_db, events) == 0
    rows = await outbox_rows(outbox_db)
    assert [r["status"] for r in rows] == ["pending"] * 3
    assert [r["entry_key"] for r in rows] == ["1:1", "1:2", "1:3"]
    assert json.loads(rows[0]["body"])["row"]["ts"] == "2026-05-01T10:00:00.000Z"


@pytest.mark.integration
async def test_recomputation_with_only_volatile_columns_changed_records_nothing(
    outbox_db: asyncpg.Connection,
) -> None:
    first = build_event("stage_result.updated", result_row(1, rank=3))
    again = build_event(
        "stage_result.updated", result_row(1, rank=3, updated_at=T0 + dt.timedelta(hours=1))
    )
    assert await record_events(outbox_db, [first]) == 1
    assert await record_events(outbox_db, [again]) == 0


@pytest.mark.integration
async def test_a_value_flipping_back_and_forth_yields_one_event_per_flip(
    outbox_db: asyncpg.Connection,
) -> None:
    ranks = [3, 2, 3, 2]
    events = [build_event("stage_result.updated", result_row(1, rank=r)) for r in ranks]
    assert await record_events(outbox_db, events[:2]) == 2
    assert await record_events(outbox_db, events[2:]) == 2
    rows = await outbox_rows(outbox_db)
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert len({r["event_id"] for r in rows}) == 4
    assert [json.loads(r["body"])["row"]["rank"] for r in rows] == ranks


@pytest.mark.integration
async def test_an_anomaly_created_already_ended_records_opened_then_closed(
    outbox_db: asyncpg.Connection,
) -> None:
    row = {
        "event": 1,
        "entry": 3,
        "device_imei": "1",
        "kind": "stopped",
        "started_at": T0,
        "ended_at": T0 + dt.timedelta(minutes=4),
    }
    events = [build_event(t, row) for t in ("anomaly.opened", "anomaly.closed")]
    assert await record_events(outbox_db, events) == 2
    assert await record_events(outbox_db, events[1:]) == 0
    assert [r["type"] for r in await outbox_rows(outbox_db)] == ["anomaly.opened", "anomaly.closed"]


@pytest.mark.integration
async def test_event_ids_are_the_same_when_the_history_is_recorded_again(
    outbox_db: asyncpg.Connection,
) -> None:
    events = [build_event("stage_result.updated", result_row(1, rank=r)) for r in (5, 4, 5)]
    await record_events(outbox_db, events)
    first_ids = [r["event_id"] for r in await outbox_rows(outbox_db)]
    await outbox_db.execute("TRUNCATE processor.outbox")
    for event in events:  # one by one this time, as a live run would
        await record_events(outbox_db, [event])
    assert [r["event_id"] for r in await outbox_rows(outbox_db)] == first_ids


@pytest.mark.integration
async def test_events_of_a_rolled_back_transaction_do_not_exist(
    outbox_db: asyncpg.Connection,
) -> None:
    event = build_event(
        "penalty.created",
        {"stage": 2, "entry": 1, "reason": "speeding", "geofence": 9, "seq": 1, "seconds": 60},
    )

    class Abort(Exception):
        pass

    async def write_then_fail() -> None:
        async with outbox_db.transaction():
            assert await record_events(outbox_db, [event]) == 1
            raise Abort

    with pytest.raises(Abort):
        await write_then_fail()
    assert await outbox_rows(outbox_db) == []


@pytest.mark.integration
async def test_concurrent_writers_recording_the_same_change_keep_one_event(
    outbox_db: asyncpg.Connection, database_url: str
) -> None:
    other = await asyncpg.connect(database_url)
    try:
        event = build_event(
            "anomaly.opened",
            {"event": 1, "entry": 3, "device_imei": "1", "kind": "crash", "started_at": T0},
        )
        tx1, tx2 = outbox_db.transaction(), other.transaction()
        await tx1.start()
        await tx2.start()
        assert await record_events(outbox_db, [event]) == 1
        await tx1.commit()
        assert await record_events(other, [event]) == 0
        await tx2.commit()
    finally:
        await other.close()
    assert len(await outbox_rows(outbox_db)) == 1


@pytest.mark.integration
async def test_retry_makes_dead_events_pending_with_attempts_from_zero(
    outbox_db: asyncpg.Connection,
) -> None:
    events: list[DomainEvent] = [
        build_event("stage_result.updated", result_row(e, rank=1)) for e in (1, 2, 3)
    ]
    await record_events(outbox_db, events)
    await outbox_db.execute(
        "UPDATE processor.outbox SET status = 'dead', attempts = 10 WHERE id IN (1, 2)"
    )
    event_id = await outbox_db.fetchval("SELECT event_id FROM processor.outbox WHERE id = 2")
    assert await retry_events(outbox_db, event_ids=[event_id]) == 1
    assert await retry_events(outbox_db, dead=True) == 1
    pending = await list_events(outbox_db, status="pending")
    assert sorted(r["id"] for r in pending) == [1, 2, 3]
    assert {r["attempts"] for r in pending} == {0}
    assert await list_events(outbox_db, event_type="anomaly.") == []
    assert len(await list_events(outbox_db, event_type="stage_result", limit=2)) == 2


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(PROCESSOR_DATABASE_URL=database_url, PROCESSOR_LOG_FORMAT="console")
    return subprocess.run(
        [sys.executable, "-m", "processor", "events", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
async def test_cli_lists_and_retries_events(
    outbox_db: asyncpg.Connection, database_url: str
) -> None:
    await record_events(outbox_db, [build_event("stage_result.updated", result_row(1, rank=1))])
    await outbox_db.execute("UPDATE processor.outbox SET status = 'dead', last_error = 'HTTP 500'")

    listed = run_cli(database_url, "list", "--status", "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    row = json.loads(listed.stdout.splitlines()[0])
    assert (row["type"], row["status"], row["last_error"]) == (
        "stage_result.updated",
        "dead",
        "HTTP 500",
    )
    uuid.UUID(row["event_id"])

    retried = run_cli(database_url, "retry", "--dead")
    assert retried.returncode == 0, retried.stderr
    assert "1 event(s) pending again" in retried.stdout
    assert await outbox_db.fetchval("SELECT status FROM processor.outbox") == "pending"

    table = run_cli(database_url, "list")
    assert table.returncode == 0
    assert "stage_result.updated" in table.stdout
    assert run_cli(database_url, "retry").returncode == 2
