"""`processor run` as operators meet it: start-up checks, probes, metrics, signals."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from processor.adapters.directus_schema import bootstrap
from processor.adapters.migrations import migrate
from processor.settings import Settings, load_settings

from ..conftest import ADMIN_URL, _with_database
from .pipeline_helpers import entry, processor_env, xadd_all

pytestmark = pytest.mark.integration

PROCESSOR = str(Path(sys.executable).with_name("processor"))


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return processor_env(settings, **({"PROCESSOR_LOG_FORMAT": "json"} | extra))


def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PROCESSOR, "run"], env=env, stderr=subprocess.PIPE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def fresh_database() -> str:
    """A database of its own (this test drops a column), migrated and bootstrapped."""
    name = f"ptest_svc_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = _with_database(ADMIN_URL, name)
    conn = await asyncpg.connect(url)
    await migrate(conn, load_settings(database_url=url))
    await bootstrap(conn)
    await conn.close()
    yield url  # type: ignore[misc]
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def test_run_refuses_to_start_naming_a_missing_directus_column(
    settings: Settings, fresh_database: str
) -> None:
    conn = await asyncpg.connect(fresh_database)
    await conn.execute("ALTER TABLE stages DROP COLUMN opens_at")
    await conn.close()
    env = env_for(settings, PROCESSOR_DATABASE_URL=fresh_database)

    done = await asyncio.to_thread(
        subprocess.run, [PROCESSOR, "run", "--burst"], env=env, capture_output=True, timeout=60
    )

    assert done.returncode == 1
    assert b"stages.opens_at" in done.stderr


async def test_run_refuses_an_unmigrated_database(settings: Settings) -> None:
    name = f"ptest_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        env = env_for(settings, PROCESSOR_DATABASE_URL=_with_database(ADMIN_URL, name))
        done = await asyncio.to_thread(
            subprocess.run, [PROCESSOR, "run", "--burst"], env=env, capture_output=True, timeout=60
        )
        assert done.returncode == 1
        assert b"processor schema migrate" in done.stderr
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_invalid_setting_is_named_and_exits_2(settings: Settings) -> None:
    env = env_for(settings, PROCESSOR_BATCH_MAX_SIZE="lots")
    done = await asyncio.to_thread(
        subprocess.run, [PROCESSOR, "run"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"PROCESSOR_BATCH_MAX_SIZE" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_probes_metrics_check_and_graceful_sigterm(
    settings: Settings, clean_db: asyncpg.Connection, aredis: aioredis.Redis
) -> None:
    port = free_port()
    env = env_for(settings, PROCESSOR_HTTP_PORT=str(port), PROCESSOR_HTTP_HOST="127.0.0.1")
    proc = start(env)
    try:
        for _ in range(100):
            check = await asyncio.to_thread(
                subprocess.run, [PROCESSOR, "run", "--check"], env=env, capture_output=True
            )
            if check.returncode == 0:
                break
            await asyncio.sleep(0.2)
        assert check.returncode == 0
        await xadd_all(aredis, settings.stream, [entry(7, i) for i in range(50)])
        await xadd_all(aredis, settings.stream, [{"v": b"1", "imei": b"1", "payload": b"{}"}])
        for _ in range(100):
            if await clean_db.fetchval("SELECT count(*) FROM positions") == 50:
                break
            await asyncio.sleep(0.1)
        metrics = await asyncio.to_thread(_get, port, "/metrics")
        assert "processor_records_written_total 50.0" in metrics
        assert 'processor_dead_letters_total{reason="bad_type"} 1.0' in metrics
        assert (await asyncio.to_thread(_get, port, "/healthz")).strip() == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"processor stopped" in err
    after = await asyncio.to_thread(
        subprocess.run, [PROCESSOR, "run", "--check"], env=env, capture_output=True
    )
    assert after.returncode == 1


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())
