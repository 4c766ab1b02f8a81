"""Private PostgreSQL and Redis servers that fault tests may stop, kill and restart.

The machine's shared servers are used by other test runs at the same time and must never
be restarted, so each fault test session starts throwaway servers of its own on free
ports, in temporary directories, and removes them afterwards. PostgreSQL refuses to run
as root: its commands run as the ``postgres`` OS user (``runuser``) when we are root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

PG_BIN = Path(os.environ.get("PROCESSOR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"


def free_port() -> int:
    """A TCP port the OS says is free now (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: object, seconds: float, what: str) -> float:
    """Poll ``condition()`` until true; return the seconds it took (AssertionError on timeout)."""
    assert callable(condition)
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *args]
    return args


def _shared_tempdir(prefix: str) -> Path:
    """A temporary directory the ``postgres`` user can own (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(PG_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of our own: ``start``, ``stop``, ``restart`` as a DBA would."""

    root: Path = field(default_factory=lambda: _shared_tempdir("faults-pg-"))
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        """Create the cluster (trust authentication, loopback only)."""
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust"])

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "server.log")
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, *args])

    def start(self) -> None:
        self._ctl("-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every connection is cut, the server comes back."""
        self._ctl("-w", "-m", mode, "restart")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _run(args: list[str]) -> None:
        subprocess.run(_as_postgres(args), check=True, capture_output=True, timeout=60)


@dataclass
class PrivateRedis:
    """A redis-server of our own with AOF persistence (fsync always); killable with -9."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="faults-redis-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the same port and directory as before (the AOF is replayed)."""
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.root), "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--save", "", "--protected-mode", "no"]
        with (self.root / "server.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 30, "redis-server to load its data")

    def _ready(self) -> bool:
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or LOADING the AOF
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF already holds survives."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None
        wait_until(lambda: not _accepts(self.port), 10, "redis port to close")

    def destroy(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)
