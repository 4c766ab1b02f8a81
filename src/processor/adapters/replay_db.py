"""``processor replay --event``: recompute an event's results from the stored positions.

The stored course (or, with ``--course``, another layout mapped onto it) is evaluated over
the stored positions with :func:`processor.domain.engine.evaluate` (``source = replay``);
the recomputed rows of the selected units are compared with the stored ones through
:func:`processor.adapters.domain_store.sync_unit` — the same code that writes them live —
and the difference is printed. ``--write`` stores the recomputed rows and their outbox
events in one transaction. Positions are only read.

Exit codes: 0 no difference (or written), 1 differences found, 2 bad input, 3 database
failure. docs/domain.md "Replay from the database" is the operator's guide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg
import click
import orjson

from processor.adapters import domain_store as store
from processor.adapters.domain_store import Change, Row, as_ms, as_time
from processor.adapters.outbox import to_plain
from processor.adapters.positions_store import init_connection
from processor.adapters.reference import EventNotFoundError
from processor.domain.engine import DomainResult, evaluate
from processor.domain.model import Course, CourseError, Entry, Id, Stage
from processor.domain.timeutil import format_ms
from processor.tools.replay_cli import ReplayInputError, emit, load_course

T = TypeVar("T")

EXIT_SAME: Final = 0
EXIT_DIFFERENT: Final = 1
EXIT_DATABASE: Final = 3
COLLECTIONS: Final = ("timing_records", "penalties", "stage_results", "anomalies")
ACTIONS: Final = ("created", "updated", "deleted")
_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "timing_records": ("stage", "entry", "geofence", "kind", "pass"),
    "penalties": ("stage", "entry", "reason", "geofence", "seq"),
    "stage_results": ("stage", "entry"),
    "anomalies": ("entry", "kind", "started_at"),
}
# What a created or deleted row shows besides its key (updated rows show what changed).
_SHOWN: Final[Mapping[str, tuple[str, ...]]] = {
    "timing_records": ("ts", "method", "source"),
    "penalties": ("seconds",),
    "stage_results": ("status", "total_ms", "rank"),
    "anomalies": ("severity", "ended_at"),
}


# --- the request -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """What to replay: an event, optionally one stage, one entry, a time range."""

    event_id: int
    stage_id: int | None = None
    entry_number: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    write: bool = False
    layout_path: Path | None = None

    @property
    def since(self) -> datetime | None:
        return as_time(self.since_ms)

    @property
    def until(self) -> datetime | None:
        return as_time(self.until_ms)


def request_from_options(options: Mapping[str, Any]) -> Request:
    """The validated request from the ``replay`` command's options (bad input: exit 2)."""
    request = Request(
        event_id=_int_option(options["event_id"], "--event"),
        stage_id=_opt_int_option(options["stage_id"], "--stage"),
        entry_number=options["entry_number"],
        since_ms=options["from_ms"],
        until_ms=options["to_ms"],
        write=bool(options["write"]),
        layout_path=options["course_path"],
    )
    if options["positions_path"] is not None:
        raise ReplayInputError("--positions is for offline replay; --event reads the database")
    if request.write and request.layout_path is not None:
        raise ReplayInputError(
            "--write with --course refused: a layout experiment is compared with the stored "
            "results, never written over them (import the course first to make it real)"
        )
    _check_range(request)
    return request


def _int_option(value: object, flag: str) -> int:
    try:
        return int(str(value))
    except ValueError as exc:
        raise ReplayInputError(f"{flag}: not an id: {value!r}") from exc


def _opt_int_option(value: object, flag: str) -> int | None:
    return None if value is None else _int_option(value, flag)


def _check_range(request: Request) -> None:
    try:
        since, until = request.since, request.until
    except OverflowError as exc:
        raise ReplayInputError("--from/--to: time out of range") from exc
    if since is not None and until is not None and since > until:
        raise ReplayInputError("--from is after --to")


# --- the course replayed ---------------------------------------------------------------------


