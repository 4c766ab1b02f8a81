"""``processor export``: run the analytics exporter, or ``processor export verify DIR``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from prometheus_client import start_http_server

from processor.cli import settings_or_exit
from processor.core.gc_tuning import tune_for_throughput
from processor.logs import configure_logging
from processor.tools.export import ExportError, run_export
from processor.tools.export_files import DatasetError
from processor.tools.export_verify import verify_dataset

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group(invoke_without_command=True)
@click.option("--out", type=_DIR, help="Dataset directory (created if missing).")
@click.option("--burst", is_flag=True, help="Drain the stream, flush and exit.")
@click.option("--group", default=None, help="Consumer group [PROCESSOR_EXPORT_GROUP].")
@click.option(
    "--consumer",
    default=None,
    help="Consumer name [PROCESSOR_CONSUMER; default: the name kept in the dataset].",
)
@click.option("--max-rows", type=int, default=None, help="[PROCESSOR_EXPORT_MAX_ROWS]")
@click.option("--max-age", type=float, default=None, help="Seconds [PROCESSOR_EXPORT_MAX_AGE_S]")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Processes reading and decoding new entries [PROCESSOR_EXPORT_WORKERS].",
)
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics here.")
@click.pass_context
def export(
    ctx: click.Context,
    out: Path | None,
    burst: bool,
    group: str | None,
    consumer: str | None,
    max_rows: int | None,
    max_age: float | None,
    workers: int | None,
    metrics_port: int | None,
) -> None:
    """Export the record stream to Parquet through the analytics consumer group."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise click.UsageError("--out DIR is required (or use `processor export verify DIR`)")
    settings = settings_or_exit(
        export_group=group,
        export_max_rows=max_rows,
        export_max_age_s=max_age,
        export_workers=workers,
    )
    configure_logging(settings.log_format, settings.log_level)
    if metrics_port is not None:
        start_http_server(metrics_port, addr=settings.http_host)
    tune_for_throughput()
    try:
        stats = asyncio.run(run_export(settings, out, burst=burst, consumer=consumer))
    except (ExportError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from exc
    if burst:
        click.echo(f"exported {stats.rows} rows in {stats.files} files, {stats.rejected} rejected")


@export.command("verify")
@click.argument("directory", type=_DIR)
@click.option("--allow-resends", is_flag=True, help="Accept device resends (distinct entries).")
def verify(directory: Path, allow_resends: bool) -> None:
    """Count rows, duplicates by (device_id, ts) and files; exit 1 unless clean."""
    report = verify_dataset(directory)
    for line in report.lines(allow_resends=allow_resends):
        click.echo(line)
    if not report.clean(allow_resends=allow_resends):
        raise SystemExit(1)
