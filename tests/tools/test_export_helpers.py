"""Shared helpers of the export tests: contract entries, loading a stream, reading back."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import orjson
import redis.asyncio as aioredis

BASE_TS = 1_717_243_200_000  # 2024-06-01T12:00:00Z
DAY_MS = 86_400_000

COLUMNS = (
    "imei, device_id, epoch_ms(ts) AS ts, epoch_ms(received_at) AS received_at, lat, lon, alt,"
    " angle, sat, speed, priority, event_io, codec, generation, stream_id, io"
)


def imei(device: int) -> str:
    return f"35630704{device:07d}"


def payload(ts: int, n: int) -> dict[str, Any]:
    """A valid payload whose values vary with ``n`` (signs, codecs, sentinels)."""
    io: dict[str, Any] = {"239": n % 2, "66": 12_000 + n % 1000, "241": 21_901 + n}
    if n % 3 == 0:
        io["78"] = {"$bigint": str(2**64 - 1 - n)}  # 8-byte values above 2^53
    if n % 5 == 0:
        io["256"] = {"$bytes": base64.b64encode(b"VIN%05d" % n).decode()}
    codec = 16 if n % 4 == 0 else 142
    return {
        "codec": codec,
        "ts": ts,
        "received_at": ts + 700,
        "priority": n % 3,
        "lat": round(-33.5 + (n % 1000) * 1e-4, 7),
        "lon": round(-70.6 + (n % 777) * 1e-4, 7),
        "alt": -20 + n % 900,
        "angle": n % 360,
        "sat": n % 15,
        "speed": n % 200,
        "event_io": 0 if n % 7 else 239,
        "generation": (n % 8) if codec == 16 else None,
        "io": io,
    }


def entry(device: int, ts: int, n: int) -> dict[str, bytes]:
    return {
        "v": b"1",
        "imei": imei(device).encode(),
        "payload": orjson.dumps(payload(ts, n)),
    }


def entries(count: int, *, devices: int = 20, span_days: int = 1) -> list[dict[str, bytes]]:
    """``count`` valid entries for ``devices`` trackers, spread over ``span_days`` days."""
    step = max(span_days * DAY_MS // max(count // devices, 1), 1)
    return [entry(i % devices, BASE_TS + (i // devices) * step, i) for i in range(count)]


async def xadd_all(
    client: aioredis.Redis, stream: str, items: Sequence[dict[str, bytes]]
) -> list[str]:
    """Append ``items`` in order; their stream ids."""
    ids: list[str] = []
    for start in range(0, len(items), 5_000):
        async with client.pipeline(transaction=False) as pipe:
            for fields in items[start : start + 5_000]:
                pipe.xadd(stream, fields)  # type: ignore[arg-type]
            ids.extend(i.decode() for i in await pipe.execute())
    return ids


def expected_row(stream_id: str, fields: dict[str, bytes]) -> tuple[Any, ...]:
    """The row the export must hold for one entry (IO as parsed JSON)."""
    body = orjson.loads(fields["payload"])
    io: dict[str, Any] = {}
    for key, value in body["io"].items():
        if isinstance(value, dict) and "$bigint" in value:
            io[key] = int(value["$bigint"])
        elif isinstance(value, dict):
            io[key] = base64.b64decode(value["$bytes"]).hex()
        else:
            io[key] = value
    device = fields["imei"].decode()
    return (
        device, int(device), body["ts"], body["received_at"], body["lat"], body["lon"],
        body["alt"], body["angle"], body["sat"], body["speed"], body["priority"],
        body["event_io"], body["codec"], body["generation"], stream_id, io,
    )  # fmt: skip


def dataset_glob(out: Path) -> str:
    return str(out / "**" / "*.parquet")


def read_rows(out: Path) -> list[tuple[Any, ...]]:
    """Every row of the dataset through DuckDB, IO parsed from its JSON text."""
    with duckdb.connect() as con:
        rows = con.sql(
            f"SELECT {COLUMNS} FROM read_parquet('{dataset_glob(out)}', hive_partitioning=true)"
        ).fetchall()
    return [(*row[:-1], orjson.loads(row[-1])) for row in rows]
