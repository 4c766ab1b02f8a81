"""The ``processor`` command: one entry point for the service and every tool.

Subcommands live beside the code they drive and are imported only when invoked, so
``processor --help`` is fast and a tool's dependencies never load for another.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

import click

from processor import __version__

if TYPE_CHECKING:
    from processor.settings import Settings

# name -> "module:attribute" of a click command or group.
COMMANDS: dict[str, str] = {
    "run": "processor.service:run_command",
    "schema": "processor.adapters.schema_cli:schema",
    "course": "processor.adapters.course_cli:course",
    "devices": "processor.adapters.course_cli:devices",
    "simulate": "processor.tools.simulate_cli:simulate",
    "replay": "processor.tools.replay_cli:replay",
    "gateway": "processor.gateway.cli:gateway",
    "export": "processor.tools.export_cli:export",
    "events": "processor.adapters.events_cli:events",
    "backfill": "processor.tools.backfill_cli:backfill",
    "demo": "processor.tools.demo:demo",
}

HELP: dict[str, str] = {
    "run": "Run the processor service (pipeline, domain, emitters).",
    "schema": "Migrate owned tables, check or bootstrap the Directus tables.",
    "course": "Import or export an event's course file.",
    "devices": "Import devices from CSV.",
    "simulate": "Simulate a race into the stream or a file.",
    "replay": "Recompute race results from a file or the database.",
    "gateway": "Serve live leaderboards over WebSocket and the live page.",
    "export": "Export the stream to Parquet (analytics consumer group).",
    "events": "List, retry or dispatch domain events (webhooks).",
    "backfill": "Recompute derived attributes for a time range.",
    "demo": "Run a simulated race processed live, with a terminal view.",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if _available(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        command: click.Command = getattr(module, attribute)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(name: str) -> bool:
    module_name = COMMANDS[name].split(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # its parent package does not exist (yet)
        return False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="processor")
def cli() -> None:
    """Race telemetry processor: stream → positions, timing, results, alerts, live."""


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings from the environment plus CLI overrides; on error, the message and exit 2.

    Every command calls this first, so an invalid configuration stops it with the
    variables named on stderr (no traceback), exit status 2 as for a usage error.
    """
    # Imported here, not at the top: pydantic would slow down `processor --help`.
    from processor.settings import SettingsError, load_settings

    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        click.echo(f"processor: {exc}", err=True)
        sys.exit(2)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point."""
    return cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="processor")
