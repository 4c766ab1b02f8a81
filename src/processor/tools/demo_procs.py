"""The demo's child processes: started in sessions of their own, logged to files, stopped.

Each child gets its own session so that the terminal's Ctrl-C reaches only the demo,
which then stops the children once, in order, with SIGTERM (a second signal would make
``processor run`` exit at once instead of draining). Their output goes to log files, so
the terminal view stays readable; a child that fails has its log's tail shown.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class ChildError(Exception):
    """A child process could not start or stopped when it should not have."""


@dataclass
class Child:
    """One subprocess of the demo: its command, log file and process once started."""

    name: str
    argv: list[str]
    log_path: Path
    may_exit: bool = False  # True: exiting with status 0 is the end of its job, not a failure
    process: subprocess.Popen[bytes] | None = None
    errors: int = 0  # error lines its log has shown so far (see count_errors)
    _log: IO[bytes] | None = field(default=None, repr=False)
    _scanned: int = field(default=0, repr=False)

    def start(self, env: dict[str, str]) -> None:
        """Start it in a new session, output appended to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise ChildError(f"cannot start {self.name}: {exc}") from exc

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited, else None."""
        return None if self.process is None else self.process.poll()

    def check(self) -> None:
        """Raise :class:`ChildError` if it exited and was not allowed to (log tail included)."""
        code = self.returncode
        if code is None or (code == 0 and self.may_exit):
            return
        raise ChildError(
            f"{self.name} exited with status {code}; last lines of {self.log_path}:\n{self.tail()}"
        )

    def tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        shown = text.splitlines()[-lines:]
        return "\n".join("  " + line for line in shown) if shown else "  (empty)"

    def count_errors(self) -> int:
        """Error lines in its log so far (console and JSON formats); reads only what is new."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._scanned)
                chunk = log.read()
        except OSError:
            return self.errors
        complete = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._scanned += complete
        self.errors += sum(1 for line in chunk[:complete].splitlines() if _is_error(line))
        return self.errors

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _is_error(line: bytes) -> bool:
    return b"[error" in line or b'"level": "error"' in line or b'"level":"error"' in line


def stop_all(children: Sequence[Child], timeout_s: float) -> list[str]:
    """SIGTERM each running child (in the given order), wait, SIGKILL after ``timeout_s``.

    Returns the names of children that had to be killed.
    """
    running = [c for c in children if c.process is not None and c.process.poll() is None]
    for child in running:
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    killed = []
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
            killed.append(child.name)
    for child in children:
        child.close_log()
    return killed


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
