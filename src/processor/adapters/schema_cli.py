"""``processor schema``: migrate the processor's tables, bootstrap or check the Directus ones.

Exit codes: 0 fine, 1 the check found problems (or the database failed), 2 bad input
(a settings variable, a missing or malformed snapshot file). Messages, never tracebacks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import asyncpg
import click

from processor.adapters.directus_schema import (
    NATURAL_KEYS_PATH,
    SNAPSHOT_PATH,
    DirectusSchema,
    SchemaFileError,
    bootstrap_statements,
    check_schema,
    load_schema,
)
from processor.cli import settings_or_exit
from processor.settings import Settings

T = TypeVar("T")

EXIT_PROBLEMS = 1
EXIT_INPUT = 2


def fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    """Print ``Error: message`` to stderr and exit with ``code`` (no traceback)."""
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(code)


def run_with_connection(
    settings: Settings, action: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """Connect to PostgreSQL, run ``action`` and close; database failures exit 1."""

    async def main() -> T:
        conn = await asyncpg.connect(settings.database_dsn(), timeout=10)
        try:
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(main())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        fail(f"database: {type(exc).__name__}: {exc}", EXIT_PROBLEMS)


def schema_or_exit(snapshot: Path, natural_keys: Path) -> DirectusSchema:
    """The Directus schema from its files, or exit 2 naming the file."""
    try:
        return load_schema(snapshot, natural_keys)
    except SchemaFileError as exc:
        fail(str(exc))


_snapshot_option = click.option(
    "--snapshot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=SNAPSHOT_PATH,
    show_default=True,
    help="Directus schema snapshot (YAML).",
)
_keys_option = click.option(
    "--natural-keys",
    type=click.Path(path_type=Path, dir_okay=False),
    default=NATURAL_KEYS_PATH,
    show_default=True,
    help="Composite unique keys the snapshot cannot carry.",
)


@click.group()
def schema() -> None:
    """Migrate owned tables, check or bootstrap the Directus tables."""


@schema.command()
def migrate() -> None:
    """Apply the processor's own migrations (positions, position_attributes, processor.*)."""
    from processor.adapters.migrations import migrate as apply_migrations

    settings = settings_or_exit()
    applied = run_with_connection(settings, lambda conn: apply_migrations(conn, settings))
    for name in applied:
        click.echo(f"applied {name}")
    click.echo(f"{len(applied)} migration(s) applied" if applied else "already up to date")


@schema.command()
@_snapshot_option
@_keys_option
@click.option("--print", "print_only", is_flag=True, help="Print the SQL instead of running it.")
@click.option(
    "--seed/--no-seed",
    default=True,
    show_default=True,
    help="Also add the FMB920 and FMC130 IO mappings where missing.",
)
def bootstrap(snapshot: Path, natural_keys: Path, print_only: bool, seed: bool) -> None:
    """Create the Directus tables from the snapshot where they are missing (dev, tests, demo).

    Existing tables are left alone; the natural-key unique indexes are always ensured, so
    this also completes a database where Directus applied the snapshot.
    """
    from processor.adapters.directus_schema import bootstrap as create
    from processor.adapters.reference import ReferenceFileError, read_io_csv, seed_io_mappings

    directus = schema_or_exit(snapshot, natural_keys)
    if print_only:
        for statement in bootstrap_statements(directus):
            click.echo(f"{statement};")
        return
    try:
        elements = read_io_csv() if seed else []
    except ReferenceFileError as exc:
        fail(str(exc))

    async def run(conn: asyncpg.Connection) -> tuple[list[str], int]:
        created = await create(conn, directus)
        return created, (await seed_io_mappings(conn, elements) if seed else 0)

    created, seeded = run_with_connection(settings_or_exit(), run)
    click.echo(f"created {', '.join(created)}" if created else "all Directus tables exist")
    click.echo("natural-key unique indexes ensured")
    if seed:
        click.echo(f"{seeded} IO mapping rows added")


@schema.command()
@_snapshot_option
@_keys_option
def check(snapshot: Path, natural_keys: Path) -> None:
    """Verify every Directus table, column and key the processor uses; exit 1 if any lacks."""
    directus = schema_or_exit(snapshot, natural_keys)
    problems = run_with_connection(settings_or_exit(), lambda conn: check_schema(conn, directus))
    for problem in problems:
        click.echo(problem)
    if problems:
        raise SystemExit(EXIT_PROBLEMS)
    click.echo(f"ok: {len(directus.tables)} Directus tables match the snapshot")
