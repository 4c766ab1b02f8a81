"""Helpers shared by pipeline integration tests: entries, streams, database state."""

from __future__ import annotations

import os
import random
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from processor.settings import Settings

BASE_TS = 1_780_000_000_000  # 2026-05-28T20:26:40Z


def payload(imei_index: int, i: int, **overrides: Any) -> dict[str, Any]:
    """A valid contract v1 payload for device ``imei_index``, record ``i``."""
    body: dict[str, Any] = {
        "codec": 142,
        "ts": BASE_TS + i * 1000,
        "received_at": BASE_TS + i * 1000 + 250,
        "priority": 0,
        "lat": 45.8 + (i % 1000) * 1e-5,
        "lon": 15.9 + imei_index * 1e-3,
        "alt": 120,
        "angle": 90,
        "sat": 11,
        "speed": 80,
        "event_io": 0,
        "generation": None,
        "io": {"239": 1, "240": 1, "66": 12850, "16": i * 20, "113": 90},
    }
    body.update(overrides)
    return body


def imei(index: int) -> str:
    return f"35630704{index:07d}"


def entry(imei_index: int, i: int, **overrides: Any) -> dict[str, bytes]:
    return {
        "v": b"1",
        "imei": imei(imei_index).encode(),
        "payload": orjson.dumps(payload(imei_index, i, **overrides)),
    }


MALFORMED: list[tuple[dict[str, bytes], str]] = [
    ({"v": b"1", "imei": b"356307040000001", "payload": b"{not json"}, "invalid_json"),
    ({"v": b"2", "imei": b"356307040000001", "payload": b"{}"}, "unsupported_version"),
    ({"v": b"1", "payload": b"{}"}, "missing_field"),
    (
        {"v": b"1", "imei": b"356307040000001", "payload": orjson.dumps(payload(1, 1, lat=95.0))},
        "out_of_range",
    ),
    (
        {
            "v": b"1",
            "imei": b"356307040000001",
            "payload": orjson.dumps(payload(1, 2, io={"16": {"$bigint": "x"}})),
        },
        "bad_sentinel",
    ),
]


async def xadd_all(client: aioredis.Redis, stream: str, entries: list[dict[str, bytes]]) -> None:
    for start in range(0, len(entries), 1000):
        async with client.pipeline(transaction=False) as pipe:
            for fields in entries[start : start + 1000]:
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            await pipe.execute()


def shuffled(items: list[Any], seed: int = 7) -> list[Any]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


async def stored_keys(conn: asyncpg.Connection) -> list[tuple[int, int]]:
    rows = await conn.fetch(
        "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint AS ts FROM positions"
    )
    return [(r["device_id"], r["ts"]) for r in rows]


def processor_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``processor`` subprocess on this test's database and streams:
    no ``PROCESSOR_*`` variable of the caller leaks in; ``extra`` adds or overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        PROCESSOR_DATABASE_URL=settings.database_dsn(),
        PROCESSOR_REDIS_URL=settings.redis_dsn(),
        PROCESSOR_STREAM=settings.stream,
        PROCESSOR_DEAD_LETTER_STREAM=settings.dead_letter_stream,
        PROCESSOR_LIVE_PREFIX=settings.live_prefix,
    )
    env.update(extra)
    return env
