"""``processor replay``: recompute race results from files or from the database.

File mode needs no service: ``--course course.json --positions positions.csv``. The
database mode (``--event`` with ``--stage/--entry/--from/--to/--write/--course``) is
:mod:`processor.adapters.replay_db`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Final

import click
import orjson

from processor.domain.engine import evaluate
from processor.domain.model import Course, CourseError, Position
from processor.domain.output import to_json, to_table
from processor.domain.positions_csv import PositionsError, parse_positions
from processor.domain.rows import DomainResult
from processor.domain.timeutil import TimeFormatError, parse_time_ms

BAD_INPUT: Final = 2


class ReplayInputError(click.ClickException):
    """Bad input: printed as one line naming what and where, exit code 2."""

    exit_code = BAD_INPUT


def load_course(path: Path) -> Course:
    """Read and validate a course file."""
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ReplayInputError(f"{path}: cannot read course file: {exc.strerror}") from exc
    except orjson.JSONDecodeError as exc:
        raise ReplayInputError(f"{path}: not JSON: {exc}") from exc
    try:
        return Course.from_dict(data)
    except CourseError as exc:
        raise ReplayInputError(f"{path}: {exc}") from exc


def load_positions(path: Path) -> list[Position]:
    """Read and parse a positions CSV file."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return parse_positions(handle)
    except OSError as exc:
        raise ReplayInputError(f"{path}: cannot read positions file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ReplayInputError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except PositionsError as exc:
        raise ReplayInputError(f"{path}: {exc}") from exc


def render(result: DomainResult, output_format: str) -> bytes:
    """The result in the requested format."""
    if output_format == "json":
        return to_json(result)
    return to_table(result).encode("utf-8")


def _time_option(_ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_time_ms(value)
    except TimeFormatError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


@click.command("replay")
@click.option(
    "--course",
    "course_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Course file (JSON). Alone with --positions: offline replay; with "
    "--event: another geofence layout to test against the stored positions.",
)
@click.option(
    "--positions",
    "positions_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="positions.csv to replay (offline, no database).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["json", "table"]),
    default="json",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--now",
    "now_ms",
    callback=_time_option,
    metavar="TIME",
    help="Evaluate as of this time (ms or ISO 8601): closes stages whose closes_at "
    "has passed. Default: from the data alone.",
)
@click.option(
    "--output",
    "-o",
    "output_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to this file instead of standard output.",
)
@click.option("--event", "event_id", help="Database replay: the event id.")
@click.option("--stage", "stage_id", help="Database replay: only this stage id.")
@click.option("--entry", "entry_number", type=int, help="Database replay: only this entry number.")
@click.option(
    "--from",
    "from_ms",
    callback=_time_option,
    metavar="TIME",
    help="Database replay: positions from this time.",
)
@click.option(
    "--to",
    "to_ms",
    callback=_time_option,
    metavar="TIME",
    help="Database replay: positions up to this time.",
)
@click.option(
    "--write", is_flag=True, help="Database replay: store the recomputed rows (source = replay)."
)
def replay(**options: Any) -> None:
    """Recompute timing, penalties, results and anomalies from a course and positions."""
    if options["event_id"] is not None:
        sys.exit(_database_replay(options))
    database_only = [flag for flag, name in _DATABASE_FLAGS if options[name] not in (None, False)]
    if database_only:
        flag = database_only[0]
        raise ReplayInputError(f"{flag} needs --event (database replay)")
    if options["course_path"] is None or options["positions_path"] is None:
        raise ReplayInputError("offline replay needs both --course and --positions")
    course = load_course(options["course_path"])
    positions = load_positions(options["positions_path"])
    data = render(evaluate(course, positions, options["now_ms"]), options["output_format"])
    emit(data, options["output_path"])


_DATABASE_FLAGS: Final = (
    ("--stage", "stage_id"),
    ("--entry", "entry_number"),
    ("--from", "from_ms"),
    ("--to", "to_ms"),
    ("--write", "write"),
)


def emit(data: bytes, path: Path | None) -> None:
    """Write the output to ``path``, or to stdout when it is None."""
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ReplayInputError(f"{path}: cannot write: {exc.strerror}") from exc


def _database_replay(options: dict[str, Any]) -> int:
    """The database replay (stored positions, stored or swapped course)."""
    # Imported here: the file mode must not need asyncpg or a database.
    from processor.adapters.replay_db import replay_from_database

    return replay_from_database(options)
