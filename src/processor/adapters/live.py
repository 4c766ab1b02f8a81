"""The live channel: latest snapshots in Redis plus ordered updates over Redis Pub/Sub.

The processor calls :class:`LivePublisher` after each commit; any number of gateway
instances read what it writes. Per channel there are two keys and one Pub/Sub channel:

* ``{prefix}:{<channel>}:seq``  — a counter, incremented once per update;
* ``{prefix}:{<channel>}:snap`` — the latest state (a JSON string, a hash of positions
  per entry number, or a capped list of alerts);
* Pub/Sub ``{prefix}:{<channel>}:pub`` — each update, as ``{"seq", "published_at", "data"}``.

Counter, snapshot and PUBLISH change in one Lua script, so Redis orders them together:
every subscriber receives a channel's updates in ``seq`` order, and a snapshot read in a
``MULTI`` always pairs a state with the sequence number it includes. The channel name in
braces is a Redis Cluster hash tag: the keys of one channel live in one slot.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
import redis.asyncio as aioredis

Row = Mapping[str, Any]

ALERTS_KEPT = 100
TRAIL_POINTS = 20
POSITION_INTERVAL_S = 1.0
POSITION_BATCH_S = 1.0
# Commits do not land exactly on the second: a position up to 0.2 s early for its slot is
# let through rather than held back a whole extra commit. Slots stay on a fixed grid, so
# early sends do not add up to a faster rate.
JITTER_FRACTION = 0.2
THROTTLE_CAPACITY = 50_000

_PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
local mode = ARGV[3]
local data = ARGV[2]
local message = '{"seq":' .. seq .. ',"published_at":' .. ARGV[1] .. ',"data":' .. data .. '}'
if mode == 'set' then
  redis.call('SET', KEYS[2], message)
elseif mode == 'hash' then
  for i = 5, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
elseif mode == 'list' then
  redis.call('RPUSH', KEYS[2], data)
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
end
redis.call('PUBLISH', KEYS[3], message)
return seq
"""


class ChannelKind(StrEnum):
    """What a channel carries; decides how its snapshot is stored and updates merge."""

    POSITIONS = "positions"
    LEADERBOARD = "leaderboard"
    STANDINGS = "standings"
    ALERTS = "alerts"
    COURSE = "course"
    CATALOG = "catalog"


def channel_kind(channel: str) -> ChannelKind:
    """The kind of a well-formed channel name (see :func:`processor.gateway.protocol`)."""
    if channel == "events":
        return ChannelKind.CATALOG
    return ChannelKind(channel.rsplit(":", 1)[1])


@dataclass(frozen=True)
class LiveKeys:
    """Redis names of the live channel under one prefix."""

    prefix: str

    def seq(self, channel: str) -> str:
        """The per-channel update counter."""
        return f"{self.prefix}:{{{channel}}}:seq"

    def snapshot(self, channel: str) -> str:
        """The per-channel latest state."""
        return f"{self.prefix}:{{{channel}}}:snap"

    def pubsub(self, channel: str) -> str:
        """The Pub/Sub channel carrying the channel's updates."""
        return f"{self.prefix}:{{{channel}}}:pub"

    def pubsub_pattern(self) -> str:
        """A pattern matching every channel's Pub/Sub name under this prefix."""
        return f"{self.prefix}:{{*}}:pub"

    def channel_of(self, pubsub_name: str) -> str | None:
        """The channel name inside a Pub/Sub name, or None for a foreign one."""
        head, tail = f"{self.prefix}:{{", "}:pub"
        if pubsub_name.startswith(head) and pubsub_name.endswith(tail):
            return pubsub_name[len(head) : -len(tail)]
        return None


def positions_channel(event_id: object) -> str:
    """The channel of an event's vehicle positions."""
    return f"event:{event_id}:positions"


def leaderboard_channel(stage_id: object) -> str:
    """The channel of a stage's leaderboard."""
    return f"stage:{stage_id}:leaderboard"


