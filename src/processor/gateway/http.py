"""Plain HTTP answers of the gateway: the live page, its static files, health, metrics.

The ``websockets`` server calls :func:`respond` for every request before the WebSocket
handshake; a request for ``/ws`` with an ``Upgrade`` header proceeds to the handshake,
anything else gets a response here.
"""

from __future__ import annotations

import http
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from processor.adapters.live import LiveKeys

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'"
    ),
}


def response(status: int, body: bytes, content_type: str, **headers: str) -> Response:
    """An HTTP response with the body, its type and the page's security headers."""
    values = Headers(
        {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-cache",
            "Connection": "close",
            **SECURITY_HEADERS,
            **headers,
        }
    )
    return Response(status, http.HTTPStatus(status).phrase, values, body)


def json_response(status: int, value: Any) -> Response:
    """A JSON response."""
    return response(status, orjson.dumps(value), "application/json")


def static_file(path: str) -> Response:
    """A file from the packaged ``static`` folder, or 404 (no paths outside it)."""
    name = "index.html" if path == "/" else path.removeprefix("/static/")
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
        return response(404, b"not found\n", "text/plain; charset=utf-8")
    resource = resources.files("processor.gateway").joinpath("static", name)
    if not resource.is_file():
        return response(404, b"not found\n", "text/plain; charset=utf-8")
    return response(200, resource.read_bytes(), CONTENT_TYPES[suffix])


def metrics_response() -> Response:
    """The process's Prometheus metrics."""
    return response(200, generate_latest(), CONTENT_TYPE_LATEST)


async def discover(redis: aioredis.Redis, keys: LiveKeys) -> dict[str, list[str]]:
    """Event and stage ids that have live data, found from the snapshot keys."""
    events: set[str] = set()
    stages: set[str] = set()
    pattern = keys.snapshot("*")
    async for key in redis.scan_iter(match=pattern, count=1000):
        channel = (key.decode() if isinstance(key, bytes) else key)[len(keys.prefix) + 2 : -6]
        parts = channel.split(":")
        if len(parts) == 3 and parts[0] == "event":
            events.add(parts[1])
        elif len(parts) == 3 and parts[0] == "stage":
            stages.add(parts[1])
    return {"events": sorted(events, key=_natural), "stages": sorted(stages, key=_natural)}


def is_upgrade(request: Request) -> bool:
    """Whether the request asks for a WebSocket."""
    return "websocket" in request.headers.get("Upgrade", "").lower()


def _natural(value: str) -> tuple[int, str]:
    return (int(value), value) if value.isdigit() else (1 << 62, value)
