"""The IO mappings of the Directus tables, cached, and the attribute rows they produce.

:class:`MappingCache` loads ``device_models``, ``io_mappings`` and ``devices`` once, then
polls a fingerprint of them every ``mapping_reload_s`` and reloads when an organiser has
changed anything, so a corrected mapping applies without a restart. Decoding is
synchronous and in memory (:meth:`MappingCache.rows`), fit to run inside the positions
transaction. A device missing from ``devices`` (or without a model) is decoded with
``default_device_model``; unknown devices are counted and logged once each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import asyncpg
import orjson
from prometheus_client import Counter

from processor.adapters.pgcopy import attribute_copy_records
from processor.adapters.pgcopy import attribute_rows as pgcopy_rows
from processor.core.attributes import (
    NATIVE,
    AttributeRow,
    DeviceEntry,
    IoElement,
    ModelMapping,
    attribute_rows,
    decode_attributes,
)
from processor.core.jsonenc import attributes_json
from processor.core.records import Record
from processor.logs import get_logger
from processor.settings import Settings

if TYPE_CHECKING:
    from processor.service import Runtime


UNKNOWN_DEVICE_RECORDS: Final = Counter(
    "processor_attributes_unknown_device_records",
    "Records of devices not in the devices table, decoded with the default model.",
)
UNKNOWN_DEVICES: Final = Counter(
    "processor_attributes_unknown_devices",
    "Devices not in the devices table, counted once each per process.",
)
DECODE_ERRORS: Final = Counter(
    "processor_attributes_decode_errors",
    "Records whose IO mapping failed to decode them; stored with their raw IO as attributes.",
)
MAPPING_RELOADS: Final = Counter(
    "processor_attributes_mapping_reloads", "Reloads of the IO mappings after a change."
)
MAPPING_RELOAD_ERRORS: Final = Counter(
    "processor_attributes_mapping_reload_errors", "Failed polls or reloads of the IO mappings."
)

# One cheap query: a digest of every row the cache depends on (tables of a few thousand
# rows at most), so inserts, updates and deletes all change it.
FINGERPRINT_SQL: Final = """
SELECT md5(
    coalesce((SELECT string_agg(t::text, '|' ORDER BY t.id) FROM io_mappings t), '') || '#' ||
    coalesce((SELECT string_agg(t::text, '|' ORDER BY t.id) FROM device_models t), '') || '#' ||
    coalesce((SELECT string_agg(t.imei || ':' || coalesce(t.device_model::text, ''), '|'
                                ORDER BY t.id) FROM devices t), '')
)
"""
_MAPPINGS_SQL: Final = """
SELECT m.model, i.io_id, i.name, i.bytes, i.signed, i.multiplier, i."offset", i.unit,
       i."values"::text AS "values"
FROM io_mappings i JOIN device_models m ON m.id = i.device_model
ORDER BY m.model, i.io_id, i.id
"""
_DEVICES_SQL: Final = """
SELECT d.imei, m.model FROM devices d LEFT JOIN device_models m ON m.id = d.device_model
"""
_MAX_LOGGED_UNKNOWN: Final = 100_000
_MAX_DEVICE_ENTRIES: Final = 200_000

log = get_logger("processor.mappings")


@dataclass(frozen=True, slots=True)
class MappingSet:
    """One consistent load: mappings by model, and each known device's model (or None)."""

    models: Mapping[str, ModelMapping]
    devices: Mapping[int, str | None]
    fingerprint: str


