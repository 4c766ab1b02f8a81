"""The gateway server: WebSocket subscriptions at ``/ws``, the live page at ``/``.

Stateless apart from caches rebuilt from Redis, so any number of instances can run
behind a load balancer; each follows the live channel itself (see
:mod:`processor.gateway.hub`).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response
from websockets.typing import Origin

from processor.adapters.live import LiveKeys
from processor.gateway import http, metrics
from processor.gateway.client import Client
from processor.gateway.hub import Hub
from processor.gateway.protocol import (
    Ping,
    ProtocolError,
    Request,
    Subscribe,
    Unsubscribe,
    encode,
    error,
    is_private,
    parse_request,
)
from processor.gateway.ratelimit import KeyedLimiter, TokenBucket
from processor.logs import get_logger
from processor.settings import Settings

log = get_logger("gateway")

WS_PATH = "/ws"
CLOSE_TIMEOUT_S = 2.0
LISTEN_BACKLOG = 4096
WINDOW_BITS = 12  # the client's inflate window per connection: 4 KiB, ample for JSON rows


@dataclass
class Stats:
    """Counters of this instance, for tests and the health endpoint."""

    connections: int = 0
    accepted: int = 0
    slow_disconnects: int = 0
    rejected: int = 0


class Gateway:
    """One gateway instance: a WebSocket server, its hub and its limits."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = LiveKeys(settings.live_prefix)
        self.hub = Hub(redis, self.keys)
        self.stats = Stats()
        self._clients: set[Client] = set()
        self._connect_limiter = KeyedLimiter(
            settings.gateway_connect_rate_per_s, settings.gateway_connect_burst
        )
        self._server: Server | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0)."""
        assert self._server is not None, "gateway not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Follow the live channel and start accepting connections."""
        metrics.watch_gc()
        await self.hub.start()
        s = self.settings
        allowed = s.gateway_allowed_origins
        self._server = await serve(
            self._handle,
            s.gateway_host,
            s.gateway_port,
            origins=[*(Origin(o) for o in allowed), None] if allowed else None,
            process_request=self._process_request,
            compression=None,
            extensions=_extensions(s.gateway_compression),
            max_size=s.gateway_max_message_bytes,
            max_queue=16,
            write_limit=s.gateway_write_limit_bytes,
            ping_interval=s.gateway_ping_interval_s,
            ping_timeout=s.gateway_ping_interval_s,
            close_timeout=CLOSE_TIMEOUT_S,
            server_header="processor-gateway",
            # Reconnect storms (a load balancer failing over) must not overflow the accept
            # queue: dropped SYNs are retried by clients only after seconds.
            backlog=LISTEN_BACKLOG,
            # Several gateway processes may share one port; the kernel spreads connections.
            reuse_port=s.gateway_reuse_port,
        )
        log.info("gateway listening", host=s.gateway_host, port=self.port)

    async def stop(self) -> None:
        """Close every connection (1001 going away) and stop following Redis."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.hub.stop()

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _process_request(
        self, connection: ServerConnection, request: HttpRequest
    ) -> Response | None:
        """Answer plain HTTP; admit a WebSocket request if the limits allow it."""
        path = request.path.split("?", 1)[0]
        if path == WS_PATH and http.is_upgrade(request):
            return self._admit(connection)
        if path == "/healthz":
            return http.json_response(200, {"status": "ok", "connections": len(self._clients)})
        if path == "/favicon.ico":
            return http.response(204, b"", "image/x-icon")
        if path == "/metrics":
            return http.metrics_response()
        if path == "/api/discover":
            return http.json_response(200, await http.discover(self.redis, self.keys))
        return http.static_file(path)

    def _admit(self, connection: ServerConnection) -> Response | None:
        if len(self._clients) >= self.settings.gateway_max_connections:
            return self._refuse(503, "too_many_connections")
        address = str(connection.remote_address[0]) if connection.remote_address else "?"
        if not self._connect_limiter.allow(address, time.monotonic()):
            return self._refuse(429, "connect_rate")
        return None

    def _refuse(self, status: int, reason: str) -> Response:
        self.stats.rejected += 1
        metrics.REJECTED.labels(reason).inc()
        return http.response(status, f"{reason}\n".encode(), "text/plain; charset=utf-8")

    async def _handle(self, ws: ServerConnection) -> None:
        """Serve one WebSocket connection until it closes."""
        s = self.settings
        _cap_send_buffer(ws, s.gateway_socket_send_buffer_bytes)
        client = Client(ws, s.gateway_client_queue, s.gateway_write_limit_bytes)
        bucket = TokenBucket(s.gateway_subscribe_rate_per_s, s.gateway_subscribe_burst)
        self._clients.add(client)
        self.stats.accepted += 1
        self.stats.connections = len(self._clients)
        metrics.CONNECTIONS.inc()
        try:
            async for raw in ws:
                await self._on_message(client, bucket, raw)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            self.stats.connections = len(self._clients)
            self.stats.slow_disconnects += int(client.kicked)
            metrics.CONNECTIONS.dec()
            self.hub.remove(client)
            client.close()

    async def _on_message(self, client: Client, bucket: TokenBucket, raw: str | bytes) -> None:
        try:
            request = parse_request(raw)
        except ProtocolError as exc:
            self._reply_error(client, exc, None)
            return
        try:
            await self._dispatch(client, bucket, request)
        except ProtocolError as exc:
            self._reply_error(client, exc, getattr(request, "channel", None))

    async def _dispatch(self, client: Client, bucket: TokenBucket, request: Request) -> None:
        if isinstance(request, Ping):
            client.send_control(encode({"type": "pong", "ts": time.time_ns() // 10**6}))
        elif isinstance(request, Unsubscribe):
            self.hub.unsubscribe(client, request.channel)
            client.forget(request.channel)
            client.send_control(encode({"type": "unsubscribed", "channel": request.channel}))
        else:
            await self._subscribe(client, bucket, request)

    @staticmethod
    def _reply_error(client: Client, exc: ProtocolError, channel: str | None) -> None:
        metrics.REJECTED.labels(exc.code).inc()
        client.send_control(error(exc.code, exc.message, channel))

    async def _subscribe(self, client: Client, bucket: TokenBucket, request: Subscribe) -> None:
        if not bucket.allow(time.monotonic()):
            raise ProtocolError("rate_limited", "too many subscriptions; slow down")
        if is_private(request.channel) and not self._token_ok(request.token):
            raise ProtocolError("forbidden", "this channel needs a valid token")
        if request.channel in client.channels:
            self.hub.unsubscribe(client, request.channel)
        elif len(client.channels) >= self.settings.gateway_max_subscriptions:
            raise ProtocolError("too_many_subscriptions", "subscription limit reached")
        client.channels.add(request.channel)
        try:
            await self.hub.subscribe(client, request.channel)
        except (RedisError, OSError) as exc:
            client.forget(request.channel)
            log.warning("snapshot load failed", channel=request.channel, error=str(exc))
            raise ProtocolError("unavailable", "live data is unavailable; retry") from exc

    def _token_ok(self, token: str | None) -> bool:
        """Constant-time check of the officials' token; no token configured refuses all."""
        expected = self.settings.gateway_alerts_token
        if expected is None or token is None:
            return False
        return hmac.compare_digest(token.encode(), expected.get_secret_value().encode())


def _cap_send_buffer(ws: ServerConnection, size: int) -> None:
    """Cap the kernel's send buffer of a client socket.

    Left to autotuning it grows to megabytes: a client that reads too slowly would hide
    seconds of stale updates there before the gateway saw it lag and coalesced them.
    """
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _extensions(compression: bool) -> list[ServerExtensionFactory]:
    """permessage-deflate without server context takeover, so frames can be shared."""
    if not compression:
        return []
    factory = ServerPerMessageDeflateFactory(
        server_no_context_takeover=True,
        server_max_window_bits=WINDOW_BITS,
        client_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": 5},
    )
    return [factory]


async def run_gateway(settings: Settings, stop: asyncio.Event) -> None:
    """Connect to Redis and run a gateway until ``stop`` is set."""
    redis = aioredis.Redis.from_url(settings.redis_dsn())
    try:
        await Gateway(settings, redis).serve_until(stop)
    finally:
        await redis.aclose()