def map_layout(layout: Course, stored: Course) -> Course:
    """``layout`` with the stored event's ids: stages by name, entries by number,
    geofences by (stage name, geofence name); a geofence the event lacks gets the id
    ``new:<stage>/<name>`` (its rows can only be "created"). Unknown stages or entries are
    bad input: a layout is tested against the event's own stages and entries."""
    stage_ids = {s.name: s.id for s in stored.stages}
    entry_ids = {e.number: e.id for e in stored.entries}
    stage_map = {s.id: _known(stage_ids, s.name, "stage") for s in layout.stages}
    entry_map = {e.id: _known(entry_ids, e.number, "entry") for e in layout.entries}
    stage_name = {s.id: s.name for s in layout.stages}
    stored_names: dict[Id | None, str] = {s.id: s.name for s in stored.stages}
    geofence_ids = {(stored_names.get(g.stage), g.name): g.id for g in stored.geofences}

    def geofence_id(stage: Id | None, name: str) -> Id:
        where = stage_name.get(stage) if stage is not None else None
        return geofence_ids.get((where, name), f"new:{where or ''}/{name}")

    return Course(
        event=dataclasses.replace(layout.event, id=stored.event.id),
        stages=tuple(dataclasses.replace(s, id=stage_map[s.id]) for s in layout.stages),
        geofences=tuple(
            dataclasses.replace(
                g,
                id=geofence_id(g.stage, g.name),
                stage=None if g.stage is None else stage_map[g.stage],
            )
            for g in layout.geofences
        ),
        entries=tuple(dataclasses.replace(e, id=entry_map[e.id]) for e in layout.entries),
        start_times=tuple(
            dataclasses.replace(t, stage=stage_map[t.stage], entry=entry_map[t.entry])
            for t in layout.start_times
        ),
    )


def _known(ids: Mapping[Any, Id], key: object, what: str) -> Id:
    if key not in ids:
        raise ReplayInputError(f"course file: {what} {key!r} is not in the event")
    return ids[key]


async def stored_course(conn: asyncpg.Connection, event_id: int) -> Course:
    """The event's course from the database (unknown event or invalid course: exit 2)."""
    try:
        return await store.load_course(conn, event_id)
    except EventNotFoundError as exc:
        raise ReplayInputError(str(exc)) from exc
    except CourseError as exc:
        raise ReplayInputError(f"event {event_id}: the stored course is invalid: {exc}") from exc


# --- the selection ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selection:
    """The units compared: stages and entries, and the span of anomalies that count."""

    stages: tuple[Stage, ...]
    entries: tuple[Entry, ...]
    anomaly_from: int | None
    anomaly_to: int | None

    @property
    def units(self) -> list[tuple[int, int]]:
        return [(int(s.id), int(e.id)) for s in self.stages for e in self.entries]

    def anomaly_in(self, started_at: datetime) -> bool:
        """Whether an anomaly starting then is replayed (others are left as stored)."""
        ms = as_ms(started_at)
        lo, hi = self.anomaly_from, self.anomaly_to
        return (lo is None or ms >= lo) and (hi is None or ms <= hi)

    @property
    def partial_anomalies(self) -> bool:
        return self.anomaly_from is not None or self.anomaly_to is not None


def select(course: Course, request: Request) -> Selection:
    """The stages and entries of ``request`` in the stored course (unknown ones: exit 2)."""
    stages = [s for s in course.stages if _overlaps(s, request.since_ms, request.until_ms)]
    if request.stage_id is not None:
        if all(s.id != request.stage_id for s in course.stages):
            raise ReplayInputError(f"--stage {request.stage_id}: not a stage of this event")
        stages = [s for s in stages if s.id == request.stage_id]
    entries = list(course.entries)
    if request.entry_number is not None:
        entries = [e for e in entries if e.number == request.entry_number]
        if not entries:
            raise ReplayInputError(f"--entry {request.entry_number}: no such entry number")
    lo, hi = request.since_ms, request.until_ms
    if request.stage_id is not None and stages:
        lo = _latest(lo, stages[0].opens_at)
        hi = _earliest(hi, stages[0].closes_at)
    return Selection(tuple(stages), tuple(entries), lo, hi)


