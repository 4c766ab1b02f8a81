"""The exporter against real Redis: what DuckDB reads back, dead letters, recovery rules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from processor.adapters.redis_stream import StreamSource
from processor.core.contract import decode_entry
from processor.core.records import Record
from processor.settings import Settings
from processor.tools.export import (
    Exporter,
    ExportLimits,
    ExportStats,
    discard_uncommitted,
    run_export,
)
from processor.tools.export_decode import ChunkDecoder, StreamSpec
from processor.tools.export_files import (
    BatchFiles,
    Dataset,
    DiskFullError,
    data_files,
    file_name,
    temp_files,
)
from processor.tools.export_schema import records_to_batch, split_by_day
from processor.tools.export_verify import verify_dataset

from .test_export_helpers import (
    dataset_glob,
    entries,
    entry,
    expected_row,
    read_rows,
    xadd_all,
)

pytestmark = pytest.mark.integration

PROCESSOR = str(Path(sys.executable).with_name("processor"))

MALFORMED: list[tuple[dict[str, bytes], str]] = [
    ({"v": b"1", "imei": b"356307040000001", "payload": b"{not json"}, "invalid_json"),
    ({"v": b"2", "imei": b"356307040000001", "payload": b"{}"}, "unsupported_version"),
    ({"v": b"1", "imei": b"356307040000001"}, "missing_field"),
    ({"v": b"1", "imei": b"12345", "payload": b"{}"}, "bad_type"),
]


def settings_for(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


async def pending(client: aioredis.Redis, settings: Settings) -> int:
    summary = await client.xpending(settings.stream, settings.export_group)
    return int(summary["pending"])


def rejected_count(reason: str) -> float:
    value = REGISTRY.get_sample_value("processor_export_rejected_total", {"reason": reason})
    return value or 0.0


@pytest.mark.parametrize("workers", [0, 2])
async def test_duckdb_reads_back_exactly_the_records_sent(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path, workers: int
) -> None:
    sent = entries(3_000, devices=25, span_days=3)
    ids = await xadd_all(aredis, settings.stream, sent)

    stats = await run_export(
        settings_for(settings, export_max_rows=700, read_count=250, export_workers=workers),
        tmp_path,
        burst=True,
        handle_signals=False,
    )

    expected = sorted((expected_row(i, f) for i, f in zip(ids, sent, strict=True)), key=str)
    assert sorted(read_rows(tmp_path), key=str) == expected
    assert stats.rows == 3_000
    assert stats.rejected == 0
    assert await pending(aredis, settings) == 0
    days = sorted({p.parent.name for p in data_files(tmp_path)})
    assert days == ["date=2024-06-01", "date=2024-06-02", "date=2024-06-03", "date=2024-06-04"]


async def test_64_bit_io_values_are_exact_in_duckdb(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    big = [2**64 - 1, 2**53 + 1, 2**63 + 7]
    sent = [entry(1, 1_717_243_200_000 + n, 3) for n in range(3)]
    for fields, value in zip(sent, big, strict=True):
        body = orjson.loads(fields["payload"])
        body["io"] = {"78": {"$bigint": str(value)}, "256": {"$bytes": "AAH/"}}
        fields["payload"] = orjson.dumps(body)
    await xadd_all(aredis, settings.stream, sent)

    await run_export(settings, tmp_path, burst=True, handle_signals=False)

    with duckdb.connect() as con:
        got = con.sql(
            "SELECT (io->>'78')::UBIGINT, io->>'256' "
            f"FROM read_parquet('{dataset_glob(tmp_path)}') ORDER BY ts"
        ).fetchall()
    assert got == [(2**64 - 1, "0001ff"), (2**53 + 1, "0001ff"), (2**63 + 7, "0001ff")]


async def test_parquet_columns_have_the_documented_types(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    await xadd_all(aredis, settings.stream, entries(10))

    await run_export(settings, tmp_path, burst=True, handle_signals=False)

    (path,) = data_files(tmp_path)
    schema = pq.read_schema(path)
    types = {f.name: (str(f.type), f.nullable) for f in schema}
    assert types["ts"] == ("timestamp[ms, tz=UTC]", False)
    assert types["device_id"] == ("int64", False)
    assert types["generation"] == ("int16", True)
    assert types["io"] == ("string", False)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


async def test_malformed_entries_are_dead_lettered_with_a_reason_and_counted(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    good = entries(50)
    before = {reason: rejected_count(reason) for _, reason in MALFORMED}
    await xadd_all(aredis, settings.stream, good[:25] + [f for f, _ in MALFORMED] + good[25:])

    stats = await run_export(settings, tmp_path, burst=True, handle_signals=False)

    letters = await aredis.xrange(settings.dead_letter_stream)
    reasons = [fields[b"reason"].decode() for _, fields in letters]
    assert reasons == [reason for _, reason in MALFORMED]
    assert all(fields[b"source_id"] and fields[b"detail"] for _, fields in letters)
    assert (stats.rows, stats.rejected) == (50, len(MALFORMED))
    assert len(read_rows(tmp_path)) == 50
    assert await pending(aredis, settings) == 0
    for _, reason in MALFORMED:
        assert rejected_count(reason) == before[reason] + 1


async def test_files_roll_over_by_row_count(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    await xadd_all(aredis, settings.stream, entries(1_000))

    stats = await run_export(
        settings_for(settings, export_max_rows=200, read_count=100, export_read_count=100),
        tmp_path,
        burst=True,
        handle_signals=False,
    )

    assert stats.batches == 5
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in data_files(tmp_path)]
    assert (sum(sizes), max(sizes)) == (1_000, 200)


@pytest.mark.parametrize("workers", [0, 2])
async def test_batches_written_ahead_hold_every_row_once_in_row_groups(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path, workers: int
) -> None:
    sent = entries(3_000, devices=25, span_days=2)
    ids = await xadd_all(aredis, settings.stream, sent)
    limits = {"export_max_rows": 1_000, "read_count": 100, "export_read_count": 100}

    stats = await run_export(
        settings_for(settings, export_workers=workers, **limits),
        tmp_path,
        burst=True,
        handle_signals=False,
    )

    expected = sorted((expected_row(i, f) for i, f in zip(ids, sent, strict=True)), key=str)
    assert sorted(read_rows(tmp_path), key=str) == expected
    assert stats.batches == 3
    # Written ahead a fifth of export_max_rows at a time: several row groups per file.
    groups = [pq.ParquetFile(p).metadata.num_row_groups for p in data_files(tmp_path)]
    assert max(groups) >= 4
    assert temp_files(tmp_path) == []
    assert verify_dataset(tmp_path).clean()


async def test_a_failed_write_ahead_is_discarded_and_the_batch_written_whole(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = entries(1_000, devices=5)
    await xadd_all(aredis, settings.stream, sent)
    appended = BatchFiles.append
    calls = 0

    def full_once(self: BatchFiles, tables: dict[str, pa.Table]) -> None:
        nonlocal calls
        calls += 1
        appended(self, tables)
        if calls == 2:
            raise DiskFullError("[errno 28] No space left on device")

    monkeypatch.setattr(BatchFiles, "append", full_once)
    limits = {"export_max_rows": 500, "read_count": 50, "export_read_count": 50}

    stats = await run_export(
        settings_for(settings, **limits), tmp_path, burst=True, handle_signals=False
    )

    assert calls > 2
    assert (stats.rows, stats.batches) == (1_000, 2)
    assert temp_files(tmp_path) == []
    report = verify_dataset(tmp_path)
    assert (report.rows, report.clean()) == (1_000, True)
    assert await pending(aredis, settings) == 0


async def test_a_lost_group_is_created_again_and_the_export_goes_on(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    """Decoders reading new entries hit NOGROUP (Redis lost its state): the source takes
    over, creates the group again and the export carries on (rows may come twice)."""
    first = await xadd_all(aredis, settings.stream, entries(300))
    source = StreamSource(
        aredis,
        stream=settings.stream,
        group=settings.export_group,
        consumer=settings.consumer,
        dead_letter_stream=settings.dead_letter_stream,
        max_deliveries=settings.max_deliveries,
        claim_idle_ms=60_000,
        count=100,
        block_ms=50,
    )
    await source.ensure_group()
    spec = StreamSpec(settings.redis_dsn(), settings.stream, settings.export_group, source.consumer)
    limits = ExportLimits(max_rows=1_000, max_age_s=0.2, read_count=100, read_block_ms=50)
    decoder = ChunkDecoder(workers=0, max_entry_bytes=65_536, max_io_elements=512, stream=spec)
    with Dataset(tmp_path) as dataset, contextlib.closing(decoder):
        exporter = Exporter(source, dataset, limits, burst=False, decoder=decoder)
        task = asyncio.create_task(exporter.run())
        await until(lambda: exporter.stats.rows >= 300)
        await aredis.xgroup_destroy(settings.stream, settings.export_group)
        second = await xadd_all(aredis, settings.stream, entries(200))
        await until(lambda: exporter.stats.rows >= 800)  # all 500 again, from the new group
        exporter.stop()
        await asyncio.wait_for(task, 10)

    exported = {row[-2] for row in read_rows(tmp_path)}
    assert exported == set(first) | set(second)
    assert await pending(aredis, settings) == 0


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_a_redelivered_batch_replaces_the_file_it_wrote_before(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    """Crash between rename and XACK: the batch comes back and rewrites the same name."""
    sent = entries(400, span_days=2)
    ids = await xadd_all(aredis, settings.stream, sent)
    await run_export(settings, tmp_path, burst=True, handle_signals=False)
    written = {p.relative_to(tmp_path): p.read_bytes() for p in data_files(tmp_path)}
    # Put the entries back into this consumer's pending list, as if never acknowledged.
    await aredis.xgroup_setid(settings.stream, settings.export_group, "0")
    await aredis.xreadgroup(settings.export_group, settings.consumer, {settings.stream: ">"})

    stats = await run_export(settings, tmp_path, burst=True, handle_signals=False)

    assert stats.rewritten == len(written) == 3
    assert {p.relative_to(tmp_path) for p in data_files(tmp_path)} == set(written)
    assert all(p.name == file_name(ids[0]) for p in written)
    assert len(read_rows(tmp_path)) == 400
    assert verify_dataset(tmp_path).clean()
    assert await pending(aredis, settings) == 0


async def test_unacknowledged_files_of_another_consumer_are_discarded(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    """A batch written by a consumer of another name is redone, not kept beside its redo."""
    sent = entries(300)
    await xadd_all(aredis, settings.stream, sent)
    first = settings_for(settings, consumer="old-name")
    await run_export(first, tmp_path, burst=True, handle_signals=False)
    await aredis.xgroup_setid(settings.stream, settings.export_group, "0")
    await aredis.xreadgroup(settings.export_group, "old-name", {settings.stream: ">"}, count=120)
    await aredis.xreadgroup(settings.export_group, settings.consumer, {settings.stream: ">"})

    await run_export(settings_for(settings, claim_idle_ms=1), tmp_path, burst=True)

    # The old consumer's entries are not idle long enough to be claimed yet: what it left
    # in the dataset must be gone, and this consumer's share rewritten once.
    report = verify_dataset(tmp_path)
    assert report.clean()
    assert report.rows == 180


@pytest.mark.parametrize("workers", ["0", "2"])
async def test_sigterm_flushes_the_batch_and_exits_cleanly(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path, workers: str
) -> None:
    await xadd_all(aredis, settings.stream, entries(500))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_REDIS_URL=settings.redis_dsn(),
        PROCESSOR_STREAM=settings.stream,
        PROCESSOR_DEAD_LETTER_STREAM=settings.dead_letter_stream,
        PROCESSOR_EXPORT_MAX_AGE_S="3600",
        PROCESSOR_EXPORT_WORKERS=workers,
        PROCESSOR_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen([PROCESSOR, "export", "--out", str(tmp_path)], env=env)  # noqa: ASYNC220 - the exporter under test is a real child process
    try:
        for _ in range(200):  # wait until it has read everything (held in its batch)
            await asyncio.sleep(0.05)
            groups = await aredis.xinfo_groups(settings.stream)
            if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 500:
                break
        assert not data_files(tmp_path)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert len(read_rows(tmp_path)) == 500
    assert await pending(aredis, settings) == 0


def test_verify_reports_duplicates_and_fails(tmp_path: Path) -> None:
    records = [decode_entry(f"1-{n}", entry(1, 1_717_243_200_000 + n, n)) for n in range(5)]
    assert all(isinstance(r, Record) for r in records)
    table = pa.Table.from_batches([records_to_batch(records)])  # type: ignore[arg-type]
    with Dataset(tmp_path) as ds:
        ds.write_batch("1-0", split_by_day(table))
        ds.write_batch("1-3", split_by_day(table.slice(3)))

    report = verify_dataset(tmp_path)

    assert (report.files, report.rows, report.duplicate_keys) == (2, 7, 2)
    assert report.duplicate_entries == 2
    assert not report.clean()
    assert not report.clean(allow_resends=True)
    result = subprocess.run(
        [PROCESSOR, "export", "verify", str(tmp_path)], capture_output=True, check=False
    )
    assert result.returncode == 1
    assert b"clean: no" in result.stdout


async def test_entries_claimed_from_a_dead_consumer_do_not_join_the_redone_batch(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    """The redone batch keeps its first id even when lower ids are claimed right after."""
    ids = await xadd_all(aredis, settings.stream, entries(300))
    await aredis.xgroup_create(settings.stream, settings.export_group, id="0")
    await aredis.xreadgroup(settings.export_group, "dead", {settings.stream: ">"}, count=100)
    await run_export(settings, tmp_path, burst=True, handle_signals=False)  # ids[100:]
    first_files = len(data_files(tmp_path))
    # As if this consumer died between renaming its file and acknowledging it.
    await aredis.xgroup_setid(settings.stream, settings.export_group, ids[99])
    await aredis.xreadgroup(settings.export_group, settings.consumer, {settings.stream: ">"})
    await asyncio.sleep(0.1)

    stats = await export_with_claims(settings, aredis, tmp_path, claim_idle_ms=50)

    assert stats.rewritten == first_files
    assert {p.name for p in data_files(tmp_path)} == {file_name(ids[0]), file_name(ids[100])}
    report = verify_dataset(tmp_path)
    assert (report.rows, report.clean()) == (300, True)
    assert await pending(aredis, settings) == 0


async def export_with_claims(
    settings: Settings, client: aioredis.Redis, out: Path, *, claim_idle_ms: int
) -> ExportStats:
    """A burst export whose XAUTOCLAIM takes entries idle for only ``claim_idle_ms``."""
    source = StreamSource(
        client,
        stream=settings.stream,
        group=settings.export_group,
        consumer=settings.consumer,
        dead_letter_stream=settings.dead_letter_stream,
        max_deliveries=settings.max_deliveries,
        claim_idle_ms=claim_idle_ms,
        count=settings.read_count,
        block_ms=1,
    )
    with Dataset(out) as dataset:
        await discard_uncommitted(client, source, dataset)
        exporter = Exporter(source, dataset, ExportLimits.from_settings(settings), burst=True)
        return await exporter.run()


def test_verify_tells_device_resends_from_exported_twice(tmp_path: Path) -> None:
    resend = [decode_entry(f"2-{n}", entry(1, 1_717_243_200_000, 7)) for n in range(2)]
    table = pa.Table.from_batches([records_to_batch(resend)])  # type: ignore[arg-type]
    with Dataset(tmp_path) as ds:
        ds.write_batch("2-0", split_by_day(table))

    report = verify_dataset(tmp_path)

    assert (report.duplicate_keys, report.duplicate_entries, report.resends) == (1, 0, 1)
    assert not report.clean()
    assert report.clean(allow_resends=True)


def test_verify_flags_foreign_and_misplaced_files(tmp_path: Path) -> None:
    records = [decode_entry("3-0", entry(1, 1_717_243_200_000, 1))]
    table = pa.Table.from_batches([records_to_batch(records)])  # type: ignore[arg-type]
    (tmp_path / "date=2024-06-05").mkdir()
    pq.write_table(table, tmp_path / "date=2024-06-05" / "part-3-0.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "date=2024-06-05" / "part-4-0.parquet")

    report = verify_dataset(tmp_path)

    assert len(report.problems) == 2
    assert "other days" in report.problems[0]
    assert "schema differs" in report.problems[1]
    assert not report.clean(allow_resends=True)
