"""Crash test: the exporter as a real process, SIGKILLed at random points and restarted."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import psutil
import pytest
import redis.asyncio as aioredis

from processor.settings import Settings

from .test_export_helpers import dataset_glob, entries, xadd_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESSOR = str(Path(sys.executable).with_name("processor"))
TOTAL = 200_000
KILLS = 6
MALFORMED = {"v": b"1", "imei": b"356307040000001", "payload": b'{"codec": 142'}


def exporter_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_REDIS_URL=settings.redis_dsn(),
        PROCESSOR_STREAM=settings.stream,
        PROCESSOR_DEAD_LETTER_STREAM=settings.dead_letter_stream,
        PROCESSOR_EXPORT_MAX_ROWS="3000",  # many flushes: many rename-before-ack windows
        PROCESSOR_EXPORT_MAX_AGE_S="1",
        PROCESSOR_READ_COUNT="1000",
        PROCESSOR_EXPORT_READ_COUNT="1000",  # small reads: the kills land before the end
        PROCESSOR_LOG_LEVEL="info",  # restarts log the files they rewrite
    )
    return env


def start(
    settings: Settings, out: Path, log: Path, *args: str, workers: int = 0
) -> subprocess.Popen[bytes]:
    with log.open("ab") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [PROCESSOR, "export", "--out", str(out), "--workers", str(workers), *args],
            env=exporter_env(settings),
            stderr=stderr,
        )


async def assert_gone(pids: list[int]) -> None:
    """Decode workers of a killed exporter exit on their own (no orphans left running)."""
    for _ in range(100):
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        alive = [pid for pid in alive if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"worker processes still running: {alive}")


def tail_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def acknowledged(client: aioredis.Redis, settings: Settings) -> int:
    """Entries of the stream the export group has acknowledged so far."""
    groups = await client.xinfo_groups(settings.stream)
    if not groups:
        return 0
    info = groups[0]
    return TOTAL - int(info["lag"] or 0) - int(info["pending"])


def file_states(out: Path) -> set[tuple[str, int]]:
    """Every data file with its inode: a rename over an old file shows up as a change."""
    return {(str(p), p.stat().st_ino) for p in out.glob("date=*/part-*.parquet")}


async def after_a_rename(out: Path) -> None:
    """Return as soon as a data file is renamed into place (before its batch's XACK)."""
    before = file_states(out)
    for _ in range(60_000):  # about 30 s: a batch is flushed at least every second
        if not file_states(out) <= before:
            return
        await asyncio.sleep(0.0005)
    raise AssertionError("no file was renamed into place")


async def kill_after_progress(
    client: aioredis.Redis,
    settings: Settings,
    proc: subprocess.Popen[bytes],
    moment: float | None,
    log: Path,
    out: Path,
    target: int,
) -> int:
    """Wait for acknowledged progress up to ``target`` entries at least, then SIGKILL
    ``moment`` s later or right after a rename.

    The kills are spread over the stream by ``target`` rather than by time alone, so that
    however fast the exporter is, the last one still lands before the stream is drained.
    """
    before = await acknowledged(client, settings)
    while (done := await acknowledged(client, settings)) <= before or done < target:
        assert proc.poll() is None, tail(log)
        await asyncio.sleep(0.005)
    if moment is None:
        await after_a_rename(out)
    else:
        await asyncio.sleep(moment)
    workers = [child.pid for child in psutil.Process(proc.pid).children()]
    proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proc.wait, 30)
    await assert_gone(workers)
    return await acknowledged(client, settings)


async def test_sigkill_at_random_points_leaves_every_record_exactly_once(
    settings: Settings, aredis: aioredis.Redis, tmp_path: Path
) -> None:
    rng = random.Random(9)
    sent = entries(TOTAL - TOTAL // 100, devices=1_000, span_days=2)
    for _ in range(TOTAL // 100):
        sent.insert(rng.randrange(len(sent)), MALFORMED)
    ids = await xadd_all(aredis, settings.stream, sent)
    valid_ids = {i for i, fields in zip(ids, sent, strict=True) if fields is not MALFORMED}

    out, log = tmp_path / "dataset", tmp_path / "exporter.log"
    progress = []
    for n in range(KILLS):
        # Runs alternate between decoding in process and in two worker processes.
        proc = start(settings, out, log, workers=2 * (n // 2 % 2))
        # Odd kills aim at the window between rename and XACK; even ones land anywhere
        # (a tenth of a second: at most some 30,000 entries even at full speed).
        moment = None if n % 2 else rng.uniform(0.0, 0.1)
        target = (n + 1) * TOTAL // (KILLS + 2)
        try:
            progress.append(
                await kill_after_progress(aredis, settings, proc, moment, log, out, target)
            )
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rewrites = tail_count(log, "rewrote the files of an unacknowledged delivery")
    print(f"acknowledged at each kill: {progress}; restarts that rewrote files: {rewrites}")
    assert progress[-1] < TOTAL, "every kill must land before the stream is drained"
    final = start(settings, out, log, "--burst")
    code = await asyncio.to_thread(final.wait, 120)
    assert code == 0, tail(log)

    with duckdb.connect() as con:
        exported = con.sql(f"SELECT stream_id FROM read_parquet('{dataset_glob(out)}')").fetchall()
    assert len(exported) == len(valid_ids)
    assert {row[0] for row in exported} == valid_ids
    summary = await aredis.xpending(settings.stream, settings.export_group)
    assert summary["pending"] == 0
    assert await aredis.xlen(settings.dead_letter_stream) == TOTAL // 100
    check = await asyncio.to_thread(
        subprocess.run, [PROCESSOR, "export", "verify", str(out)], capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout.decode()