def read_span(
    course: Course, selection: Selection, request: Request
) -> tuple[int | None, int | None]:
    """The positions to read: the whole windows of the selected stages (so their rows are
    exact), else the requested range; (None, None) = the course's window."""
    if request.stage_id is None and request.since_ms is None and request.until_ms is None:
        return None, None
    ids = {s.id for s in selection.stages}
    stages = [s for s in course.stages if s.id in ids]  # the replayed course's windows
    if not stages:
        return request.since_ms, request.until_ms
    opens = [s.opens_at for s in stages]
    closes = [s.closes_at for s in stages]
    lo = None if None in opens else min(o for o in opens if o is not None)
    hi = None if None in closes else max(c for c in closes if c is not None)
    return lo, hi


def _overlaps(stage: Stage, lo: int | None, hi: int | None) -> bool:
    return (lo is None or stage.closes_at is None or stage.closes_at >= lo) and (
        hi is None or stage.opens_at is None or stage.opens_at <= hi
    )


def _latest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


# --- compare and write -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """What a database replay found (and wrote)."""

    event_id: int
    now_ms: int
    positions: int
    units: int
    ranked: bool
    written: bool
    layout: Path | None
    changes: tuple[Change, ...]
    stage_names: Mapping[Any, str]
    stage_order: Mapping[Any, int]
    entry_numbers: Mapping[Any, int]
    geofence_names: Mapping[Any, str]

    @property
    def differs(self) -> bool:
        return bool(self.changes)


async def replay_event(
    conn: asyncpg.Connection, request: Request, now_ms: int, layout: Course | None = None
) -> Report:
    """Recompute the selected units and compare them with the stored rows (or write them).

    ``layout`` (a course file's course) replaces the stored one, mapped by :func:`map_layout`.
    Ranks are compared only when every entry of a stage is recomputed (no ``--entry``);
    with ``--entry`` they are left to the stage-wide ranking, which ``--write`` reruns.
    """
    stored = await stored_course(conn, request.event_id)
    course = stored if layout is None else map_layout(layout, stored)
    selection = select(stored, request)
    imeis = None
    if request.entry_number is not None:
        imeis = [e.imei for e in course.entries if e.number == request.entry_number and e.imei]
    since, until = read_span(course, selection, request)
    positions = await store.load_positions(
        conn, course, imeis=imeis, since=as_time(since), until=as_time(until)
    )
    result = evaluate(course, positions, now_ms, source="replay")
    ranked = request.entry_number is None
    if request.write:
        changes = await _write(conn, stored, result, selection, ranked=ranked)
    else:
        changes = await _sync(conn, stored, result, selection, write=False, ranked=ranked)
    return Report(
        event_id=request.event_id,
        now_ms=now_ms,
        positions=len(positions),
        units=len(selection.units),
        ranked=ranked,
        written=request.write,
        layout=request.layout_path,
        changes=tuple(changes),
        stage_names={s.id: s.name for s in (*stored.stages, *course.stages)},
        stage_order={s.id: s.sequence for s in stored.stages},
        entry_numbers={e.id: e.number for e in stored.entries},
        geofence_names={g.id: g.name for g in (*stored.geofences, *course.geofences)},
    )


async def _sync(
    conn: asyncpg.Connection,
    course: Course,
    result: DomainResult,
    selection: Selection,
    *,
    write: bool,
    ranked: bool,
) -> list[Change]:
    changes: list[Change] = []
    for stage_id, entry_id in selection.units:
        changes += await store.sync_entry_stage(
            conn, result, stage_id, entry_id, write=write, ranked=ranked
        )
    event_id = int(course.event.id)
    for entry in selection.entries:
        changes += await _sync_anomalies(conn, result, event_id, int(entry.id), selection, write)
    return changes


