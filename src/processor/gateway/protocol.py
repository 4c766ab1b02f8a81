"""The gateway's wire protocol: client requests in, JSON frames out (no I/O here).

Client → gateway: ``{"type": "subscribe", "channel": ..., "token"?: ...}``,
``{"type": "unsubscribe", "channel": ...}``, ``{"type": "ping"}``.
Gateway → client: ``snapshot``, ``update``, ``unsubscribed``, ``pong``, ``error``
(docs/gateway.md has every field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from processor.adapters.live import CATALOG_CHANNEL, ChannelKind, channel_kind

_ID = r"[A-Za-z0-9_-]{1,64}"
_CHANNEL = re.compile(
    rf"^(?:event:{_ID}:(?:positions|standings|alerts|course)|stage:{_ID}:leaderboard)$"
)


class ProtocolError(Exception):
    """A client message the gateway refuses; ``code`` is sent back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Subscribe:
    """A request to receive a channel's snapshot and then its updates."""

    channel: str
    token: str | None = None


@dataclass(frozen=True)
class Unsubscribe:
    """A request to stop receiving a channel."""

    channel: str


@dataclass(frozen=True)
class Ping:
    """An application-level ping (browsers cannot send WebSocket pings)."""


Request = Subscribe | Unsubscribe | Ping


def valid_channel(channel: str) -> bool:
    """Whether a channel name is one the gateway serves."""
    return channel == CATALOG_CHANNEL or _CHANNEL.fullmatch(channel) is not None


def is_private(channel: str) -> bool:
    """Whether the channel needs the officials' token."""
    return channel_kind(channel) is ChannelKind.ALERTS


def parse_request(raw: str | bytes) -> Request:
    """Decode one client message or raise :class:`ProtocolError` saying why not."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", "message is not JSON") from exc
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    kind = message.get("type")
    if kind == "ping":
        return Ping()
    if kind not in ("subscribe", "unsubscribe"):
        raise ProtocolError("bad_type", f"unknown message type {kind!r}")
    channel = message.get("channel")
    if not isinstance(channel, str) or not valid_channel(channel):
        raise ProtocolError("bad_channel", f"unknown channel {channel!r}")
    if kind == "unsubscribe":
        return Unsubscribe(channel)
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("bad_message", "token must be a string")
    return Subscribe(channel, token)


def encode(message: dict[str, Any]) -> bytes:
    """Serialise a gateway → client message as UTF-8 JSON."""
    return orjson.dumps(message)


def error(code: str, message: str, channel: str | None = None) -> bytes:
    """An ``error`` frame; ``channel`` names the subscription it concerns, if any."""
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if channel is not None:
        body["channel"] = channel
    return encode(body)
