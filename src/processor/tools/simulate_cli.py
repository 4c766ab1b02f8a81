"""``processor simulate``: a simulated race into the Redis Stream or a file.

The command only parses flags, opens the outputs and drives
:class:`processor.tools.simulate.Simulation`; everything simulated happens there. See
docs/simulator.md for the flags, the faults and examples.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import click
import orjson
import redis

from processor.tools.sim_course import CourseError, load_course, parse_iso_ms
from processor.tools.simulate import (
    FaultRates,
    FileSink,
    PositionsCsvSink,
    RedisSink,
    SimConfig,
    Simulation,
    SimulationError,
    Sink,
    Summary,
    run,
    write_course,
    write_devices,
)

_RATE_FLAGS = {
    "duplicate": "share of deliveries resent (same imei and ts)",
    "no_fix": "share of records without a GNSS fix (runs of 3-12; 1 run in 10 after a reboot)",
    "gap": "coverage gaps per vehicle-minute on the stage (uploaded later, newest first)",
    "spike": "share of vehicles with one GPS spike of 3-8 km",
    "bad_clock": "share of vehicles whose clock jumps to 2004 or decades ahead for 30-120 s",
    "sos": "share of vehicles that stop and press SOS (priority 2)",
    "crash": "share of vehicles that crash (IO 247 = 1) and stay put",
    "stopped": "share of vehicles stopped 4-8 min on the stage",
    "low_battery": "share of vehicles losing external power (IO 113 falls below 20)",
    "speeding": "share of vehicles 25-50 km/h over the limit in the speed zones",
    "missed_waypoint": "share of vehicles detouring around one waypoint",
    "dnf": "share of vehicles retiring on the stage",
}


def _rate_options(command: Any) -> Any:
    """Add one ``--<fault>-rate`` option per fault, defaulting to :class:`FaultRates`."""
    defaults = FaultRates()
    for name, text in reversed(_RATE_FLAGS.items()):
        flag = f"--{name.replace('_', '-')}-rate"
        default = getattr(defaults, name)
        command = click.option(
            flag,
            name + "_rate",
            type=click.FloatRange(0.0, 1.0),
            default=default,
            show_default=True,
            help=text[0].upper() + text[1:] + ".",
        )(command)
    return command


@click.command("simulate")
@click.option(
    "--vehicles",
    type=click.IntRange(1, 10_000),
    help="Field size [default: 50; with --course, all its entries].",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--start",
    "start",
    metavar="ISO",
    help="When the first tracker switches on (default: now, to the second).",
)
@click.option("--length-km", type=click.FloatRange(10, 40), default=20.0, show_default=True)
@click.option(
    "--start-interval",
    type=click.FloatRange(0.01, 3600),
    help="Seconds between starts [default: 30, closer for fields over 60].",
)
@click.option(
    "--course",
    "course_in",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Drive this course file instead of generating one (its entries are the field).",
)
@click.option(
    "--rate",
    type=click.Choice(["realtime", "max"]),
    help="Pace by --speed, or as fast as possible [default: max with --out, else realtime].",
)
@click.option(
    "--speed", type=click.FloatRange(min=0.01), default=1.0, show_default=True, help="x real time."
)
@click.option("--duration", type=click.FloatRange(min=1), help="Stop after this many sim seconds.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write entries to this JSON-lines file instead of Redis.",
)
@click.option(
    "--positions-csv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write positions.csv.",
)
@click.option("--course-out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--devices-out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--prepare-only", is_flag=True, help="Write --course-out/--devices-out, send nothing."
)
@click.option("--redis-url", metavar="URL", help="Overrides PROCESSOR_REDIS_URL.")
@click.option("--stream", metavar="KEY", help="Overrides PROCESSOR_STREAM.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=1_000, show_default=True)
@click.option("--maxlen", type=click.IntRange(min=1), help="Trim the stream to about this length.")
@click.option("--no-faults", is_flag=True, help="Set every fault rate to 0.")
@click.option("--summary", "summary_format", type=click.Choice(["text", "json"]), default="text")
@_rate_options
def simulate(**options: Any) -> None:
    """Simulate a race of N vehicles and send its records as stream contract v1 entries."""
    sim = _build(options)
    if options["course_out"] is not None:
        write_course(sim.course, options["course_out"])
    if options["devices_out"] is not None:
        write_devices(sim.course, options["devices_out"])
    if options["prepare_only"]:
        return
    summary = _drive(sim, options)
    _print_summary(summary, options["summary_format"])


def _build(options: dict[str, Any]) -> Simulation:
    """The simulation the flags describe; usage errors name the flag."""
    rates = (
        FaultRates(**{name: 0.0 for name in _RATE_FLAGS})
        if options["no_faults"]
        else FaultRates(**{name: options[name + "_rate"] for name in _RATE_FLAGS})
    )
    interval = options["start_interval"]
    config = SimConfig(
        start_ms=_start_ms(options["start"]),
        seed=options["seed"],
        vehicles=options["vehicles"] or 50,
        length_km=options["length_km"],
        start_interval_ms=round(interval * 1000) if interval is not None else None,
        rates=rates,
    )
    try:
        course = None
        if options["course_in"] is not None:
            data = orjson.loads(options["course_in"].read_bytes())
            course = load_course(
                data, start_interval_ms=config.interval_ms(), vehicles=options["vehicles"]
            )
        return Simulation(config, course)
    except (CourseError, orjson.JSONDecodeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--course") from exc
    except SimulationError as exc:
        raise click.UsageError(str(exc)) from exc


def _start_ms(text: str | None) -> int:
    if text is None:
        return int(datetime.now(tz=UTC).timestamp()) * 1000
    try:
        return parse_iso_ms(text)
    except CourseError as exc:
        raise click.BadParameter(str(exc), param_hint="--start") from exc


def _drive(sim: Simulation, options: dict[str, Any]) -> Summary:
    """Open the outputs, run the simulation into them, close them; Ctrl-C stops cleanly."""
    rate = options["rate"] or ("max" if options["out"] is not None else "realtime")
    speed = None if rate == "max" else float(options["speed"])
    until = None
    if options["duration"] is not None:
        until = sim.clock_ms + round(options["duration"] * 1000)
    began = time.monotonic()
    with ExitStack() as stack, _sigterm_as_interrupt():
        sinks = _open_sinks(stack, options)
        try:
            return run(sim, sinks, speed=speed, until_ms=until)
        except KeyboardInterrupt:
            click.echo("simulate: interrupted, stopping", err=True)
            return sim.summary(time.monotonic() - began)
        except redis.RedisError as exc:
            raise click.ClickException(f"writing to Redis failed: {exc}") from exc


def _open_sinks(stack: ExitStack, options: dict[str, Any]) -> list[Sink]:
    sinks: list[Sink] = []
    if options["out"] is not None:
        sinks.append(FileSink(stack.enter_context(options["out"].open("wb"))))
    else:
        sinks.append(_redis_sink(stack, options))
    if options["positions_csv"] is not None:
        out = stack.enter_context(options["positions_csv"].open("w", encoding="utf-8", newline=""))
        sinks.append(PositionsCsvSink(out))
    return sinks


def _redis_sink(stack: ExitStack, options: dict[str, Any]) -> RedisSink:
    """A sink on the configured stream; unreachable Redis is a clear error, not a traceback."""
    from processor.cli import settings_or_exit

    settings = settings_or_exit(redis_url=options["redis_url"], stream=options["stream"])
    client = redis.Redis.from_url(settings.redis_dsn())
    stack.callback(client.close)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis: {exc}") from exc
    return RedisSink(
        client, settings.stream, batch_size=options["batch_size"], maxlen=options["maxlen"]
    )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so a supervisor stopping us still gets flushed outputs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_summary(summary: Summary, fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(orjson.dumps(summary.as_dict()).decode() + "\n")
        return
    click.echo(
        f"records {summary.records:,}  entries sent {summary.entries:,}  "
        f"in {summary.seconds:,.1f} s  ({summary.rate:,.0f} entries/s)"
    )
    for name, count in sorted(summary.counts.items()):
        click.echo(f"  {name:<16} {count:>10,}")
