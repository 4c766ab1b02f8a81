"""``processor backfill``: recompute derived data from stored positions."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from processor.adapters.mappings import MappingCache
from processor.cli import settings_or_exit
from processor.logs import configure_logging
from processor.settings import Settings
from processor.tools.backfill import DEFAULT_CHUNK, Backfill, BackfillError, BackfillSpec, Summary


def parse_time(value: str) -> dt.datetime:
    """ISO 8601 (``Z`` or an offset; no offset means UTC) or milliseconds since the epoch."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        return dt.datetime.fromtimestamp(int(text) / 1000, tz=dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither ISO 8601 nor milliseconds") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class TimeParam(click.ParamType[dt.datetime]):
    name = "TIME"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.datetime:
        return value if isinstance(value, dt.datetime) else parse_time(str(value))


@click.group()
def backfill() -> None:
    """Recompute derived data (attributes) from stored positions."""


@backfill.command("attributes")
@click.option("--from", "start", type=TimeParam(), required=True, help="Start, inclusive.")
@click.option("--to", "end", type=TimeParam(), required=True, help="End, exclusive.")
@click.option("--model", help="Only devices of this model (e.g. FMB920).")
@click.option("--device", "devices", multiple=True, help="Only this IMEI (repeatable).")
@click.option("--dry-run", is_flag=True, help="Count the rows that would change; write nothing.")
@click.option("--chunk", type=click.IntRange(min=1), default=DEFAULT_CHUNK, show_default=True)
@click.option("--restart", is_flag=True, help="Ignore an unfinished earlier run; start over.")
def attributes(
    start: dt.datetime,
    end: dt.datetime,
    model: str | None,
    devices: tuple[str, ...],
    dry_run: bool,
    chunk: int,
    restart: bool,
) -> None:
    """Recompute position_attributes with the current IO mappings (never touches positions).

    An interrupted run resumes where it stopped when the same command is run again.
    """
    if model and devices:
        raise click.UsageError("give --model or --device, not both")
    bad = [d for d in devices if not d.isdigit()]
    if bad:
        raise click.BadParameter(f"not an IMEI: {', '.join(bad)}", param_hint="--device")
    spec = BackfillSpec(start, end, tuple(int(d) for d in devices), model)
    settings = _settings()
    try:
        summary = asyncio.run(_run(settings, spec, chunk, dry_run, restart))
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume", err=True)
        raise SystemExit(130) from None
    except BackfillError as exc:
        raise click.ClickException(str(exc)) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(f"database error: {exc}") from exc
    _print_summary(summary)


def _settings() -> Settings:
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    return settings


async def _run(
    settings: Settings, spec: BackfillSpec, chunk: int, dry_run: bool, restart: bool
) -> Summary:
    conn = await asyncpg.connect(settings.database_dsn())
    writer = await asyncpg.connect(settings.database_dsn())
    try:
        job = Backfill(
            conn, spec, MappingCache.from_settings(settings), chunk, dry_run, restart, writer
        )
        todo = await job.prepare()
        columns = (TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task("rows", total=todo)
            return await job.run(lambda n: bar.advance(task, n))
    finally:
        await writer.close()
        await conn.close()


def _print_summary(summary: Summary) -> None:
    verb = "would change" if summary.dry_run else "changed"
    lines = [
        f"positions read: {summary.rows_seen:,} in {summary.chunks:,} chunk(s)",
        f"attribute rows {verb}: {summary.rows_changed:,}",
        f"time: {summary.seconds:.1f} s ({summary.rate:,.0f} positions/s in this session)",
    ]
    if summary.selected_devices is not None:
        lines.insert(0, f"devices selected: {summary.selected_devices:,}")
    if summary.resumed_from is not None:
        device, ts = summary.resumed_from
        lines.insert(0, f"resumed after device {device} at {ts.isoformat()}")
    click.echo("\n".join(lines))
