"""What ``processor demo`` shows: the stage leaderboard, the latest alerts, pipeline figures.

Reading (:func:`read_snapshot`, :func:`scrape_pipeline`) is separate from rendering
(:func:`live_view` for a terminal, :func:`plain_snapshot` for logs and CI,
:func:`leaderboard_table` for the final standings), so the renderers are plain functions
of a :class:`Snapshot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

STANDINGS_SQL = """
SELECT r.rank, e.number, e.name, e."class" AS klass, coalesce(r.status, 'not_started') AS status,
       r.elapsed_ms, r.penalty_ms, r.total_ms, r.gap_ms
FROM entries e
JOIN stages s ON s.event = e.event
LEFT JOIN stage_results r ON r.entry = e.id AND r.stage = s.id
WHERE e.event = $1
ORDER BY r.rank NULLS LAST,
         CASE coalesce(r.status, 'not_started')
             WHEN 'finished' THEN 0 WHEN 'running' THEN 1 WHEN 'not_started' THEN 2 ELSE 3 END,
         e.number
"""

ALERTS_SQL = """
SELECT a.started_at, a.ended_at, a.kind, a.severity, e.number
FROM anomalies a LEFT JOIN entries e ON e.id = a.entry
WHERE a.event = $1
ORDER BY a.started_at DESC, a.id DESC
LIMIT $2
"""

STATUS_STYLE = {"finished": "green", "running": "cyan", "dnf": "red", "not_started": "dim"}
SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "dim"}


@dataclass(frozen=True, slots=True)
class Standing:
    """One row of the stage leaderboard."""

    rank: int | None
    number: int
    name: str
    klass: str
    status: str
    elapsed_ms: int | None
    penalty_ms: int | None
    total_ms: int | None
    gap_ms: int | None


@dataclass(frozen=True, slots=True)
class Alert:
    """One anomaly, newest first."""

    started_at: datetime
    ended: bool
    kind: str
    severity: str
    number: int | None


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Figures scraped from the processor's /metrics."""

    read: float = 0.0
    stored: float = 0.0
    duplicates: float = 0.0
    dead_letters: float = 0.0
    lag_s: float = 0.0
    stream_lag: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one refresh shows."""

    standings: tuple[Standing, ...] = ()
    alerts: tuple[Alert, ...] = ()
    alerts_total: int = 0
    pipeline: Pipeline | None = None
    header: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)  # shown in every format

    def counts(self) -> dict[str, int]:
        """Entries per result status."""
        out: dict[str, int] = {}
        for row in self.standings:
            out[row.status] = out.get(row.status, 0) + 1
        return out


# -- reading -------------------------------------------------------------------------------


async def read_standings(conn: asyncpg.Connection, event_id: int) -> tuple[Standing, ...]:
    """The leaderboard of the event's stage, ranked rows first."""
    rows = await conn.fetch(STANDINGS_SQL, event_id)
    return tuple(
        Standing(
            rank=r["rank"],
            number=r["number"],
            name=r["name"] or "",
            klass=r["klass"] or "",
            status=r["status"],
            elapsed_ms=r["elapsed_ms"],
            penalty_ms=r["penalty_ms"],
            total_ms=r["total_ms"],
            gap_ms=r["gap_ms"],
        )
        for r in rows
    )


async def read_alerts(
    conn: asyncpg.Connection, event_id: int, limit: int
) -> tuple[int, tuple[Alert, ...]]:
    """The count of the event's anomalies and the newest ``limit`` of them."""
    total = await conn.fetchval("SELECT count(*) FROM anomalies WHERE event = $1", event_id)
    rows = await conn.fetch(ALERTS_SQL, event_id, limit)
    alerts = tuple(
        Alert(r["started_at"], r["ended_at"] is not None, r["kind"], r["severity"], r["number"])
        for r in rows
    )
    return int(total), alerts


def parse_metrics(text: str) -> Pipeline:
    """The demo's pipeline figures from a Prometheus text exposition (labels summed)."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return Pipeline(
        read=sums.get("processor_entries_read_total", 0.0),
        stored=sums.get("processor_records_written_total", 0.0),
        duplicates=sums.get("processor_duplicates_total", 0.0),
        dead_letters=sums.get("processor_dead_letters_total", 0.0),
        lag_s=sums.get("processor_last_lag_seconds", 0.0),
        stream_lag=sums.get("processor_stream_lag_entries", 0.0),
    )


async def scrape_pipeline(client: httpx.AsyncClient, url: str) -> Pipeline | None:
    """Scrape the processor's /metrics; None while it does not answer."""
    try:
        response = await client.get(url, timeout=2.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text)


# -- formatting ----------------------------------------------------------------------------


def clock(ms: int | None) -> str:
    """A duration as ``M:SS.s`` (``H:MM:SS.s`` from an hour); ``-`` when unknown."""
    if ms is None:
        return "-"
    tenths = round(ms / 100)
    seconds, tenth = divmod(tenths, 10)
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    if hours:
        return f"{hours}:{minute:02d}:{second:02d}.{tenth}"
    return f"{minute}:{second:02d}.{tenth}"


