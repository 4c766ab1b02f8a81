"""Device affinity for the domain: which shard a device belongs to, and fair shares.

Pure. A device's shard is a stable hash of its IMEI (CRC-32, the same in every process and
on every machine — never Python's salted ``hash()``), so every instance agrees on it.
"""

from __future__ import annotations

import math
import zlib


def shard_of(imei: str, shards: int) -> int:
    """The shard (0 … shards-1) that owns the device ``imei``."""
    return zlib.crc32(imei.encode("ascii")) % shards


def fair_share(shards: int, instances: int) -> int:
    """How many shards one of ``instances`` live instances should own."""
    return math.ceil(shards / max(1, instances))


def preferred_order(instance: str, shards: int) -> list[int]:
    """The order in which an instance tries free shards (spread out, stable per name)."""
    start = zlib.crc32(instance.encode("utf-8")) % shards
    return [(start + i) % shards for i in range(shards)]


def rebalance(
    owned: set[int], free: set[int], instance: str, shards: int, instances: int
) -> tuple[list[int], list[int]]:
    """Shards to try to acquire and shards to release, to move towards a fair share."""
    share = fair_share(shards, instances)
    if len(owned) > share:
        return [], sorted(owned)[share:]
    wanted = share - len(owned)
    candidates = [s for s in preferred_order(instance, shards) if s in free]
    return candidates[:wanted], []
