"""Per-channel live state kept by a gateway instance: apply updates, hand out snapshots.

Pure: no I/O. The hub loads a channel's snapshot from Redis once, then applies every
update it receives, so a new subscriber gets its snapshot from memory and thousands of
subscribers cost one Redis read.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import orjson
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from processor.adapters.live import ALERTS_KEPT, TRAIL_POINTS, ChannelKind, channel_kind

DEFLATE_LEVEL = 6  # compressed once per update, not per client: ratio matters more


class SharedFrame:
    """A message's JSON and its wire encodings, built once and written to many clients."""

    __slots__ = ("_wire", "payload")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._wire: dict[int, bytes] = {}

    def wire(self, window_bits: int) -> bytes:
        """The complete WebSocket frame, compressed for ``window_bits`` (0: plain).

        Compression without context takeover makes each message independent of the
        connection, so the same compressed bytes are valid for every client.
        """
        frame = self._wire.get(window_bits)
        if frame is None:
            frame = self._wire[window_bits] = wire_frame(self.payload, window_bits)
        return frame


class Update:
    """One update as published, with its client frame encoded once for every client.

    ``data`` is parsed only when something needs it (merging positions, appending an
    alert): a leaderboard passes through the gateway as bytes.
    """

    __slots__ = ("_data", "channel", "data_raw", "frame", "kind", "published_at", "seq", "shared")

    def __init__(
        self, channel: str, seq: int, published_at: int, data_raw: bytes, frame: bytes
    ) -> None:
        self.channel = channel
        self.kind = channel_kind(channel)
        self.seq = seq
        self.published_at = published_at
        self.data_raw = data_raw
        self.frame = frame
        self.shared = SharedFrame(frame)
        self._data: Any = _UNPARSED

    @property
    def data(self) -> Any:
        """The update's ``data``, parsed on first use."""
        if self._data is _UNPARSED:
            self._data = orjson.loads(self.data_raw)
        return self._data

    def wire(self, window_bits: int) -> bytes:
        """The update's WebSocket frame for a client with this compression window."""
        return self.shared.wire(window_bits)


_UNPARSED = object()
# The publisher's script writes exactly this prefix; anything else is parsed in full.
_ENVELOPE = re.compile(rb'\{"seq":(\d+),"published_at":(\d+),"data":')


def split_envelope(raw: bytes) -> tuple[int, int, bytes]:
    """``seq``, ``published_at`` and the raw ``data`` JSON of a published message."""
    match = _ENVELOPE.match(raw)
    if match is not None and raw.endswith(b"}"):
        return int(match[1]), int(match[2]), raw[match.end() : -1]
    body = orjson.loads(raw)
    return int(body["seq"]), int(body["published_at"]), orjson.dumps(body["data"])


def wire_frame(payload: bytes, window_bits: int) -> bytes:
    """A final, unmasked text frame; permessage-deflate compressed when ``window_bits``."""
    frame = Frame(Opcode.TEXT, payload)
    if not window_bits:
        return frame.serialize(mask=False)
    # The library's own encoder, as a connection would use it, minus the connection.
    deflate = PerMessageDeflate(
        remote_no_context_takeover=False,
        local_no_context_takeover=True,
        remote_max_window_bits=15,
        local_max_window_bits=window_bits,
        compress_settings={"level": DEFLATE_LEVEL, "memLevel": 8},
    )
    return frame.serialize(mask=False, extensions=[deflate])


def parse_update(channel: str, raw: bytes) -> Update:
    """Decode a published ``{"seq", "published_at", "data"}`` into an :class:`Update`.

    The client frame reuses the published bytes: only a header is prepended.
    """
    seq, published_at, data_raw = split_envelope(raw)
    header = b'{"type":"update","channel":' + orjson.dumps(channel)
    frame = b"".join(
        [header, b',"seq":%d,"published_at":%d,"data":' % (seq, published_at), data_raw, b"}"]
    )
    return Update(channel, seq, published_at, data_raw, frame)


def snapshot_frame(channel: str, seq: int, data: Any) -> bytes:
    """The ``snapshot`` frame a subscriber receives first."""
    return raw_snapshot_frame(channel, seq, orjson.dumps(data))


def raw_snapshot_frame(channel: str, seq: int, data_raw: bytes) -> bytes:
    """The ``snapshot`` frame around ``data`` already in JSON."""
    header = b'{"type":"snapshot","channel":' + orjson.dumps(channel)
    return b"".join([header, b',"seq":%d,"data":' % seq, data_raw, b"}"])


