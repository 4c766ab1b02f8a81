"""Shard leases in Redis: one owner per domain shard at a time, taken over when it dies.

Each instance heartbeats into a sorted set; a lease is a key holding the owner's name with
a time to live, renewed well before it expires. Acquiring a lease increments the shard's
fencing token, which the owner presents with every database write (see
:func:`processor.adapters.domain_store.fence`), so a paused owner that lost its lease can
never overwrite its successor's rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from processor.core.sharding import rebalance
from processor.logs import get_logger

log = get_logger("leases")

_ACQUIRE = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if owner then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_BUMP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local token = tonumber(redis.call('GET', KEYS[2]) or '0')
local floor = tonumber(ARGV[2])
if token < floor then
  redis.call('SET', KEYS[2], floor)
  token = floor
end
return token
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(slots=True)
class LeaseChanges:
    """What one :meth:`Leases.step` did: shards gained (with token) and lost."""

    acquired: dict[int, int] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)


class Leases:
    """The shard leases of one instance."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, instance: str, shards: int, ttl_ms: int
    ) -> None:
        self._redis = client
        self.prefix = prefix
        self.instance = instance
        self.shards = shards
        self.ttl_ms = ttl_ms
        self.owned: dict[int, int] = {}  # shard -> fencing token
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._bump = client.register_script(_BUMP)

    def _owner_key(self, shard: int) -> str:
        return f"{self.prefix}:shard:{shard}:owner"

    def _token_key(self, shard: int) -> str:
        return f"{self.prefix}:shard:{shard}:token"

    async def step(self) -> LeaseChanges:
        """Heartbeat, renew, then acquire or release towards a fair share."""
        changes = LeaseChanges()
        now = time.time() * 1000
        members = f"{self.prefix}:instances"
        await self._redis.zadd(members, {self.instance: now})
        await self._redis.zremrangebyscore(members, "-inf", now - 3 * self.ttl_ms)
        alive = int(await self._redis.zcard(members))
        for shard in list(self.owned):
            if not await self._renew(
                keys=[self._owner_key(shard)], args=[self.instance, self.ttl_ms]
            ):
                del self.owned[shard]
                changes.lost.append(shard)
        owners = await self._redis.mget([self._owner_key(s) for s in range(self.shards)])
        free = {s for s, owner in enumerate(owners) if owner is None}
        acquire, release = rebalance(set(self.owned), free, self.instance, self.shards, alive)
        for shard in acquire:
            token = int(
                await self._acquire(
                    keys=[self._owner_key(shard), self._token_key(shard)],
                    args=[self.instance, self.ttl_ms],
                )
            )
            if token:
                self.owned[shard] = token
                changes.acquired[shard] = token
        for shard in release:
            await self.release(shard)
            changes.lost.append(shard)
        if changes.acquired or changes.lost:
            log.info(
                "shard leases changed",
                acquired=sorted(changes.acquired),
                released=sorted(changes.lost),
                owned=len(self.owned),
                instances=alive,
            )
        return changes

    async def raise_token(self, shard: int, floor: int) -> int | None:
        """Lift a held shard's token to at least ``floor``; None when the lease is gone.

        Redis restarted without persistence forgets the tokens while the database keeps
        the last one written: the lease holder (and only it) moves its token past it.
        """
        token = int(
            await self._bump(
                keys=[self._owner_key(shard), self._token_key(shard)], args=[self.instance, floor]
            )
        )
        if not token:
            self.owned.pop(shard, None)
            return None
        self.owned[shard] = token
        return token

    async def release(self, shard: int) -> None:
        """Give up one shard now."""
        self.owned.pop(shard, None)
        await self._release(keys=[self._owner_key(shard)], args=[self.instance])

    async def release_all(self) -> None:
        """Give up every shard (graceful shutdown: the others take over at once)."""
        for shard in list(self.owned):
            await self.release(shard)
        await self._redis.zrem(f"{self.prefix}:instances", self.instance)
