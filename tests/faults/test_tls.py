"""TLS to both servers with real certificates, through the URLs only (docs/security.md).

A throwaway CA signs a certificate for localhost/127.0.0.1; a private PostgreSQL cluster
runs with ``ssl = on`` and a private redis-server listens on a TLS port only. The
processor, given ``sslmode=verify-full&sslrootcert=…`` and ``rediss://…?ssl_ca_certs=…``,
stores every record; its PostgreSQL sessions are encrypted.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis

from processor.settings import load_settings

from ..integration.pipeline_helpers import entry
from .conftest import prepare_database
from .helpers import PROCESSOR, Producer, processor_env
from .servers import PG_USER, PrivatePostgres, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    """A CA and a server certificate for localhost and 127.0.0.1, readable by postgres."""
    root = Path(tempfile.mkdtemp(prefix="faults-tls-"))
    ca_key, ca, key, csr, cert = (root / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    try:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=faults-ca", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                 "-keyout", str(key), "-out", str(csr))  # fmt: skip
        ext = root / "ext.cnf"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                 "-out", str(cert))  # fmt: skip
        if os.geteuid() == 0:  # PostgreSQL wants its key owned by itself, mode 0600
            entry_ = pwd.getpwnam(PG_USER)
            for path in (root, cert, key, ca):
                os.chown(path, entry_.pw_uid, entry_.pw_gid)
        key.chmod(0o600)
        yield Certs(ca, cert, key)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_pg(certs: Certs) -> Iterator[PrivatePostgres]:
    """A cluster of its own with ``ssl = on`` (host connections may use TLS)."""
    server = PrivatePostgres()
    try:
        server.init()
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.write(f"ssl = on\nssl_cert_file = '{certs.cert}'\nssl_key_file = '{certs.key}'\n")
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def tls_redis(certs: Certs) -> Iterator[int]:
    """A redis-server with a TLS port only (plain port disabled); yields the port."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="faults-tls-redis-"))
    args = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
            "--dir", str(workdir), "--save", ""]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _tls_ping(port, certs.ca), 20, "the TLS redis-server")
        yield port
    finally:
        process.kill()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _tls_ping(port: int, ca: Path) -> bool:
    client = redis.Redis(
        host="localhost", port=port, ssl=True, ssl_ca_certs=str(ca), socket_timeout=1
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


async def test_the_processor_stores_everything_over_tls_to_both_servers(
    certs: Certs, tls_pg: PrivatePostgres, tls_redis: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = f"?sslmode=verify-full&sslrootcert={certs.ca}"
    admin = f"postgresql://postgres@localhost:{tls_pg.port}/postgres{tls}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute("CREATE DATABASE tls")
    finally:
        await conn.close()
    database_url = f"postgresql://postgres@localhost:{tls_pg.port}/tls{tls}"
    await prepare_database(database_url)
    redis_url = f"rediss://localhost:{tls_redis}/0?ssl_ca_certs={certs.ca}"

    for key in list(os.environ):
        if key.startswith("PROCESSOR_"):
            monkeypatch.delenv(key)
    settings = load_settings(
        database_url=database_url, redis_url=redis_url, stream="tls:records", consumer="tls"
    )
    entries = [entry(i % 50, i) for i in range(2_000)]
    await Producer(redis_url, settings.stream, entries, rate_per_s=1e9).run()
    env = processor_env(settings, PROCESSOR_HTTP_PORT="0")
    done = await asyncio.to_thread(
        subprocess.run,
        [PROCESSOR, "run", "--burst"],
        env=env,
        capture_output=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM positions") == len(entries)
        encrypted = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
    assert encrypted is True
