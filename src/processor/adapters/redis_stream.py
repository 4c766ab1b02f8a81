"""Consumer-group reading of the record stream, dead letters and acknowledgement.

One :class:`StreamSource` per consumer. It yields :class:`Delivery` batches: first this
consumer's own pending entries (left by a previous run under the same name), then
entries idle too long at other (dead) consumers, claimed with XAUTOCLAIM, then new ones.
Entries delivered more than ``max_deliveries`` times are marked for the dead-letter
stream instead of being processed again. :meth:`StreamSource.settle` writes dead letters
and acknowledges atomically (one Lua script; one XACK when there is no dead letter), so an
entry is dead-lettered exactly once even if the process dies around it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from processor.core.deadletter import (
    PHASE_CLAIM,
    PHASE_NEW,
    PHASE_PENDING,
    DeadLetter,
    Delivery,
    Fields,
)

try:  # the native packer of a command's arguments (optional, like every C extension here)
    from processor.core._speedups import resp_bulks
except ImportError:  # pragma: no cover - a build without the C extension
    resp_bulks = None  # type: ignore[assignment]

__all__ = ["DeadLetter", "Delivery", "Fields", "StreamSource", "entry_id"]


# Entries are parsed here from the raw reply: redis-py's own parsing (a callback layer, a
# helper call and a dict per entry) cost about as much as hiredis reading the reply.
_RAW: Final = "processor_raw_reply"


def _install_raw_reply(client: aioredis.Redis) -> None:
    """Let XREADGROUP calls that ask for it (``_RAW``) get the reply unparsed.

    The client may be shared: other XREADGROUP calls on it still get redis-py's parsing.
    """
    original = client.response_callbacks.get("XREADGROUP")
    if getattr(original, "raw_aware", False):
        return

    def callback(response: Any, **options: Any) -> Any:
        if options.pop(_RAW, False) or original is None:
            return response
        return original(response, **options)

    callback.raw_aware = True  # type: ignore[attr-defined]
    client.set_response_callback("XREADGROUP", callback)


def entry_id(raw: Any) -> str:
    """A stream entry id as text, whether redis-py returned bytes or str."""
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


_SETTLE = """
local group = ARGV[1]
local ndead = tonumber(ARGV[2])
local i = 3
for _ = 1, ndead do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1) > 0 then
    redis.call('XADD', KEYS[2], '*', 'source_id', id, 'reason', ARGV[i + 1],
               'detail', ARGV[i + 2], 'fields', ARGV[i + 3], 'failed_at', ARGV[i + 4])
  end
  i = i + 5