def standings_channel(event_id: object) -> str:
    """The channel of an event's overall standings."""
    return f"event:{event_id}:standings"


def alerts_channel(event_id: object) -> str:
    """The channel of an event's safety alerts (officials only)."""
    return f"event:{event_id}:alerts"


def course_channel(event_id: object) -> str:
    """The channel of an event's course geometry (GeoJSON)."""
    return f"event:{event_id}:course"


CATALOG_CHANNEL = "events"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dumps(value: Any) -> bytes:
    # Rows come from the domain and the database: Decimal and the like become strings.
    return orjson.dumps(value, default=str)


@dataclass
class _EntryThrottle:
    """What the publisher remembers of one entry's positions."""

    last_ts: int = -1
    next_due: float = float("-inf")
    pending: dict[str, Any] | None = None
    trail: deque[list[float]] = field(default_factory=lambda: deque(maxlen=TRAIL_POINTS))


def _is_due(now: float, next_due: float, period: float) -> bool:
    """Whether ``now`` is at (or just before) the next slot of a fixed-period grid."""
    return now >= next_due - period * JITTER_FRACTION


def _next_due(now: float, next_due: float, period: float) -> float:
    """The slot after the one just used: on the grid, unless we fell behind it."""
    following = next_due + period
    return following if following > now else now + period


class PositionThrottle:
    """Passes about one position per entry per interval; the newest waits, never older.

    Pure bookkeeping with the clock given as an argument. A position older than or as old
    as the entry's last accepted one (a device's backlog upload) is dropped: the live map
    shows where a vehicle is now. Within the interval the newest position waits as pending
    and leaves with a later call once the interval is over. Positions of one event leave
    together, at most one batch per ``batch_s``: every update costs the gateway a write per
    watching client, so fewer, fuller updates are what lets it serve thousands.
    """

    def __init__(
        self,
        interval_s: float = POSITION_INTERVAL_S,
        batch_s: float = POSITION_BATCH_S,
        capacity: int = THROTTLE_CAPACITY,
    ):
        self._interval = interval_s
        self._batch = batch_s
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], _EntryThrottle] = OrderedDict()
        self._event_due: dict[str, float] = {}

    def offer(self, event_id: str, rows: Sequence[Row], now: float) -> list[dict[str, Any]]:
        """Take new rows; return the rows to publish now (at most one batch per batch_s)."""
        for row in rows:
            self._accept(event_id, row)
        next_due = self._event_due.get(event_id, float("-inf"))
        if not _is_due(now, next_due, self._batch):
            return []
        due = self.due(event_id, now)
        if due:
            self._event_due[event_id] = _next_due(now, next_due, self._batch)
        return due

    def due(self, event_id: str, now: float, *, force: bool = False) -> list[dict[str, Any]]:
        """Pending rows of an event whose interval is over (all of them with ``force``)."""
        out: list[dict[str, Any]] = []
        for (event, _number), state in self._entries.items():
            if event != event_id or state.pending is None:
                continue
            if force or _is_due(now, state.next_due, self._interval):
                out.append(state.pending)
                state.pending = None
                state.next_due = _next_due(now, state.next_due, self._interval)
        return out

    def events(self) -> set[str]:
        """Events with at least one pending position."""
        return {event for (event, _), state in self._entries.items() if state.pending}

    def trail(self, event_id: str, number: str) -> list[list[float]]:
        """The entry's recent accepted points, oldest first, as ``[lon, lat]``."""
        state = self._entries.get((event_id, number))
        return list(state.trail) if state else []

    def _accept(self, event_id: str, row: Row) -> None:
        key = (event_id, str(row["number"]))
        state = self._entries.get(key)
        if state is None:
            state = self._entries[key] = _EntryThrottle()
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        ts = int(row["ts"])
        if ts <= state.last_ts:
            return
        state.last_ts = ts
        state.pending = dict(row)
        state.trail.append([float(row["lon"]), float(row["lat"])])


