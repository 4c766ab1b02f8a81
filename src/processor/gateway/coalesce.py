"""A lagging client's pending frames, coalesced so that memory stays bounded (pure).

A client whose socket keeps up never touches this: frames are written straight away.
Once its write buffer is full, frames wait here and merge: the latest leaderboard,
standings or course replaces an older pending one, positions merge per entry, alerts
queue in order (they are rare and must not be lost). ``behind`` counts frames received
since the client last caught up; past the limit the client is disconnected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from processor.adapters.live import ChannelKind
from processor.gateway.protocol import encode
from processor.gateway.state import Update


@dataclass
class _MergedPositions:
    """Positions updates folded together, newest row per entry."""

    channel: str
    seq: int
    published_at: int
    entries: dict[str, Any] = field(default_factory=dict)

    def add(self, update: Update) -> None:
        self.seq, self.published_at = update.seq, update.published_at
        for row in update.data.get("entries", []):
            self.entries[str(row["number"])] = row

    def frame(self) -> bytes:
        return encode(
            {
                "type": "update",
                "channel": self.channel,
                "seq": self.seq,
                "published_at": self.published_at,
                "coalesced": True,
                "data": {"entries": list(self.entries.values())},
            }
        )


@dataclass
class _Pending:
    """One channel's pending items, in delivery order."""

    items: list[bytes | Update | _MergedPositions] = field(default_factory=list)


class Outbox:
    """Pending frames of one client, per channel, merged by the channel's kind."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.behind = 0
        self.coalesced = 0
        self._channels: dict[str, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._channels)

    def push_snapshot(self, channel: str, frame: bytes) -> bool:
        """Queue a snapshot, superseding whatever was pending on its channel."""
        dropped = self._channels.pop(channel, None)
        self.coalesced += len(dropped.items) if dropped else 0
        self._channels[channel] = _Pending([frame])
        return self._count()

    def push_control(self, frame: bytes) -> bool:
        """Queue a control frame (error, pong, unsubscribed) after the ones pending."""
        self._channels.setdefault("", _Pending()).items.append(frame)
        return self._count()

    def push_update(self, update: Update) -> bool:
        """Queue an update, merging it into a pending one; False once over the limit."""
        items = self._channels.setdefault(update.channel, _Pending()).items
        last = items[-1] if items else None
        if update.kind is ChannelKind.POSITIONS:
            self._merge_positions(items, last, update)
        elif update.kind is not ChannelKind.ALERTS and isinstance(last, Update):
            items[-1] = update
            self.coalesced += 1
        else:
            items.append(update)
        return self._count()

    def drop(self, channel: str) -> None:
        """Forget a channel's pending frames (the client unsubscribed)."""
        self._channels.pop(channel, None)

    def drain(self) -> list[bytes]:
        """Take every pending frame, in order, and mark the client caught up."""
        frames: list[bytes] = []
        for pending in self._channels.values():
            frames.extend(_frame(item) for item in pending.items)
        self._channels.clear()
        self.behind = 0
        return frames

    def _merge_positions(
        self, items: list[bytes | Update | _MergedPositions], last: object, update: Update
    ) -> None:
        if isinstance(last, _MergedPositions):
            last.add(update)
            self.coalesced += 1
            return
        merged = _MergedPositions(update.channel, update.seq, update.published_at)
        merged.add(update)
        items.append(merged)

    def _count(self) -> bool:
        self.behind += 1
        return self.behind <= self.limit


def _frame(item: bytes | Update | _MergedPositions) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, Update):
        return item.frame
    return item.frame()
