"""``processor course import|export`` and ``processor devices import|seed-mappings``.

Bad input (a missing file, invalid JSON, a bad CSV row) prints one message naming the
file and line and exits 2; database failures exit 1. Never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from processor.adapters.reference import (
    IO_CSV,
    EventNotFoundError,
    ReferenceFileError,
    export_course,
    import_course,
    import_devices,
    read_course,
    read_devices_csv,
    read_io_csv,
    seed_io_mappings,
)
from processor.adapters.schema_cli import fail, run_with_connection
from processor.cli import settings_or_exit

_file = click.argument("file", type=click.Path(path_type=Path, dir_okay=False))


@click.group()
def course() -> None:
    """Import or export an event's course file."""


@course.command("import")
@_file
def import_(file: Path) -> None:
    """Upsert the event, stages, geofences, entries and start times of a course file."""
    try:
        parsed = read_course(file)
    except ReferenceFileError as exc:
        fail(str(exc))
    summary = run_with_connection(settings_or_exit(), lambda conn: import_course(conn, parsed))
    click.echo(
        f"event {summary.event_id}: {summary.stages} stages, {summary.geofences} geofences,"
        f" {summary.entries} entries ({summary.devices_created} new devices),"
        f" {summary.start_times} start times"
    )


@course.command()
@click.option("--event", "event_id", type=int, required=True, help="Event id.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write here instead of standard output.",
)
def export(event_id: int, output: Path | None) -> None:
    """Write one event's course file (same shape as import, with ids)."""
    from processor.adapters.reference import dump_course

    try:
        data = run_with_connection(settings_or_exit(), lambda conn: export_course(conn, event_id))
    except EventNotFoundError as exc:
        fail(str(exc))
    blob = dump_course(data)
    if output is None:
        sys.stdout.buffer.write(blob)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(blob)
    except OSError as exc:
        fail(f"{output}: cannot write: {exc.strerror}")


@click.group()
def devices() -> None:
    """Import devices from CSV; seed the IO mappings of the supported models."""


@devices.command("import")
@_file
def import_devices_command(file: Path) -> None:
    """Upsert devices from a CSV with the header imei,model,label."""
    try:
        rows = read_devices_csv(file)
        count = run_with_connection(
            settings_or_exit(), lambda conn: import_devices(conn, rows, file)
        )
    except ReferenceFileError as exc:
        fail(str(exc))
    click.echo(f"{count} devices imported")


@devices.command("seed-mappings")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=IO_CSV,
    show_default=True,
    help="IO element table (io_id,name,bytes,signed,multiplier,unit,values).",
)
def seed_mappings(csv_path: Path) -> None:
    """Add the FMB920 and FMC130 models and their IO mapping rows where missing."""
    try:
        elements = read_io_csv(csv_path)
    except ReferenceFileError as exc:
        fail(str(exc))
    added = run_with_connection(settings_or_exit(), lambda conn: seed_io_mappings(conn, elements))
    click.echo(f"{added} IO mapping rows added")