def gap(ms: int | None) -> str:
    """A gap to the leader: ``+M:SS.s``; blank for the leader."""
    return "" if not ms else "+" + clock(ms)


def penalties(ms: int | None) -> str:
    return "" if not ms else clock(ms)


def _row(s: Standing) -> tuple[str, ...]:
    return (
        "" if s.rank is None else str(s.rank),
        str(s.number),
        s.name,
        s.klass,
        s.status,
        clock(s.elapsed_ms),
        penalties(s.penalty_ms),
        clock(s.total_ms) if s.status == "finished" else "-",
        gap(s.gap_ms) if s.status == "finished" else "",
    )


COLUMNS = ("rank", "no", "name", "class", "status", "elapsed", "penalties", "total", "gap")


def leaderboard_table(
    standings: Sequence[Standing], title: str = "Leaderboard", limit: int | None = None
) -> Table:
    """The leaderboard as a rich table (first ``limit`` rows, all when None)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for name in COLUMNS:
        right = name in ("rank", "no", "elapsed", "penalties", "total", "gap")
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    shown = standings if limit is None else standings[:limit]
    for row in shown:
        style = STATUS_STYLE.get(row.status, "")
        table.add_row(*_row(row), style=style)
    if limit is not None and len(standings) > limit:
        table.caption = f"… {len(standings) - limit} more"
    return table


def alerts_table(alerts: Sequence[Alert], total: int) -> Table:
    """The newest alerts (race time, entry, kind, severity, open or closed)."""
    table = Table(title=f"Alerts ({total})", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("race time", "no", "kind", "severity", ""):
        table.add_column(name, no_wrap=True)
    for a in alerts:
        table.add_row(
            a.started_at.strftime("%H:%M:%S"),
            "" if a.number is None else str(a.number),
            a.kind,
            Text(a.severity, style=SEVERITY_STYLE.get(a.severity, "")),
            "closed" if a.ended else "open",
        )
    return table


def pipeline_table(p: Pipeline | None) -> Table:
    """Pipeline figures from /metrics."""
    table = Table(title="Pipeline", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    if p is None:
        table.add_row("metrics", "waiting")
        return table
    table.add_row("entries read", f"{p.read:,.0f}")
    table.add_row("records stored", f"{p.stored:,.0f}")
    table.add_row("duplicates", f"{p.duplicates:,.0f}")
    table.add_row("dead letters", f"{p.dead_letters:,.0f}")
    table.add_row("stream lag", f"{p.stream_lag:,.0f} entries")
    table.add_row("commit lag", _lag(p))
    return table


def _lag(p: Pipeline) -> str:
    """Commit minus ingestion time; faster than real time, ingestion time is ahead: n/a."""
    return f"{p.lag_s:.2f} s" if p.lag_s > 0 else "n/a"


def counts_text(snapshot: Snapshot) -> str:
    """``finished 12 · running 5 · …`` in race order."""
    counts = snapshot.counts()
    order = ("finished", "running", "not_started", "dnf")
    parts = [f"{name} {counts[name]}" for name in order if counts.get(name)]
    parts += [f"{k} {v}" for k, v in sorted(counts.items()) if k not in order]
    return " · ".join(parts) or "no entries"


def live_view(snapshot: Snapshot, rows: int) -> RenderableType:
    """The terminal view: header, leaderboard (``rows`` rows), then alerts beside pipeline."""
    side = Table.grid(padding=(0, 4))
    side.add_row(
        alerts_table(snapshot.alerts, snapshot.alerts_total), pipeline_table(snapshot.pipeline)
    )
    header = Text(snapshot.header, style="bold")
    header.append("\n" + counts_text(snapshot), style="")
    for note in snapshot.notes:
        header.append("\n" + note, style="dim")
    for warning in snapshot.warnings:
        header.append("\n" + warning, style="bold red")
    return Group(
        Panel(header, box=box.ROUNDED),
        leaderboard_table(snapshot.standings, limit=rows),
        side,
    )


def plain_snapshot(snapshot: Snapshot, top: int = 5) -> str:
    """A few lines of text for a non-terminal output: progress, leaders, pipeline, alerts."""
    lines = [snapshot.header, "  " + counts_text(snapshot)]
    leaders = [s for s in snapshot.standings if s.rank is not None][:top]
    for s in leaders:
        lines.append(
            f"  {s.rank:>3}. #{s.number} {s.name} ({s.klass}) {clock(s.total_ms)} {gap(s.gap_ms)}"
        )
    p = snapshot.pipeline
    if p is not None:
        lines.append(
            f"  pipeline: read {p.read:,.0f}, stored {p.stored:,.0f}, duplicates"
            f" {p.duplicates:,.0f}, dead letters {p.dead_letters:,.0f},"
            f" stream lag {p.stream_lag:,.0f}, commit lag {_lag(p)}"
        )
    if snapshot.alerts:
        newest = snapshot.alerts[0]
        number = "" if newest.number is None else f" #{newest.number}"
        lines.append(
            f"  alerts: {snapshot.alerts_total}, newest {newest.kind}{number} ({newest.severity})"
        )
    lines += [f"  warning: {warning}" for warning in snapshot.warnings]
    return "\n".join(lines)