async def _sync_anomalies(
    conn: asyncpg.Connection,
    result: DomainResult,
    event_id: int,
    entry_id: int,
    selection: Selection,
    write: bool,
) -> list[Change]:
    """One entry's anomalies; with a partial span, stored ones outside it stay as they are."""
    if not selection.partial_anomalies:
        return await store.sync_entry_anomalies(conn, result, event_id, entry_id, write=write)
    scope = {"event": event_id, "entry": entry_id}
    kept = [
        store.plain_row(store.ANOMALIES, r)
        for r in await conn.fetch(store.ANOMALIES.select(list(scope)), *scope.values())
        if not selection.anomaly_in(r["started_at"])
    ]
    wanted = [
        row
        for row in (store.anomaly_row(a) for a in result.anomalies if a.entry_id == entry_id)
        if selection.anomaly_in(row["started_at"])
    ]
    return await store.sync_unit(conn, store.ANOMALIES, scope, [*wanted, *kept], write=write)


async def _write(
    conn: asyncpg.Connection,
    course: Course,
    result: DomainResult,
    selection: Selection,
    *,
    ranked: bool,
) -> list[Change]:
    """Store the recomputed rows, re-rank the stages and record the outbox events, in one
    transaction and under the live service's stage locks (so the two never interleave)."""
    from processor.adapters.domain_live import _RANK_LOCK, domain_events, record

    stages = sorted({int(s.id) for s in selection.stages})
    numbers = {int(e.id): e.number for e in course.entries}
    async with conn.transaction():
        for stage_id in stages:
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _RANK_LOCK, stage_id)
        changes = await _sync(conn, course, result, selection, write=True, ranked=ranked)
        for stage_id in stages:
            changes += await store.rank_stage_rows(conn, stage_id)
        await record(conn, domain_events(changes, int(course.event.id), numbers))
    return changes


# --- output ----------------------------------------------------------------------------------


def _value(value: Any) -> Any:
    return to_plain(value)


def _show(value: Any) -> str:
    plain = _value(value)
    if isinstance(plain, str):
        return plain
    return orjson.dumps(plain, option=orjson.OPT_SORT_KEYS).decode()


def changed_columns(change: Change) -> list[str]:
    """The columns an update changes (decimals compared by value, JSON by content)."""
    if change.before is None:
        return []
    return [c for c in change.row if _value(change.row[c]) != _value(change.before.get(c))]


def _key_text(report: Report, collection: str, row: Row) -> str:
    parts = []
    for column in _KEYS[collection]:
        value = row.get(column)
        if column == "stage":
            parts.append(str(report.stage_names.get(value, value)))
        elif column == "entry":
            parts.append(f"#{report.entry_numbers.get(value, value)}")
        elif column == "geofence":
            parts.append(str(report.geofence_names.get(value, value or "-")))
        elif column in ("pass", "seq"):
            parts.append(f"{column} {value}")
        else:
            parts.append(_show(value))
    return " ".join(parts)


def _order(report: Report, collection: str, change: Change) -> tuple[Any, ...]:
    """Created, updated, deleted; then stage sequence, entry number, time, key."""
    row = change.row
    when = row.get("ts") or row.get("started_at")
    return (
        ACTIONS.index(change.action),
        report.stage_order.get(row.get("stage"), -1),
        report.entry_numbers.get(row.get("entry"), 0),
        _show(when) if when is not None else "",
        _key_text(report, collection, row),
    )


def _change_text(report: Report, collection: str, change: Change) -> str:
    key = _key_text(report, collection, change.row)
    if change.action == "updated" and change.before is not None:
        before = change.before
        detail = "; ".join(
            f"{c} {_show(before.get(c))} → {_show(change.row[c])}" for c in changed_columns(change)
        )
    else:
        detail = ", ".join(f"{c} {_show(change.row.get(c))}" for c in _SHOWN[collection])
    return f"  {change.action:<8} {key}: {detail}"


