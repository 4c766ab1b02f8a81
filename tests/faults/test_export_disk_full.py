"""Fault injection: the exporter's filesystem fills up mid-stream, then space is freed.

The dataset lives on a small tmpfs mounted for the test. While the disk is full the
exporter must not acknowledge entries it could not write, must say so in its log and
metrics, and must not exit; once space is freed it finishes by itself, and
``processor export verify`` finds every record exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from processor.settings import Settings

from .helpers import PROCESSOR, Producer, Service, report, workload
from .servers import PrivateRedis, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 20_000
DISK = "4m"
ROOM_LEFT = 96 * 1024  # bytes left free by the filler: a few batches, then ENOSPC


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (we run as root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = Path(tempfile.mkdtemp(prefix="faults-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()


def fill(disk: Path, leave: int) -> Path:
    """A filler file taking all space but ``leave`` bytes."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - leave
    with filler.open("wb") as out:
        out.write(b"\0" * size)
    return filler


def start_exporter(settings: Settings, out: Path, log: Path) -> Service:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_REDIS_URL=settings.redis_dsn(),
        PROCESSOR_STREAM=settings.stream,
        PROCESSOR_DEAD_LETTER_STREAM=settings.dead_letter_stream,
        PROCESSOR_EXPORT_MAX_ROWS="2000",
        PROCESSOR_EXPORT_MAX_AGE_S="0.5",
        PROCESSOR_READ_COUNT="500",
        PROCESSOR_RETRY_MAX_S="0.5",
        PROCESSOR_HTTP_HOST="127.0.0.1",
        PROCESSOR_LOG_FORMAT="console",
    )
    args = [PROCESSOR, "export", "--out", str(out), "--metrics-port", str(port)]
    with log.open("ab") as sink:
        process = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return Service(process, port, log)


async def acknowledged(url: str, stream: str, group: str) -> int:
    """Entries the export group has acknowledged (delivered minus pending)."""
    client = aioredis.Redis.from_url(url)
    try:
        length = await client.xlen(stream)
        for info in await client.xinfo_groups(stream):
            if info["name"] in (group, group.encode()):
                return int(length) - int(info["lag"] or 0) - int(info["pending"])
        return 0
    finally:
        await client.aclose()


def verify(out: Path) -> str:
    result = subprocess.run(
        [PROCESSOR, "export", "verify", str(out), "--allow-resends"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rows_of(verify_output: str) -> int:
    line = next(x for x in verify_output.splitlines() if x.startswith("rows: "))
    return int(line.removeprefix("rows: "))


async def wait_for_flat(service: Service, settings: Settings, seconds: float) -> int:
    """Wait until acknowledgements stop moving for ``seconds`` (the disk is full)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() - since < seconds:
        assert service.process.poll() is None, service.output()[-3000:]
        assert time.monotonic() < deadline, "acknowledgements never stopped"
        now = await acknowledged(settings.redis_dsn(), settings.stream, settings.export_group)
        if now != last:
            last, since = now, time.monotonic()
        await asyncio.sleep(0.1)
    return last


async def test_a_full_disk_holds_acknowledgements_until_space_is_freed(
    fault_settings: Settings, private_redis: PrivateRedis, small_disk: Path, tmp_path: Path
) -> None:
    work = workload(TOTAL, seed=31)
    await Producer(private_redis.url, fault_settings.stream, work.entries, rate_per_s=1e9).run()
    filler = fill(small_disk, ROOM_LEFT)
    out = small_disk / "dataset"
    exporter = start_exporter(fault_settings, out, tmp_path / "export.log")
    try:
        acked_when_full = await wait_for_flat(exporter, fault_settings, seconds=3)
        assert 0 < acked_when_full < TOTAL
        errors = exporter.metric("processor_export_write_errors_total")
        written_when_full = rows_of(verify(out))
        filler.unlink()
        freed = time.monotonic()
        while await acknowledged(private_redis.url, fault_settings.stream, "analytics") < TOTAL:
            assert exporter.process.poll() is None, exporter.output()[-3000:]
            assert time.monotonic() - freed < 60, exporter.output()[-3000:]
            await asyncio.sleep(0.05)
        recovery = time.monotonic() - freed
        assert await exporter.stop() == 0, exporter.output()[-3000:]
    finally:
        exporter.kill()

    dead_when_full = work.malformed  # an upper bound: dead letters go with their batch
    assert acked_when_full - dead_when_full <= written_when_full <= acked_when_full
    assert errors > 0
    assert "No space left on device" in exporter.output()
    final = verify(out)
    assert rows_of(final) == TOTAL - work.malformed, final
    report(
        "exporter disk full",
        acknowledged_when_full=acked_when_full,
        write_errors=int(errors),
        finished_after_space_freed=recovery,
    )