class LivePublisher:
    """Writes live snapshots and publishes ordered updates for the gateway to fan out.

    Construct once per process with an asyncio Redis client and the ``live_prefix``
    setting; every method is safe to call after each commit. Positions are throttled to
    one per entry per second, sent per event at most once a second (see
    :class:`PositionThrottle`); call :meth:`flush` on a timer (e.g. each domain tick) and
    at shutdown so a waiting position is not held back when no further commit comes.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _now_ms,
        position_interval_s: float = POSITION_INTERVAL_S,
        position_batch_s: float = POSITION_BATCH_S,
    ) -> None:
        self._redis = redis
        self.keys = LiveKeys(prefix)
        self._clock = clock
        self._wall_ms = wall_ms
        self._throttle = PositionThrottle(position_interval_s, position_batch_s)
        self._script = redis.register_script(_PUBLISH_SCRIPT)

    async def publish_positions(self, event_id: object, rows: Sequence[Row]) -> int | None:
        """Store and publish the newest position per entry, about once a second each.

        Rows: ``{"number", "imei", "ts", "lat", "lon", "speed", "angle"}``. An event's
        positions go out together at most every ``position_batch_s`` (1 s). Returns the
        update's sequence number, or None when the rows wait (or were stale).
        """
        due = self._throttle.offer(str(event_id), rows, self._clock())
        return await self._send_positions(str(event_id), due)

    async def flush(self) -> None:
        """Publish every position still waiting for its interval."""
        for event_id in self._throttle.events():
            due = self._throttle.due(event_id, self._clock(), force=True)
            await self._send_positions(event_id, due)

    async def publish_leaderboard(self, stage_id: object, rows: Sequence[Row]) -> int:
        """Replace a stage's leaderboard (full list of rows, ranked) and publish it."""
        data = {"stage_id": stage_id, "rows": list(rows)}
        return await self._publish(leaderboard_channel(stage_id), data, "set")

    async def publish_standings(self, event_id: object, rows: Sequence[Row]) -> int:
        """Replace an event's overall standings (full list of rows) and publish them."""
        data = {"event_id": event_id, "rows": list(rows)}
        return await self._publish(standings_channel(event_id), data, "set")

    async def publish_alert(self, event_id: object, row: Row) -> int:
        """Append one anomaly to an event's alerts (the last 100 are kept) and publish it."""
        return await self._publish(alerts_channel(event_id), dict(row), "list")

    async def publish_course(self, event_id: object, course_geojson: Row) -> int:
        """Replace an event's course geometry (a GeoJSON FeatureCollection) for the map."""
        data = {"event_id": event_id, "course": course_geojson}
        return await self._publish(course_channel(event_id), data, "set")

    async def publish_catalog(self, events: Sequence[Row]) -> int:
        """Replace the list of events and stages offered by the live page.

        Each event: ``{"id", "name", "stages": [{"id", "name"}]}``.
        """
        return await self._publish(CATALOG_CHANNEL, {"events": list(events)}, "set")

    async def _send_positions(self, event_id: str, rows: list[dict[str, Any]]) -> int | None:
        if not rows:
            return None
        fields: list[bytes | str] = []
        for row in rows:
            stored = {**row, "trail": self._throttle.trail(event_id, str(row["number"]))}
            fields += [str(row["number"]), _dumps(stored)]
        channel = positions_channel(event_id)
        return await self._publish(channel, {"entries": rows}, "hash", fields)

    async def _publish(
        self, channel: str, data: Any, mode: str, extra: Sequence[bytes | str] = ()
    ) -> int:
        keys = [self.keys.seq(channel), self.keys.snapshot(channel), self.keys.pubsub(channel)]
        args: list[bytes | str | int] = [self._wall_ms(), _dumps(data), mode, ALERTS_KEPT]
        seq = await self._script(keys=keys, args=[*args, *extra])
        return int(seq)
