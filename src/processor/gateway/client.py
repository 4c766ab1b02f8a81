"""One connected client: direct writes while it keeps up, a coalescing outbox when not.

The fan-out never awaits a client. A caught-up client's frames are written straight into
its transport: one synchronous write of bytes encoded once for every client (see
:class:`~processor.gateway.state.SharedFrame`). When its write buffer passes the
high-water mark the client is "lagging": frames go to its
:class:`~processor.gateway.coalesce.Outbox` and a writer task of its own drains them with
flow control through the connection. A client still lagging ``queue limit`` frames later
is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.protocol import State

from processor.gateway import metrics
from processor.gateway.coalesce import Outbox
from processor.gateway.state import SharedFrame, Update

SLOW_CLOSE_CODE = 1013  # "try again later": the client could not keep up
ABORT_AFTER_S = 2.0
NOT_SHARED = -1


class Client:
    """A WebSocket connection and what the gateway is sending it."""

    def __init__(self, ws: ServerConnection, queue_limit: int, write_limit: int) -> None:
        self.ws = ws
        self.outbox = Outbox(queue_limit)
        self.channels: set[str] = set()
        self.kicked = False
        self._write_limit = write_limit
        self.window_bits = negotiated_window_bits(ws)
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    def caught_up(self) -> bool:
        """Whether a frame can be written directly, ahead of nothing else."""
        if self._writer is not None or self.outbox or self.kicked:
            return False
        transport = self.ws.transport
        return (
            self.ws.protocol.state is State.OPEN
            and not transport.is_closing()
            and transport.get_write_buffer_size() < self._write_limit
        )

    def write_update(self, update: Update) -> None:
        """Write one update's shared frame straight to the socket (see write_updates)."""
        if self.window_bits == NOT_SHARED:
            broadcast([self.ws], update.frame, text=True)
        else:
            self.ws.transport.write(update.wire(self.window_bits))

    def write_updates(self, updates: list[Update]) -> None:
        """Write updates' shared frames straight to the socket, in one write.

        The caller checked :meth:`caught_up`. Bypasses the connection's per-message
        encoder on purpose: the frame bytes are the same for every client with the same
        compression window.
        """
        if self.window_bits == NOT_SHARED:
            for update in updates:
                broadcast([self.ws], update.frame, text=True)
        elif len(updates) == 1:
            self.ws.transport.write(updates[0].wire(self.window_bits))
        else:
            self.ws.transport.write(b"".join(u.wire(self.window_bits) for u in updates))

    def send_snapshot(self, channel: str, frame: SharedFrame) -> None:
        """Send a channel's snapshot, ahead of the channel's next updates."""
        if self.caught_up() and self.window_bits != NOT_SHARED:
            self.ws.transport.write(frame.wire(self.window_bits))
            metrics.FRAMES_SENT.labels("direct").inc()
        elif self.caught_up():
            write_direct([self.ws], frame.payload)
        else:
            self._queued(self.outbox.push_snapshot(channel, frame.payload))

    def send_control(self, frame: bytes) -> None:
        """Send a control frame (pong, error, unsubscribed) after what is pending."""
        if self.caught_up():
            write_direct([self.ws], frame)
        else:
            self._queued(self.outbox.push_control(frame))

    def queue(self, update: Update) -> None:
        """Hold an update for a lagging client (the hub writes caught-up ones itself)."""
        if not self.kicked:
            self._queued(self.outbox.push_update(update))

    def forget(self, channel: str) -> None:
        """Stop sending a channel (after an unsubscribe)."""
        self.channels.discard(channel)
        self.outbox.drop(channel)

    def close(self) -> None:
        """Stop the writer task; the connection is gone."""
        if self._writer is not None:
            self._writer.cancel()

    def _queued(self, within_limit: bool) -> None:
        if not within_limit:
            self._kick()
        elif self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Write pending frames with flow control until the client has caught up."""
        try:
            while self.outbox:
                frames = self.outbox.drain()
                for frame in frames:
                    await self.ws.send(frame, text=True)
                metrics.FRAMES_SENT.labels("queued").inc(len(frames))
        except ConnectionClosed:
            pass
        finally:
            metrics.COALESCED.inc(self.outbox.coalesced)
            self.outbox.coalesced = 0
            self._writer = None

    def _kick(self) -> None:
        """Disconnect a client that fell too far behind, without waiting for it."""
        if self.kicked:
            return
        self.kicked = True
        metrics.SLOW_DISCONNECTS.inc()
        self.close()
        self.outbox.drain()
        loop = asyncio.get_running_loop()
        # A close frame cannot get through a full buffer: abort the socket if it is stuck.
        self._closer = loop.create_task(_close_quietly(self.ws))
        loop.call_later(ABORT_AFTER_S, self.ws.transport.abort)


def negotiated_window_bits(ws: ServerConnection) -> int:
    """The compression window the client accepted for our messages; 0 for none.

    ``NOT_SHARED`` when compression keeps context across messages: then no frame can be
    shared and the connection's own encoder is used. (The server factory imposes no
    context takeover, so that does not happen with the gateway's settings.)
    """
    for extension in ws.protocol.extensions:
        if isinstance(extension, PerMessageDeflate):
            if not extension.local_no_context_takeover:
                return NOT_SHARED
            return int(extension.local_max_window_bits or 15)
    return 0


def write_direct(connections: list[ServerConnection], frame: bytes) -> None:
    """Write a small frame through each connection's own encoder, without waiting."""
    broadcast(connections, frame, text=True)
    metrics.FRAMES_SENT.labels("direct").inc(len(connections))


async def _close_quietly(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed, asyncio.CancelledError):
        await ws.close(SLOW_CLOSE_CODE, "too slow")
