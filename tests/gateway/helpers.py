"""WebSocket client helpers for gateway tests."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from processor.gateway.server import Gateway


def ws_url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.port}/ws"


async def open_client(gateway: Gateway, **kwargs: Any) -> ClientConnection:
    """A client as browsers are: offering permessage-deflate (unless told otherwise)."""
    return await connect(ws_url(gateway), **kwargs)


async def open_tiny_client(gateway: Gateway) -> ClientConnection:
    """A client with the smallest receive buffers, so that not reading stalls it fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    sock.setblocking(False)
    return await connect(ws_url(gateway), sock=sock, max_queue=1, compression=None)


async def recv_json(ws: ClientConnection, wait_s: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), wait_s)
    message: dict[str, Any] = orjson.loads(raw)
    return message


async def subscribe(ws: ClientConnection, channel: str, token: str | None = None) -> dict[str, Any]:
    """Subscribe and return the first answer (a snapshot or an error)."""
    request: dict[str, Any] = {"type": "subscribe", "channel": channel}
    if token is not None:
        request["token"] = token
    await ws.send(orjson.dumps(request).decode())
    return await recv_json(ws)


def leaderboard_rows(count: int, version: int, pad: int = 0) -> list[dict[str, Any]]:
    """A leaderboard of ``count`` rows; ``pad`` bytes of crew name make it larger."""
    return [
        {
            "rank": i + 1,
            "number": str(100 + i),
            "name": f"Crew {i} / v{version} " + "x" * pad,
            "class": "T1",
            "status": "finished",
            "splits": [{"name": "SS1-A", "ts": 1_000 + i, "elapsed_ms": 60_000 + i}],
            "start_ts": 0,
            "finish_ts": 120_000 + i,
            "elapsed_ms": 120_000 + i,
            "penalty_ms": 0,
            "total_ms": 120_000 + i,
            "gap_ms": i,
            "class_rank": i + 1,
            "last_split": "SS1-A",
        }
        for i in range(count)
    ]


def position(number: str, ts: int, lat: float = 45.0, lon: float = 16.0) -> dict[str, Any]:
    return {
        "number": number,
        "imei": f"35630704244{int(number):04d}",
        "ts": ts,
        "lat": lat,
        "lon": lon,
        "speed": 80,
        "angle": 90,
    }
