"""``processor events``: list, retry and dispatch the domain events of the outbox."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import click
import orjson
from prometheus_client import start_http_server
from rich.console import Console
from rich.table import Table

from processor.adapters import outbox
from processor.adapters.dispatcher import (
    Dispatcher,
    OutboxMissingError,
    RouteError,
    make_http_client,
)
from processor.cli import settings_or_exit
from processor.logs import configure_logging, get_logger
from processor.settings import Settings

T = TypeVar("T")

log = get_logger("events")


def _settings() -> Settings:
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _with_connection(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` on one database connection; failures become one-line CLI errors."""

    async def main() -> T:
        conn = await asyncpg.connect(settings.database_dsn())
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(main())
    except asyncpg.UndefinedTableError as exc:
        raise click.ClickException("no outbox table: run `processor schema migrate`") from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(f"database error: {exc}") from exc


@click.group()
def events() -> None:
    """List, retry or dispatch domain events (outbox → Directus Flow webhooks)."""


@events.command("list")
@click.option("--status", type=click.Choice(outbox.STATUSES), help="Only this status.")
@click.option("--type", "event_type", help="Exact type, or a prefix such as 'anomaly.'.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(status: str | None, event_type: str | None, limit: int, as_json: bool) -> None:
    """Show the newest outbox events, newest first."""
    settings = _settings()
    rows = _with_connection(
        settings,
        lambda conn: outbox.list_events(conn, status=status, event_type=event_type, limit=limit),
    )
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(outbox.to_plain(row)).decode())
    else:
        _print_table(rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    """A readable table; event ids and every column are in ``--json``."""
    table = Table()
    for column in ("id", "type", "entry_key", "status", "attempts"):
        table.add_column(column, no_wrap=True)
    table.add_column("occurred_at")
    table.add_column("last_error", overflow="fold")
    for row in rows:
        plain = outbox.to_plain(row)
        cells = [
            plain["id"],
            plain["type"],
            plain["entry_key"],
            plain["status"],
            plain["attempts"],
            plain["occurred_at"],
            plain["last_error"] or "",
        ]
        table.add_row(*(str(c) for c in cells))
    Console().print(table)


@events.command("retry")
@click.option("--id", "ids", multiple=True, help="Outbox id or event_id (repeatable).")
@click.option("--dead", is_flag=True, help="Every dead event.")
def retry(ids: tuple[str, ...], dead: bool) -> None:
    """Make events pending again (attempts from zero) so the dispatcher posts them."""
    if not ids and not dead:
        raise click.UsageError("give --id ... or --dead")
    numbers, event_ids = _parse_ids(ids)
    settings = _settings()
    count = _with_connection(
        settings,
        lambda conn: outbox.retry_events(conn, ids=numbers, event_ids=event_ids, dead=dead),
    )
    click.echo(f"{count} event(s) pending again")


def _parse_ids(values: tuple[str, ...]) -> tuple[list[int], list[uuid.UUID]]:
    numbers: list[int] = []
    event_ids: list[uuid.UUID] = []
    for value in values:
        if value.isdigit():
            numbers.append(int(value))
            continue
        try:
            event_ids.append(uuid.UUID(value))
        except ValueError as exc:
            raise click.BadParameter(f"{value!r} is neither an id nor an event_id") from exc
    return numbers, event_ids


@events.command("dispatch")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Seconds between polls when idle.",
)
def dispatch(once: bool, concurrency: int, poll_interval: float) -> None:
    """Post outbox events to their webhooks (alone, without ``processor run``)."""
    settings = _settings()
    if not settings.webhook_routes:
        raise click.ClickException("no webhook routes: set PROCESSOR_WEBHOOK_ROUTES")
    try:
        asyncio.run(_dispatch(settings, once, concurrency, poll_interval))
    except (RouteError, OutboxMissingError) as exc:
        raise click.ClickException(str(exc)) from exc


async def _dispatch(settings: Settings, once: bool, concurrency: int, poll: float) -> None:
    if settings.http_port:
        _serve_metrics(settings)
    stop = asyncio.Event()
    _install_signals(stop)
    pool = await asyncpg.create_pool(
        settings.database_dsn(),
        min_size=1,
        max_size=max(2, min(concurrency, 8)),
        command_timeout=settings.db_command_timeout_s,
    )
    try:
        async with make_http_client(settings, concurrency) as http:
            dispatcher = Dispatcher(
                pool, settings, http, concurrency=concurrency, poll_interval_s=poll
            )
            if once:
                claimed = await dispatcher.drain()
                log.info("dispatch done", claimed=claimed)
            else:
                log.info("dispatching", routes=sorted(settings.webhook_routes))
                await dispatcher.run(stop)
    finally:
        await pool.close()


def _serve_metrics(settings: Settings) -> None:
    start_http_server(settings.http_port, addr=settings.http_host)


def _install_signals(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: finish the round in flight and exit. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        log.info("stopping: finishing deliveries in flight")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
