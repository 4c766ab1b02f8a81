"""The hub: follows the live channel in Redis and fans each update out to local clients.

One Pub/Sub connection per gateway instance pattern-subscribes to every channel under
the live prefix; updates of channels no local client watches are skipped unparsed. A
channel's state is loaded from its snapshot key the first time a client subscribes, then
kept current from updates. An update whose ``seq`` is not the next one (Pub/Sub lost
messages, e.g. across a Redis reconnect) triggers a reload, and every subscriber gets a
fresh snapshot; ordering per channel therefore holds on every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from processor.adapters.live import ChannelKind, LiveKeys, channel_kind
from processor.gateway import metrics
from processor.gateway.client import Client
from processor.gateway.state import ChannelState, Update, new_state, parse_update
from processor.logs import get_logger

log = get_logger("gateway.hub")

RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 5.0
# Updates published together (after one commit: positions, leaderboards, standings) are
# written to each client in one system call: the writes, not the bytes, are the cost.
FAN_OUT_WINDOW_S = 0.005


class Hub:
    """Channel states and their local subscribers, fed by Redis Pub/Sub."""

    def __init__(self, redis: aioredis.Redis, keys: LiveKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._states: dict[str, ChannelState] = {}
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._buffered: dict[str, list[Update]] = {}
        self._subscribers: dict[str, set[Client]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._pending: list[Update] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        """Start following the live channel; returns once the subscription is active."""
        self._listener = asyncio.get_running_loop().create_task(self._listen_forever())
        await self._ready.wait()

    async def stop(self) -> None:
        """Stop following the live channel and cancel pending snapshot loads."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        tasks = [t for t in [self._listener, *self._loads.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def subscribe(self, client: Client, channel: str) -> None:
        """Add a client to a channel and send it the snapshot, then updates in order."""
        state = await self._state(channel)
        if client.kicked or channel not in client.channels:
            return
        self._subscribers.setdefault(channel, set()).add(client)
        metrics.SUBSCRIPTIONS.inc()
        client.send_snapshot(channel, state.snapshot())

    def unsubscribe(self, client: Client, channel: str) -> None:
        """Remove a client from a channel; forget the channel when nobody watches it."""
        subscribers = self._subscribers.get(channel)
        if subscribers is None or client not in subscribers:
            return
        subscribers.discard(client)
        metrics.SUBSCRIPTIONS.dec()
        if not subscribers:
            del self._subscribers[channel]
            self._states.pop(channel, None)

    def remove(self, client: Client) -> None:
        """Drop a disconnected client from every channel."""
        for channel in list(client.channels):
            self.unsubscribe(client, channel)

    def subscriber_count(self, channel: str) -> int:
        """How many local clients watch a channel."""
        return len(self._subscribers.get(channel, ()))

    async def _state(self, channel: str) -> ChannelState:
        state = self._states.get(channel)
        if state is not None:
            return state
        load = self._loads.get(channel) or self._start_load(channel)
        await asyncio.shield(load)
        return self._states[channel]

    def _start_load(self, channel: str, *, resend: bool = False) -> asyncio.Task[None]:
        self._buffered[channel] = []
        task = asyncio.get_running_loop().create_task(self._load(channel, resend))
        self._loads[channel] = task
        return task

    async def _load(self, channel: str, resend: bool) -> None:
        """Read a channel's snapshot, apply updates that raced it, publish it if asked.

        A first load fails to its waiting subscribers; a reload (after a gap) retries with
        backoff for as long as somebody watches the channel.
        """
        try:
            loaded = await self._read(channel, retry=resend)
            if loaded is None:
                return
            state = new_state(channel, *loaded)
            for update in self._buffered.get(channel, []):
                if update.seq > state.seq:
                    state.apply(update)
            self._states[channel] = state
            if resend:
                for client in list(self._subscribers.get(channel, ())):
                    client.send_snapshot(channel, state.snapshot())
        finally:
            self._buffered.pop(channel, None)
            self._loads.pop(channel, None)

    async def _read(self, channel: str, *, retry: bool) -> tuple[int, Any] | None:
        delay = RECONNECT_INITIAL_S
        while True:
            try:
                loaded = await load_snapshot(self._redis, self._keys, channel)
                metrics.SNAPSHOT_LOADS.inc()
                return loaded
            except (RedisError, OSError) as exc:
                if not retry:
                    raise
                log.warning("snapshot reload failed", channel=channel, error=str(exc))
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX_S, delay * 2)
            if not self._subscribers.get(channel):
                return None

    def on_message(self, pubsub_name: str, raw: bytes) -> None:
        """Take one published update; it is applied and fanned out with its batch."""
        channel = self._keys.channel_of(pubsub_name)
        if channel is None:
            return
        buffered = self._buffered.get(channel)
        if buffered is None and channel not in self._states:
            return
        update = parse_update(channel, raw)
        metrics.UPDATES.inc()
        if buffered is not None:
            buffered.append(update)
            return
        self._pending.append(update)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(FAN_OUT_WINDOW_S, self._flush)

    def _flush(self) -> None:
        """Apply the updates received in the window, in order, and deliver them."""
        self._flush_handle = None
        batch, self._pending = self._pending, []
        ready = [update for update in batch if self._advance(update)]
        if ready:
            started = time.perf_counter()
            self._deliver(ready)
            metrics.FAN_OUT.observe(time.perf_counter() - started)

    def _advance(self, update: Update) -> bool:
        """Apply an update if it is the channel's next one; False if it is not to be sent."""
        buffered = self._buffered.get(update.channel)
        if buffered is not None:  # a reload started since it arrived
            buffered.append(update)
            return False
        state = self._states.get(update.channel)
        if state is None or update.seq <= state.seq:
            return False
        if update.seq != state.seq + 1:
            metrics.GAPS.inc()
            log.warning("sequence gap", channel=state.channel, have=state.seq, got=update.seq)
            self._reload(state.channel)
            return False
        state.apply(update)
        metrics.PUBLISH_DELAY.observe(max(0.0, time.time() - update.published_at / 1000))
        return True

    def _deliver(self, updates: list[Update]) -> None:
        """One write per caught-up client for all its updates; lagging ones queue them."""
        if len(updates) == 1:  # the common case, without a container per client
            self._deliver_one(updates[0])
            return
        per_client: dict[Client, list[Update]] = {}
        for update in updates:
            for client in self._subscribers.get(update.channel, ()):
                per_client.setdefault(client, []).append(update)
        direct = 0
        for client, mine in per_client.items():
            if client.caught_up():
                client.write_updates(mine)
                direct += len(mine)
            else:
                for update in mine:
                    client.queue(update)
        metrics.FRAMES_SENT.labels("direct").inc(direct)

    def _deliver_one(self, update: Update) -> None:
        direct = 0
        for client in self._subscribers.get(update.channel, ()):
            if client.caught_up():
                client.write_update(update)
                direct += 1
            else:
                client.queue(update)
        metrics.FRAMES_SENT.labels("direct").inc(direct)

    def _reload(self, channel: str) -> None:
        self._states.pop(channel, None)
        if channel not in self._loads:
            self._start_load(channel, resend=True)

    def _reload_all(self) -> None:
        for channel in list(self._subscribers):
            self._reload(channel)

    async def _listen_forever(self) -> None:
        """Follow Pub/Sub, reconnecting with backoff; a reconnect reloads every channel."""
        delay = RECONNECT_INITIAL_S
        while True:
            try:
                await self._listen()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("live channel lost; reconnecting", error=str(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)

    async def _listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.psubscribe(self._keys.pubsub_pattern())
            while True:
                message = await pubsub.get_message(timeout=5.0)
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    self._reload_all()
                    self._ready.set()
                elif message["type"] == "pmessage":
                    self.on_message(_text(message["channel"]), message["data"])


async def load_snapshot(redis: aioredis.Redis, keys: LiveKeys, channel: str) -> tuple[int, Any]:
    """Read a channel's sequence number and stored state together (one MULTI)."""
    kind = channel_kind(channel)
    snapshot = keys.snapshot(channel)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(keys.seq(channel))
        if kind is ChannelKind.POSITIONS:
            pipe.hvals(snapshot)
        elif kind is ChannelKind.ALERTS:
            pipe.lrange(snapshot, 0, -1)
        else:
            pipe.get(snapshot)
        seq_raw, stored_raw = await pipe.execute()
    seq = int(seq_raw) if seq_raw is not None else 0
    if kind in (ChannelKind.POSITIONS, ChannelKind.ALERTS):
        return seq, [orjson.loads(item) for item in stored_raw]
    return seq, stored_raw  # the envelope's bytes: see new_state


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