class ChannelState:
    """The latest state of one channel and the sequence number it includes."""

    def __init__(self, channel: str, seq: int = 0) -> None:
        self.channel = channel
        self.kind = channel_kind(channel)
        self.seq = seq
        self._frame: SharedFrame | None = None

    def apply(self, update: Update) -> None:
        """Fold an update (already checked to be the next in sequence) into the state."""
        self.seq = update.seq
        self._frame = None
        self._apply(update.data)

    def snapshot(self) -> SharedFrame:
        """The snapshot frame for the current state (cached until the next update)."""
        if self._frame is None:
            self._frame = SharedFrame(snapshot_frame(self.channel, self.seq, self.data()))
        return self._frame

    def data(self) -> Any:
        """The snapshot's ``data`` object."""
        raise NotImplementedError

    def _apply(self, data: Any) -> None:
        raise NotImplementedError


class ReplaceState(ChannelState):
    """Leaderboard, standings, course, catalog: each update is the whole state.

    Kept as the published JSON bytes: the gateway never needs to look inside.
    """

    def __init__(self, channel: str, seq: int = 0, data_raw: bytes | None = None) -> None:
        super().__init__(channel, seq)
        self._raw = data_raw if data_raw is not None else orjson.dumps(_empty(self.kind))

    def data(self) -> Any:
        """The latest published state, or the kind's empty state."""
        return orjson.loads(self._raw)

    def snapshot(self) -> SharedFrame:
        """The snapshot frame, built from the stored bytes (cached until the next update)."""
        if self._frame is None:
            self._frame = SharedFrame(raw_snapshot_frame(self.channel, self.seq, self._raw))
        return self._frame

    def apply(self, update: Update) -> None:
        """Take the update's bytes as the new state."""
        self.seq = update.seq
        self._frame = None
        self._raw = update.data_raw


class PositionsState(ChannelState):
    """Latest position per entry number, each with a short trail of recent points."""

    def __init__(self, channel: str, seq: int = 0, entries: list[dict[str, Any]] | None = None):
        super().__init__(channel, seq)
        self._entries: dict[str, dict[str, Any]] = {}
        self._trails: dict[str, deque[list[float]]] = {}
        for row in entries or []:
            number = str(row["number"])
            self._trails[number] = deque(row.pop("trail", []) or [], maxlen=TRAIL_POINTS)
            self._entries[number] = row

    def data(self) -> Any:
        """``{"entries": [row + "trail"]}`` ordered by entry number."""
        return {
            "entries": [
                {**row, "trail": list(self._trails.get(number, ()))}
                for number, row in sorted(self._entries.items(), key=_number_order)
            ]
        }

    def _apply(self, data: Any) -> None:
        for row in data.get("entries", []):
            number = str(row["number"])
            self._entries[number] = row
            trail = self._trails.setdefault(number, deque(maxlen=TRAIL_POINTS))
            trail.append([row["lon"], row["lat"]])


class AlertsState(ChannelState):
    """The most recent alerts, oldest first."""

    def __init__(self, channel: str, seq: int = 0, alerts: list[Any] | None = None) -> None:
        super().__init__(channel, seq)
        self._alerts: deque[Any] = deque(alerts or [], maxlen=ALERTS_KEPT)

    def data(self) -> Any:
        """``{"alerts": [row, ...]}``."""
        return {"alerts": list(self._alerts)}

    def _apply(self, data: Any) -> None:
        self._alerts.append(data)


def _number_order(item: tuple[str, Any]) -> tuple[int, str]:
    number = item[0]
    return (int(number), number) if number.isdigit() else (1 << 62, number)


def _empty(kind: ChannelKind) -> Any:
    if kind is ChannelKind.COURSE:
        return {"course": None}
    if kind is ChannelKind.CATALOG:
        return {"events": []}
    return {"rows": []}


def new_state(channel: str, seq: int, stored: Any) -> ChannelState:
    """Build a channel's state from what its snapshot key held (None when absent).

    Positions and alerts: the parsed rows; the other kinds: the stored envelope's bytes.
    """
    kind = channel_kind(channel)
    if kind is ChannelKind.POSITIONS:
        return PositionsState(channel, seq, stored or [])
    if kind is ChannelKind.ALERTS:
        return AlertsState(channel, seq, stored or [])
    return ReplaceState(channel, seq, split_envelope(stored)[2] if stored else None)
