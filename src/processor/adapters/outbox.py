"""The transactional outbox of domain events, in table ``processor.outbox``.

The domain writer builds events with :func:`build_event` from the rows it writes and calls
:func:`record_events` inside the same transaction, so an event exists exactly when the
change it describes was committed. The dispatcher (:mod:`processor.adapters.dispatcher`)
delivers them to Directus Flows afterwards.

Event identity is deterministic. Each event is about a *subject* (the row family and its
natural key, e.g. ``stage_result:3:45``) and carries a *fingerprint* of its type and the
row's content. A change whose fingerprint equals the subject's last recorded one is a
recomputation of the same state and records nothing; otherwise it becomes the subject's
next *version*, and
``event_id = uuid5(type, subject, version, fingerprint)``. Two instances recording the same
change therefore produce the same ``event_id`` and the unique constraint keeps one, while a
value that flips back and forth (rank 3 → 2 → 3) still yields one event per flip.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

import asyncpg
import orjson

NOTIFY_CHANNEL: Final = "processor_outbox"

# Namespace of event ids; fixed forever so ids stay stable across versions of the code.
EVENT_NAMESPACE: Final = uuid.UUID("5b0c6f0e-2a51-5d3c-9b8e-6f7574626f78")


class EventType(StrEnum):
    """The domain event types the processor emits."""

    TIMING_RECORD_CREATED = "timing_record.created"
    TIMING_RECORD_UPDATED = "timing_record.updated"
    PENALTY_CREATED = "penalty.created"
    PENALTY_UPDATED = "penalty.updated"
    STAGE_RESULT_UPDATED = "stage_result.updated"
    ANOMALY_OPENED = "anomaly.opened"
    ANOMALY_UPDATED = "anomaly.updated"
    ANOMALY_CLOSED = "anomaly.closed"


# Natural keys of each row family (the unique constraints in DOMAIN.md).
NATURAL_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "timing_record": ("stage", "entry", "geofence", "kind", "pass"),
    "penalty": ("stage", "entry", "reason", "geofence", "seq"),
    "stage_result": ("stage", "entry"),
    "anomaly": ("device_imei", "kind", "started_at"),
}

# Columns that change on every write without the state changing; not part of identity.
VOLATILE_FIELDS: Final = frozenset(
    {"id", "updated_at", "date_created", "date_updated", "user_created", "user_updated"}
)


class EventError(ValueError):
    """An event cannot be built from the given row (unknown type, missing key column)."""


@dataclass(frozen=True, slots=True)
class EventContext:
    """Where a row belongs: event, stage, entry id and number (``None`` = take from row)."""

    event: int | str | None = None
    stage: int | str | None = None
    entry: int | str | None = None
    entry_number: int | str | None = None
    device_imei: str | None = None


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """One change to record: its type, subject, ordering key, JSON body and fingerprint."""

    type: str
    subject: str
    entry_key: str
    body: Mapping[str, Any]
    fingerprint: str
    occurred_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class _Row:
    """A DomainEvent resolved to the outbox columns."""

    event_id: uuid.UUID
    type: str
    subject: str
    version: int
    fingerprint: str
    entry_key: str
    occurred_at: dt.datetime | None
    body: str


def build_event(
    event_type: str,
    row: Mapping[str, Any],
    context: EventContext | None = None,
    *,
    occurred_at: dt.datetime | None = None,
) -> DomainEvent:
    """Build the event for ``row`` (a dict of the domain table's columns) of ``event_type``.

    Context fields left ``None`` are taken from the row's ``event``, ``stage``, ``entry``
    and ``device_imei`` columns. ``occurred_at`` defaults to the recording transaction's time.
    """
    kind = _checked_type(event_type)
    family = kind.value.split(".", 1)[0]
    plain_row = to_plain(row)
    ctx = _resolve_context(context or EventContext(), plain_row)
    body = {"row": plain_row, "context": ctx}
    return DomainEvent(
        type=kind.value,
        subject=subject_of(family, plain_row),
        entry_key=entry_key_of(ctx),
        body=body,
        fingerprint=fingerprint_of(kind.value, plain_row),
        occurred_at=occurred_at,
    )


def _checked_type(event_type: str) -> EventType:
    try:
        return EventType(event_type)
    except ValueError as exc:
        known = ", ".join(t.value for t in EventType)
        raise EventError(f"unknown event type {event_type!r} (known: {known})") from exc


def _resolve_context(context: EventContext, row: Mapping[str, Any]) -> dict[str, Any]:
    """The body's context: explicit values first, the row's columns otherwise."""
    context_values: dict[str, Any] = to_plain(
        {
            "event": _first(context.event, row.get("event")),
            "stage": _first(context.stage, row.get("stage")),
            "entry": _first(context.entry, row.get("entry")),
            "entry_number": context.entry_number,
            "device_imei": _first(context.device_imei, row.get("device_imei")),
        }
    )
    return context_values


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def subject_of(family: str, row: Mapping[str, Any]) -> str:
    """``family:key1:key2…`` from the family's natural key columns of a plain row."""
    columns = NATURAL_KEYS[family]
    missing = [c for c in columns if c not in row]
    if missing:
        raise EventError(f"{family} row lacks natural key column(s) {', '.join(missing)}")
    return ":".join([family, *("" if row[c] is None else str(row[c]) for c in columns)])


def entry_key_of(context: Mapping[str, Any]) -> str:
    """The ordering key: ``event:entry_number``, or ``event:device:imei`` with no entry."""
    event = "" if context["event"] is None else str(context["event"])
    if context["entry_number"] is not None:
        return f"{event}:{context['entry_number']}"
    if context["entry"] is not None:
        return f"{event}:entry-id:{context['entry']}"
    return f"{event}:device:{context['device_imei'] or ''}"


def fingerprint_of(event_type: str, row: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 32 chars) of the type and the row's content without volatile columns.

    The type is part of it so that one row state announced twice in a row under different
    types (an anomaly created already ended: ``anomaly.opened`` then ``anomaly.closed``)
    records both events.
    """
    stable = {k: v for k, v in row.items() if k not in VOLATILE_FIELDS}
    content = orjson.dumps([event_type, stable], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(content).hexdigest()[:32]


def event_id_of(event_type: str, subject: str, version: int, fingerprint: str) -> uuid.UUID:
    """The deterministic idempotency key of one recorded change."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{event_type}|{subject}|{version}|{fingerprint}")