end
-- The ids to acknowledge come as one space-separated argument: packing thousands of
-- separate arguments costs the client far more than splitting them here.
local ids = {}
for id in string.gmatch(ARGV[i] or '', '%S+') do ids[#ids + 1] = id end
local acked = 0
for first = 1, #ids, 1000 do
  local last = math.min(first + 999, #ids)
  acked = acked + redis.call('XACK', KEYS[1], group, unpack(ids, first, last))
end
return acked
"""


class StreamSource:
    """Reads one consumer's share of a stream through its consumer group."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_letter_stream: str,
        max_deliveries: int,
        claim_idle_ms: int,
        count: int,
        block_ms: int,
    ) -> None:
        self._redis = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_letter_stream = dead_letter_stream
        self._max_deliveries = max_deliveries
        self._claim_idle_ms = claim_idle_ms
        self._count = count
        self._block_ms = block_ms
        self._phase = PHASE_PENDING
        self._pending_cursor = "0-0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._settle = client.register_script(_SETTLE)
        _install_raw_reply(client)

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; reading starts at 0."""
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def restart_pending(self) -> None:
        """Read own pending entries again from the start (after a reconnect)."""
        self._phase = PHASE_PENDING
        self._pending_cursor = "0-0"

    async def read(self) -> Delivery:
        """The next batch: own pending first, then idle entries claimed, then new ones.

        A group that vanished (Redis restarted without persistence) is created again.
        """
        try:
            return await self._read()
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            await self.ensure_group()
            self.restart_pending()
            return Delivery([], phase=PHASE_PENDING)

    async def _read(self) -> Delivery:
        if self._phase == PHASE_PENDING:
            delivery = await self._read_pending()
            if not delivery.empty():
                return delivery
            self._phase = PHASE_NEW
        now = time.monotonic()
        if now >= self._next_claim:
            # One full pass over the group's pending entries (XAUTOCLAIM pages through
            # them with a cursor); an empty page does not mean the pass is over.
            while True:
                delivery = await self._claim_idle()
                if not delivery.empty() or self._claim_cursor == "0-0":
                    break
            if not delivery.empty():
                return delivery
            self._next_claim = now + self._claim_idle_ms / 2000
        return await self._read_new()

    async def _xreadgroup(self, cursor: str, block_ms: int | None = None) -> Any:
        args: list[str | int] = ["XREADGROUP", "GROUP", self.group, self.consumer]
        args += ["COUNT", self._count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", self.stream, cursor]
        return await self._redis.execute_command(*args, **{_RAW: True})  # type: ignore[no-untyped-call]

    async def _read_pending(self) -> Delivery:
        response = await self._xreadgroup(self._pending_cursor)
        entries, vanished = _entries(response)
        if not entries and not vanished:
            return Delivery([], phase=PHASE_PENDING)
        self._pending_cursor = max([sid for sid, _ in entries] + vanished, key=_id_key)
        delivery = await self._split_exhausted(entries, PHASE_PENDING)
        delivery.vanished = vanished
        return delivery

    async def _claim_idle(self) -> Delivery:
        response = await self._redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=self._count,
        )
        cursor, claimed = response[0], response[1]
        self._claim_cursor = entry_id(cursor)
        entries = [(entry_id(i), f) for i, f in claimed if f]
        # Redis 7 drops deleted entries from the PEL itself and lists them in response[2].
        if not entries:
            return Delivery([], phase=PHASE_CLAIM)
        return await self._split_exhausted(entries, PHASE_CLAIM)

    async def _read_new(self) -> Delivery:
        response = await self._xreadgroup(">", self._block_ms)
        entries, vanished = _entries(response)
        return Delivery(entries, vanished=vanished, phase=PHASE_NEW)

    async def _split_exhausted(self, entries: list[tuple[str, Fields]], phase: str) -> Delivery:
        """Set apart entries already delivered more than ``max_deliveries`` times."""
        if not entries:
            return Delivery([], phase=phase)
        counts = await self._delivery_counts(entries[0][0], entries[-1][0], len(entries))
        keep: list[tuple[str, Fields]] = []
        exhausted: list[DeadLetter] = []
        for sid, fields in entries:
            times = counts.get(sid, 1)
            if times > self._max_deliveries:
                exhausted.append(DeadLetter.exhausted(sid, times, fields))
            else:
                keep.append((sid, fields))
        return Delivery(keep, exhausted, phase=phase)

    async def _delivery_counts(self, first: str, last: str, count: int) -> dict[str, int]:
        rows = await self._redis.xpending_range(
            self.stream, self.group, min=first, max=last, count=count, consumername=self.consumer
        )
        return {entry_id(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def settle(self, ids: Sequence[str], dead: Iterable[DeadLetter]) -> None:
        """Dead-letter ``dead`` and acknowledge ``ids`` (which include them) atomically.

        A Lua script (atomic in Redis) dead-letters an entry only while it is still
        pending in the group, so an entry processed twice (claimed from a consumer that
        was slow rather than dead) is dead-lettered once.
        """
        letters = list(dead)
        if not letters and resp_bulks is not None and self._redis.connection is None:
            if ids:
                await self._acknowledge(ids)
            return
        now_ms = str(int(time.time() * 1000))
        args: list[str | bytes] = [self.group]
        args.append(str(len(letters)))
        for letter in letters:
            fields = letter.to_fields(int(now_ms))
            args.extend(
                [letter.source_id, fields["reason"], fields["detail"], fields["fields"], now_ms]
            )
        args.append(" ".join(ids))
        await self._settle(keys=[self.stream, self.dead_letter_stream], args=args)

    async def _acknowledge(self, ids: Sequence[str]) -> None:
        """XACK every id in one command (so atomically, as the script), packed natively.

        With no dead letter to write the script is not needed, and a plain XACK costs
        the server about half its CPU; redis-py would pack each id for about 0.7 µs of
        client CPU, the native packer for a few nanoseconds.
        """
        assert resp_bulks is not None
        count, packed = resp_bulks(" ".join(ids).encode("ascii"))
        head = b"*%d\r\n$4\r\nXACK\r\n%s%s" % (count + 3, _bulk(self.stream), _bulk(self.group))
        pool = self._redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command([head, packed])
            await connection.read_response()
        except BaseException:
            await connection.disconnect()  # a reply may be left unread: not reusable
            raise
        finally:
            await pool.release(connection)

    async def pending_count(self) -> int:
        """Entries delivered to the group and not yet acknowledged (all consumers)."""
        summary = await self._redis.xpending(self.stream, self.group)
        return int(summary["pending"])

    async def lag_entries(self) -> int | None:
        """Entries in the stream not yet delivered to the group (Redis ≥ 7), if known."""
        groups = await self._redis.xinfo_groups(self.stream)
        for info in groups:
            name = info.get("name")
            if entry_id(name) == self.group:
                lag = info.get("lag")
                return int(lag) if lag is not None else None
        return None


def _bulk(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _entries(response: Any) -> tuple[list[tuple[str, Fields]], list[str]]:
    """Entries with fields, and ids whose entry was deleted while pending (no fields).

    ``response`` is the raw XREADGROUP reply: per stream ``[name, [[id, [k, v, …]], …]]``
    (RESP2), or ``{name: [[id, [k, v, …]], …]}`` (RESP3); ``None`` when nothing came.
    """
    out: list[tuple[str, Fields]] = []
    vanished: list[str] = []
    if not response:
        return out, vanished
    streams = response.values() if isinstance(response, dict) else [s[1] for s in response]
    for items in streams:
        for raw_id, flat in items:
            sid = raw_id.decode() if type(raw_id) is bytes else str(raw_id)
            if not flat:
                vanished.append(sid)
            elif type(flat) is dict:  # parsed after all (a callback set on the client later)
                out.append((sid, flat))
            elif len(flat) == 6:  # the contract's three fields: built without zip (4x faster)
                k0, v0, k1, v1, k2, v2 = flat
                out.append((sid, {k0: v0, k1: v1, k2: v2}))
            else:
                pairs = iter(flat)
                out.append((sid, dict(zip(pairs, pairs, strict=False))))
    return out, vanished


def _id_key(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)
