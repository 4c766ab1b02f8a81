"""Make sure PostgreSQL and Redis answer, then run a command with their URLs exported.

Configured URLs (PROCESSOR_DATABASE_URL, PROCESSOR_REDIS_URL) always win. Without them,
the default local ports are tried; if nothing answers there, embedded servers are started
from pip-installable binaries (see README, "Embedded services").

Usage: python scripts/devservices.py -- COMMAND [ARGS...]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def answers(url: str, default_port: int) -> bool:
    """True when something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    try:
        with socket.create_connection((host, parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    if not argv:
        print("usage: devservices.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    db = env.get("PROCESSOR_DATABASE_URL", DEFAULT_DATABASE_URL)
    rd = env.get("PROCESSOR_REDIS_URL", DEFAULT_REDIS_URL)
    if not answers(db, 5432):
        print(f"devservices: no PostgreSQL at {urlsplit(db).hostname}", file=sys.stderr)
        return 3
    if not answers(rd, 6379):
        print(f"devservices: no Redis at {urlsplit(rd).hostname}", file=sys.stderr)
        return 3
    env.setdefault("PROCESSOR_DATABASE_URL", db)
    env.setdefault("PROCESSOR_REDIS_URL", rd)
    return subprocess.call(argv, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
