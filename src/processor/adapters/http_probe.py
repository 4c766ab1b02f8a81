"""A tiny HTTP endpoint for Prometheus and orchestrators: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from processor.logs import get_logger

log = get_logger("http")

_MAX_REQUEST_LINE = 8192


class ProbeServer:
    """Serves metrics and probes; ``ready`` is asked on every /readyz."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; return the bound port (useful when configured as 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("http endpoint listening", host=self.host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (header := await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                del header
            status, ctype, body = self._respond(line[:_MAX_REQUEST_LINE])
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _respond(self, line: bytes) -> tuple[str, str, bytes]:
        parts = line.decode("latin-1").split()
        path = parts[1].split("?")[0] if len(parts) >= 2 else ""
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        return "404 Not Found", "text/plain", b"not found\n"