def _by_collection(report: Report) -> dict[str, list[Change]]:
    out: dict[str, list[Change]] = {name: [] for name in COLLECTIONS}
    for change in report.changes:
        out[change.table].append(change)
    return out


def _counts(changes: Iterable[Change]) -> dict[str, int]:
    counts = dict.fromkeys(ACTIONS, 0)
    for change in changes:
        counts[change.action] += 1
    return counts


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def summary_line(report: Report) -> str:
    """One line: what was compared and what differs (or was written)."""
    counts = _counts(report.changes)
    layout = f" with course file {report.layout}" if report.layout else ""
    head = (
        f"event {report.event_id}{layout}: {report.units} stage-entry unit{_s(report.units)},"
        f" {report.positions} positions, now {format_ms(report.now_ms)}"
    )
    if not report.differs:
        return f"{head}: no difference"
    what = ", ".join(f"{counts[a]} {a}" for a in ACTIONS)
    done = "written (source = replay)" if report.written else "not written (use --write)"
    return f"{head}: {what}; {done}"


def to_text(report: Report) -> str:
    """The difference for people: one table per collection, then the summary line."""
    lines: list[str] = []
    for collection, changes in _by_collection(report).items():
        if not changes:
            continue
        counts = _counts(changes)
        lines.append(f"{collection}: " + ", ".join(f"{counts[a]} {a}" for a in ACTIONS))
        ordered = sorted(changes, key=lambda c: _order(report, collection, c))
        lines.extend(_change_text(report, collection, c) for c in ordered)
    if not report.ranked:
        lines.append("(ranks, class ranks and gaps not compared: one entry alone cannot rank)")
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> bytes:
    """The difference as JSON: changes per collection with key, row, before and changed."""
    collections = {}
    for collection, changes in _by_collection(report).items():
        collections[collection] = [
            {
                "action": c.action,
                "key": _key_text(report, collection, c.row),
                "row": _value(c.row),
                "before": _value(c.before),
                "changed": changed_columns(c),
            }
            for c in changes
        ]
    body = {
        "event": report.event_id,
        "course_file": None if report.layout is None else str(report.layout),
        "now": format_ms(report.now_ms),
        "positions": report.positions,
        "units": report.units,
        "ranks_compared": report.ranked,
        "written": report.written,
        "summary": _counts(report.changes),
        "changes": collections,
    }
    return orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


# --- the command -----------------------------------------------------------------------------


def replay_from_database(options: dict[str, Any]) -> int:
    """``processor replay --event``: compare (or ``--write``); the process exit code."""
    from processor.cli import settings_or_exit

    request = request_from_options(options)
    layout = None if request.layout_path is None else load_course(request.layout_path)
    settings = settings_or_exit()
    now_ms = options["now_ms"] if options["now_ms"] is not None else int(time.time() * 1000)
    report = _run(settings.database_dsn(), lambda conn: replay_event(conn, request, now_ms, layout))
    as_json = _output_format(options) == "json"
    data = to_json(report) if as_json else to_text(report).encode("utf-8")
    emit(data, options.get("output_path"))
    if report.written:
        return EXIT_SAME
    return EXIT_DIFFERENT if report.differs else EXIT_SAME


def _output_format(options: Mapping[str, Any]) -> str:
    """``--format`` when given; the table by default (the offline default, JSON, is for
    machines; a difference is read by people)."""
    from click.core import ParameterSource

    chosen = options.get("output_format")
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        source = ctx.get_parameter_source("output_format")
        if source in (None, ParameterSource.DEFAULT):
            return "table"
    return str(chosen or "table")


def _run(dsn: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Connect, run ``action``, close; a database failure prints one line and exits 3."""

    async def main() -> T:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await init_connection(conn)  # jsonb as the service's connections read and write it
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(main())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        click.echo(f"Error: database: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(EXIT_DATABASE) from exc


__all__: Sequence[str] = (
    "Report",
    "Request",
    "map_layout",
    "replay_event",
    "replay_from_database",
    "request_from_options",
    "to_json",
    "to_text",
)
