"""Secrets never reach the output: passwords in the DSNs, from the environment or *_FILE.

``processor run`` is started with a password in its PostgreSQL or Redis URL against a
port nobody listens on (it keeps retrying and logging the failure), with a malformed
URL (it refuses to start and says why), at debug level; the password must not appear in
anything it prints.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from .helpers import PROCESSOR
from .servers import PrivatePostgres, PrivateRedis, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "Sup3r-s3cret-pa55word"


def base_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_HTTP_PORT="0",
        PROCESSOR_LOG_LEVEL="debug",
        PROCESSOR_RETRY_MAX_S="0.3",
        PROCESSOR_STREAM="secrets:records",
        PROCESSOR_DOMAIN_ENABLED="false",
    )
    env.update(values)
    return env


async def output_of(env: dict[str, str], seconds: float) -> tuple[int, str]:
    """Run ``processor run`` for up to ``seconds``, then SIGTERM; exit status and output."""
    process = await asyncio.create_subprocess_exec(
        PROCESSOR, "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT
    )
    reading = asyncio.ensure_future(process.communicate())
    done, _ = await asyncio.wait({reading}, timeout=seconds)
    if not done:
        process.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(reading, timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def test_a_password_in_an_unreachable_postgres_url_is_never_printed() -> None:
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/db"
    code, out = await output_of(base_env(PROCESSOR_DATABASE_URL=url), seconds=4)
    assert "waiting for PostgreSQL" in out
    assert PASSWORD not in out
    assert code in (0, 1)


async def test_a_password_in_an_unreachable_redis_url_is_never_printed(
    fault_db: str, private_pg: PrivatePostgres
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    env = base_env(PROCESSOR_DATABASE_URL=fault_db, PROCESSOR_REDIS_URL=url)
    _, out = await output_of(env, seconds=4)
    assert "waiting for dependency" in out or "start interrupted" in out, out[-2000:]
    assert PASSWORD not in out


async def test_a_wrong_redis_password_is_reported_without_the_password(
    fault_db: str, private_redis: PrivateRedis
) -> None:
    client = redis.Redis(port=private_redis.port)
    client.config_set("requirepass", "the-right-one")
    client.close()
    url = f"redis://default:{PASSWORD}@127.0.0.1:{private_redis.port}/0"
    env = base_env(PROCESSOR_DATABASE_URL=fault_db, PROCESSOR_REDIS_URL=url)
    code, out = await output_of(env, seconds=10)
    assert code == 1
    assert "cannot start" in out
    assert "AuthenticationError" in out, out[-2000:]
    assert "waiting for dependency" not in out  # wrong credentials never heal: no retries
    assert PASSWORD not in out


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@127.0.0.1:notaport/db",
        f"postgresql://app:{PASSWORD}@127.0.0.1:5432/db?sslmode=bogus",
        f"mysql://app:{PASSWORD}@127.0.0.1/db",
    ],
)
async def test_a_malformed_url_is_refused_without_printing_its_password(url: str) -> None:
    code, out = await output_of(base_env(PROCESSOR_DATABASE_URL=url), seconds=20)
    assert code == 1
    assert "cannot start" in out
    assert "waiting for PostgreSQL" not in out  # a malformed URL never heals: no retries
    assert PASSWORD not in out


async def test_a_secret_from_a_file_is_used_and_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text(f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/db\n")
    env = base_env(PROCESSOR_DATABASE_URL_FILE=str(secret))
    _, out = await output_of(env, seconds=4)
    assert "waiting for PostgreSQL" in out
    assert PASSWORD not in out