@dataclass(slots=True)
class MappingCache:
    """Per-model IO mappings and the device → model table, reloaded when they change."""

    default_model: str
    reload_s: float
    clock: Callable[[], float] = time.monotonic
    current: MappingSet = field(default_factory=lambda: MappingSet({}, {}, ""))
    _checked_at: float = float("-inf")
    _unknown_logged: set[int] = field(default_factory=set)
    # Each device's encoder, version and whether it is known, for the current load.
    _entries: dict[int, DeviceEntry] = field(default_factory=dict)
    _entries_of: MappingSet | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> MappingCache:
        """A cache using ``default_device_model`` and ``mapping_reload_s``."""
        return cls(settings.default_device_model, settings.mapping_reload_s)

    async def load(self, conn: asyncpg.Connection) -> None:
        """Read the mappings and devices now (one snapshot-consistent transaction)."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            fingerprint = await conn.fetchval(FINGERPRINT_SQL)
            mapping_rows = await conn.fetch(_MAPPINGS_SQL)
            device_rows = await conn.fetch(_DEVICES_SQL)
        self.current = build_mapping_set(mapping_rows, device_rows, fingerprint)
        self._checked_at = self.clock()

    async def refresh(self, conn: asyncpg.Connection, *, force: bool = False) -> bool:
        """Reload if ``reload_s`` has passed and the tables changed; True when reloaded."""
        if not force and self.clock() - self._checked_at < self.reload_s:
            return False
        self._checked_at = self.clock()
        if await conn.fetchval(FINGERPRINT_SQL) == self.current.fingerprint:
            return False
        await self.load(conn)
        MAPPING_RELOADS.inc()
        log.info("io mappings reloaded", models=sorted(self.current.models))
        return True

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
        """Poll for changes every ``reload_s`` until ``stop``; database errors are retried."""
        while not stop.is_set():
            try:
                async with pool.acquire() as conn:
                    await self.refresh(conn, force=True)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                MAPPING_RELOAD_ERRORS.inc()
                log.warning("io mapping poll failed", error=f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.reload_s)
            except TimeoutError:
                continue

    def model_for(self, device_id: int) -> str:
        """The model of a device (IMEI as integer); the default model when it has none."""
        devices = self.current.devices
        if device_id in devices:
            return devices[device_id] or self.default_model
        if device_id not in self._unknown_logged:
            if len(self._unknown_logged) >= _MAX_LOGGED_UNKNOWN:
                self._unknown_logged.clear()  # bounded memory; a device may be logged again
            self._unknown_logged.add(device_id)
            UNKNOWN_DEVICES.inc()
            log.warning(
                "unknown device, using default model", imei=device_id, model=self.default_model
            )
        return self.default_model

    def mapping(self, model: str) -> ModelMapping:
        """The compiled mapping of ``model``; an empty one (everything raw) if it has no rows."""
        found = self.current.models.get(model)
        return found if found is not None else ModelMapping.build(model, ())

    def rows(self, records: Sequence[Record], *, count: bool = True) -> list[AttributeRow]:
        """``position_attributes`` rows for records: (device_id, ts ms, JSON, mapping version).

        ``count``: count the records of unknown devices (False when decoding them again).
        """
        try:
            out, unknown = attribute_rows(records, self._device_entries(), self._entry)
        except Exception:  # noqa: BLE001 - a mapping failing on a record: see below
            out, unknown = self._rows_one_by_one(records)
        if unknown and count:
            UNKNOWN_DEVICE_RECORDS.inc(unknown)
        return out

    def copy_data(self, records: Sequence[Record]) -> bytes:
        """The records' ``position_attributes`` rows as binary COPY data, in one pass."""
        try:
            data, unknown = attribute_copy_records(records, self._device_entries(), self._entry)
        except Exception:  # noqa: BLE001 - a mapping failing on a record: see below
            rows, unknown = self._rows_one_by_one(records)
            data = pgcopy_rows(rows)
        if unknown:
            UNKNOWN_DEVICE_RECORDS.inc(unknown)
        return data

    def _rows_one_by_one(self, records: Sequence[Record]) -> tuple[list[AttributeRow], int]:
        """Rows record by record: a record its mapping fails on gets its raw IO instead.

        Attributes are derived data and must never cost a position: such a record is
        stored, its attributes are the IO elements under their ids (as for a model without
        mappings, with that empty mapping's version, so a backfill after the mapping is
        fixed finds it), and the failure is counted and logged.
        """
        entries = self._device_entries()
        out: list[AttributeRow] = []
        unknown = 0
        for record in records:
            try:
                rows, missing = attribute_rows([record], entries, self._entry)
            except Exception as exc:  # noqa: BLE001 - any decoder bug: the position is kept
                raw = ModelMapping.build(self.model_for(record.device_id), ())
                text = attributes_json(decode_attributes(record.io, raw))  # in Python: sure
                rows = [(record.device_id, record.ts, text, raw.version)]
                missing = record.device_id not in self.current.devices
                DECODE_ERRORS.inc()
                log.error(
                    "attributes not decoded, raw IO kept",
                    imei=record.device_id,
                    model=raw.model,
                    error=f"{type(exc).__name__}: {exc}",
                )
            out.extend(rows)
            unknown += missing
        return out, unknown

    def _device_entries(self) -> dict[int, DeviceEntry]:
        if self._entries_of is not self.current or len(self._entries) > _MAX_DEVICE_ENTRIES:
            self._entries = {}  # a reload (or too many devices): look each one up again
            self._entries_of = self.current
        return self._entries

    def _entry(self, device_id: int) -> DeviceEntry:
        mapping = self.mapping(self.model_for(device_id))
        return mapping.encoder(), mapping.version, device_id in self.current.devices


def build_mapping_set(
    mapping_rows: Iterable[Mapping[str, object]],
    device_rows: Iterable[Mapping[str, object]],
    fingerprint: str,
) -> MappingSet:
    """Compile database rows into a :class:`MappingSet` (bad rows are skipped and logged)."""
    elements: dict[str, list[IoElement]] = {}
    for row in mapping_rows:
        model = str(row["model"])
        try:
            elements.setdefault(model, []).append(_element(row))
        except (ValueError, TypeError) as exc:
            log.error("io mapping row ignored", model=model, io_id=row["io_id"], error=str(exc))
    models = {model: ModelMapping.build(model, items) for model, items in elements.items()}
    devices: dict[int, str | None] = {}
    for row in device_rows:
        imei = str(row["imei"])
        if imei.isdigit():
            devices[int(imei)] = None if row["model"] is None else str(row["model"])
    return MappingSet(models, devices, fingerprint)


def _element(row: Mapping[str, object]) -> IoElement:
    values = row["values"]
    return IoElement.from_row(
        int(row["io_id"]),  # type: ignore[call-overload]
        str(row["name"]),
        size=int(row["bytes"]),  # type: ignore[call-overload]
        signed=bool(row["signed"]),
        multiplier=row["multiplier"],  # type: ignore[arg-type]
        offset=row["offset"],  # type: ignore[arg-type]
        unit=None if row["unit"] is None else str(row["unit"]),
        values=None if values is None else orjson.loads(str(values)),
    )


async def install(runtime: Runtime) -> None:
    """Wire attribute decoding into a running service: load, decode on write, poll changes."""
    cache = MappingCache.from_settings(runtime.settings)
    async with runtime.pool.acquire() as conn:
        await cache.load(conn)
    runtime.store.attributes = cache
    log.info("attribute decoding on", encoder="C" if NATIVE else "Python (built without C)")
    runtime.background.append(lambda stop: cache.run(runtime.pool, stop))