def to_plain(value: Any) -> Any:
    """``value`` as JSON-ready data: times in UTC ISO 8601 with ms, decimals as floats."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return iso_utc(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def iso_utc(value: dt.datetime) -> str:
    """``2026-05-01T10:00:00.123Z``; a naive time is taken as UTC."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    text = aware.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


_LAST_VERSIONS = """
SELECT s.subject, last.version, last.fingerprint
FROM unnest($1::text[]) AS s(subject)
CROSS JOIN LATERAL (
    SELECT version, fingerprint FROM processor.outbox o
    WHERE o.subject = s.subject
    ORDER BY version DESC, id DESC
    LIMIT 1
) AS last
"""

_INSERT = """
WITH inserted AS (
    INSERT INTO processor.outbox
        (event_id, type, subject, version, fingerprint, entry_key, occurred_at, body)
    SELECT e, t, s, v, f, k, COALESCE(o, now()), b::jsonb
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[],
                $7::timestamptz[], $8::text[])
         WITH ORDINALITY AS u(e, t, s, v, f, k, o, b, n)
    ORDER BY n
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted
"""


async def record_events(conn: asyncpg.Connection, events: Sequence[DomainEvent]) -> int:
    """Insert ``events`` into the outbox, in order; returns how many were new.

    Call it inside the transaction that writes the rows the events describe. Changes equal
    to their subject's last recorded state, and events already recorded, are skipped.
    Dispatchers listening on ``processor_outbox`` are woken when the transaction commits.
    """
    if not events:
        return 0
    subjects = sorted({e.subject for e in events})
    last = {
        r["subject"]: (r["version"], r["fingerprint"])
        for r in await conn.fetch(_LAST_VERSIONS, subjects)
    }
    rows = _versioned(events, last)
    if not rows:
        return 0
    inserted: int = await conn.fetchval(_INSERT, *_columns(rows))
    if inserted:
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return inserted


def _versioned(events: Sequence[DomainEvent], last: Mapping[str, tuple[int, str]]) -> list[_Row]:
    """Give each change its subject's next version; drop repeats of the last state."""
    state = dict(last)
    rows: list[_Row] = []
    for event in events:
        version, fingerprint = state.get(event.subject, (0, ""))
        if fingerprint == event.fingerprint:
            continue
        version += 1
        state[event.subject] = (version, event.fingerprint)
        rows.append(_resolve(event, version))
    return rows


def _resolve(event: DomainEvent, version: int) -> _Row:
    return _Row(
        event_id=event_id_of(event.type, event.subject, version, event.fingerprint),
        type=event.type,
        subject=event.subject,
        version=version,
        fingerprint=event.fingerprint,
        entry_key=event.entry_key,
        occurred_at=event.occurred_at,
        body=orjson.dumps(event.body).decode(),
    )


def _columns(rows: Sequence[_Row]) -> tuple[list[Any], ...]:
    """The rows as the eight column arrays of the insert's ``unnest``."""
    return (
        [r.event_id for r in rows],
        [r.type for r in rows],
        [r.subject for r in rows],
        [r.version for r in rows],
        [r.fingerprint for r in rows],
        [r.entry_key for r in rows],
        [r.occurred_at for r in rows],
        [r.body for r in rows],
    )


# --- operator queries -------------------------------------------------------------------

STATUSES: Final = ("pending", "delivered", "dead", "skipped")

_LIST = """
SELECT id, event_id, type, entry_key, status, attempts, occurred_at, recorded_at,
       next_attempt_at, delivered_at, last_error
FROM processor.outbox
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::text IS NULL OR type = $2 OR type LIKE $3)
ORDER BY id DESC
LIMIT $4
"""

_RETRY = """
WITH retried AS (
    UPDATE processor.outbox
    SET status = 'pending', attempts = 0, next_attempt_at = now(), leased_until = NULL,
        lease_token = NULL, delivered_at = NULL
    WHERE id = ANY($1::bigint[]) OR event_id = ANY($2::uuid[])
       OR ($3 AND status = 'dead')
    RETURNING 1
)
SELECT count(*) FROM retried
"""


async def list_events(
    conn: asyncpg.Connection,
    *,
    status: str | None = None,
    event_type: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest ``limit`` outbox events, by status and by type (exact, or ``prefix.``)."""
    prefix = None if event_type is None else event_type.removesuffix("*").rstrip(".") + ".%"
    rows = await conn.fetch(_LIST, status, event_type, prefix, limit)
    return [dict(r) for r in rows]


async def retry_events(
    conn: asyncpg.Connection,
    *,
    ids: Sequence[int] = (),
    event_ids: Sequence[uuid.UUID] = (),
    dead: bool = False,
) -> int:
    """Make the given events (any status) and, with ``dead``, every dead one pending again.

    Attempts restart from zero. Returns how many events were reset; dispatchers are woken.
    """
    count: int = await conn.fetchval(_RETRY, list(ids), list(event_ids), dead)
    if count:
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return count
