"""``processor demo``: a simulated race processed live, with a terminal view.

Sets everything up on the configured servers — a database of its own
(``processor_demo``, reset each time), Redis keys under ``demo:`` — then starts
``processor run``, ``processor gateway`` and ``processor simulate`` as subprocesses and
shows the stage leaderboard, the latest alerts and the pipeline figures until Ctrl-C,
SIGTERM or ``--duration``. See docs/demo.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import click
import httpx
from rich.console import Console
from rich.live import Live
from rich.text import Text

from processor.logs import configure_logging
from processor.settings import Settings
from processor.tools import demo_setup as setup
from processor.tools.demo_procs import Child, ChildError, free_port, port_open, stop_all
from processor.tools.demo_setup import Race, SetupError
from processor.tools.demo_view import (
    Snapshot,
    leaderboard_table,
    live_view,
    plain_snapshot,
    read_alerts,
    read_standings,
    scrape_pipeline,
)

WORKDIR = Path("var/demo")
REFRESH_S = 0.5
PLAIN_EVERY_S = 5.0
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
ALERTS_SHOWN = 8


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The flags of ``processor demo``."""

    duration: float | None
    vehicles: int
    speed: float
    length_km: float
    seed: int
    gateway: bool


@dataclass
class DemoRun:
    """What a running demo holds: its settings, race, children and where to look."""

    options: DemoOptions
    settings: Settings
    race: Race
    children: list[Child]
    event_id: int = 0
    stage_name: str = ""
    live_url: str | None = None
    race_began: float = 0.0  # monotonic time the simulator was started
    last: Snapshot = field(default_factory=Snapshot)  # the latest view, for the final figures

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}/metrics"

    def child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the race started: stop, not a failure."""


class Stopper:
    """The stop request: set by SIGINT/SIGTERM (the reason is kept for the message)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.request, signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def check(self) -> None:
        """Raise :class:`Interrupted` once a stop has been requested."""
        if self.event.is_set():
            raise Interrupted(self.reason)


@click.command("demo")
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    help="Stop by itself this many seconds after the race starts [default: until Ctrl-C].",
)
@click.option(
    "--vehicles", type=click.IntRange(1, 500), default=50, show_default=True, help="Field size."
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Simulated time runs this many times faster than real time.",
)
@click.option(
    "--length-km",
    type=click.FloatRange(10, 40),
    default=10.0,
    show_default=True,
    help="Stage length of the generated course.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="The simulator's seed.")
@click.option("--no-gateway", is_flag=True, help="Do not start the WebSocket gateway.")
def demo(
    duration: float | None,
    vehicles: int,
    speed: float,
    length_km: float,
    seed: int,
    no_gateway: bool,
) -> None:
    """Run a simulated race processed live, with a terminal view (Ctrl-C stops)."""
    from processor.cli import settings_or_exit

    options = DemoOptions(duration, vehicles, speed, length_km, seed, gateway=not no_gateway)
    base = settings_or_exit()
    # The set-up steps log at info (migrations applied); the view says what happens.
    configure_logging("console", "warning")
    sys.exit(asyncio.run(run_demo(options, base)))


async def run_demo(options: DemoOptions, base: Settings) -> int:
    """Set up, run the race and show it; the exit status (0: stopped as asked)."""
    console = _console()
    stopper = Stopper()
    stopper.install()
    demo: DemoRun | None = None
    failure = ""
    try:
        demo = await _set_up(options, base, console)
        stopper.check()
        await _start_children(demo, console, stopper)
        await _show(demo, console, stopper)
    except Interrupted:
        _say(console, f"{stopper.reason}: stopping")
    except (SetupError, ChildError) as exc:
        failure = str(exc)
    finally:  # whatever happened, no child outlives the demo
        _stop(demo, console)
    if not failure:
        failure = await _final(demo, console)
    if failure:
        # Text, not markup: a log tail has brackets ("[error    ]") rich would parse.
        message = Text.assemble(("demo failed: ", "bold red"), failure)
        Console(stderr=True, highlight=False).print(message)
        return 1
    return 0


def _console() -> Console:
    """A console; on a non-terminal, wide enough for the leaderboard without wrapping."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 120))
    return console


def _say(console: Console, message: str) -> None:
    console.print(f"demo: {message}", markup=False)


# -- set-up --------------------------------------------------------------------------------


async def _set_up(options: DemoOptions, base: Settings, console: Console) -> DemoRun:
    """Database, streams, course and devices, ready for the children."""
    settings = setup.demo_settings(base, http_port=free_port())
    start_ms = int(time.time()) * 1000
    race = Race(
        start_ms=start_ms,
        seed=options.seed,
        vehicles=options.vehicles,
        length_km=options.length_km,
        course_file=WORKDIR / "course.json",
        devices_file=WORKDIR / "devices.csv",
    )
    demo = DemoRun(options, settings, race, children=[])
    demo.stage_name = await asyncio.to_thread(setup.write_race_files, race)
    _say(console, f"database {setup.DEMO_DATABASE}: reset, migrate, Directus tables, course")
    await setup.reset_database(base.database_dsn())
    demo.event_id = await setup.prepare_database(settings, race)
    await asyncio.to_thread(setup.reset_streams, settings)
    _say(
        console,
        f"streams {settings.stream}, {settings.dead_letter_stream}, {settings.live_prefix}*: reset",
    )
    return demo


def _processor_argv(name: str, *args: str) -> list[str]:
    """The ``processor`` command of this same environment."""
    return [str(Path(sys.executable).with_name("processor")), name, *args]


def _simulate_argv(demo: DemoRun) -> list[str]:
    race = demo.race
    start = datetime.fromtimestamp(race.start_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _processor_argv(
        "simulate",
        "--seed", str(race.seed),
        "--vehicles", str(race.vehicles),
        "--length-km", str(race.length_km),
        "--start", start,
        "--speed", str(demo.options.speed),
        "--positions-csv", str(WORKDIR / "positions.csv"),
    )  # fmt: skip


def _gateway_available() -> bool:
    try:
        return importlib.util.find_spec("processor.gateway.cli") is not None
    except ModuleNotFoundError:
        return False


async def _start_children(demo: DemoRun, console: Console, stopper: Stopper) -> None:
    """Processor (until ready), gateway (until listening), then the simulator."""
    env = setup.child_environment(demo.settings, dict(os.environ))
    processor = Child("processor", _processor_argv("run"), WORKDIR / "processor.log")
    demo.children.append(processor)
    processor.start(env)
    _say(console, f"processor run: metrics at {demo.metrics_url}, log {processor.log_path}")
    await _wait_ready(processor, lambda: _ready(demo), stopper)
    if demo.options.gateway and _gateway_available():
        port = free_port()
        argv = _processor_argv("gateway", "--host", "127.0.0.1", "--port", str(port))
        gateway = Child("gateway", argv, WORKDIR / "gateway.log")
        demo.children.append(gateway)
        gateway.start(env)
        await _wait_ready(gateway, lambda: port_open(port), stopper)
        demo.live_url = f"http://127.0.0.1:{port}/"
        _say(console, f"live page: {demo.live_url}")
    simulator = Child("simulator", _simulate_argv(demo), WORKDIR / "simulate.log", may_exit=True)
    demo.children.append(simulator)
    simulator.start(env)
    demo.race_began = time.monotonic()
    _say(
        console,
        f"simulator: {demo.race.vehicles} vehicles, x{demo.options.speed:g},"
        f" log {simulator.log_path}",
    )


def _ready(demo: DemoRun) -> bool:
    """Whether the processor answers /readyz with 200."""
    url = f"http://127.0.0.1:{demo.settings.http_port}/readyz"
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def _wait_ready(child: Child, ready: Callable[[], bool], stopper: Stopper) -> None:
    """Wait until ``ready()`` is true; fail if the child exits or it takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not await asyncio.to_thread(ready):
        child.check()  # exited before it was ready: the error, with its log
        stopper.check()
        if time.monotonic() > deadline:
            raise ChildError(
                f"{child.name} not ready after {READY_TIMEOUT_S:.0f} s:\n{child.tail()}"
            )
        await asyncio.sleep(0.25)


# -- the race ------------------------------------------------------------------------------


async def _show(demo: DemoRun, console: Console, stopper: Stopper) -> None:
    """Refresh the view until a stop request, the duration or a failed child."""
    async with _reader(demo) as read:
        if console.is_terminal:
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while await _tick(demo, stopper):
                    snapshot = await read()
                    live.update(live_view(snapshot, rows=max(5, console.size.height - 26)))
        else:
            last = 0.0
            while await _tick(demo, stopper):
                if time.monotonic() - last >= PLAIN_EVERY_S:
                    last = time.monotonic()
                    console.print(plain_snapshot(await read()), markup=False)
    if stopper.event.is_set():
        _say(console, f"{stopper.reason}: stopping")
    else:
        _say(console, f"{demo.options.duration:g} s elapsed: stopping")


async def _tick(demo: DemoRun, stopper: Stopper) -> bool:
    """Wait one refresh; False when it is time to stop. Raises if a child failed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopper.event.wait(), timeout=REFRESH_S)
    for child in demo.children:
        child.check()
    if stopper.event.is_set():
        return False
    duration = demo.options.duration
    return duration is None or time.monotonic() - demo.race_began < duration


@contextlib.asynccontextmanager
async def _reader(demo: DemoRun) -> AsyncIterator[Callable[[], Awaitable[Snapshot]]]:
    """A snapshot reader on one database connection and one HTTP client."""
    try:
        conn = await asyncpg.connect(demo.settings.database_dsn(), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ChildError(f"cannot read the demo database: {exc}") from exc
    client = httpx.AsyncClient()

    async def read() -> Snapshot:
        demo.last = await _snapshot(demo, conn, client, demo.last)
        return demo.last

    try:
        yield read
    finally:
        await client.aclose()
        await conn.close()


async def _snapshot(
    demo: DemoRun, conn: asyncpg.Connection, client: httpx.AsyncClient, last: Snapshot
) -> Snapshot:
    """The current figures; on a database hiccup, the last ones with a note."""
    pipeline = await scrape_pipeline(client, demo.metrics_url)
    try:
        standings = await read_standings(conn, demo.event_id)
        total, alerts = await read_alerts(conn, demo.event_id, ALERTS_SHOWN)
    except (asyncpg.PostgresError, OSError) as exc:
        failed = (f"database read failed: {exc}", *_warnings(demo))
        return replace(last, pipeline=pipeline, warnings=failed)
    header = _header(demo)
    return Snapshot(standings, alerts, total, pipeline, header, _notes(demo), _warnings(demo))


def _header(demo: DemoRun) -> str:
    """Race, field, race clock (simulated) and wall time."""
    wall = time.monotonic() - demo.race_began if demo.race_began else 0.0
    race_ms = demo.race.start_ms + wall * demo.options.speed * 1000
    race_clock = datetime.fromtimestamp(race_ms / 1000, tz=UTC).strftime("%H:%M:%S")
    limit = f"/{demo.options.duration:g}" if demo.options.duration else ""
    return (
        f"{demo.stage_name} · {demo.race.length_km:g} km · {demo.race.vehicles} vehicles · "
        f"race clock {race_clock} UTC (x{demo.options.speed:g}) · {wall:.0f}{limit} s"
    )


def _warnings(demo: DemoRun) -> tuple[str, ...]:
    """Errors the children have logged (the view would otherwise just look stuck)."""
    return tuple(
        f"{child.name}: {child.errors} errors logged, see {child.log_path}"
        for child in demo.children
        if child.name != "simulator" and child.count_errors()
    )


def _notes(demo: DemoRun) -> tuple[str, ...]:
    notes = []
    if demo.live_url:
        notes.append(f"live page {demo.live_url}")
    simulator = demo.child("simulator")
    if simulator is not None and simulator.returncode == 0:
        notes.append("simulator finished: every tracker is off")
    notes.append("Ctrl-C stops" if demo.options.duration is None else "Ctrl-C stops early")
    return tuple(notes)


# -- the end -------------------------------------------------------------------------------


def _stop(demo: DemoRun | None, console: Console) -> None:
    """Stop the children (SIGTERM to each, the simulator first; SIGKILL after a timeout)."""
    if demo is None or not demo.children:
        return
    killed = stop_all(list(reversed(demo.children)), STOP_TIMEOUT_S)
    if killed:
        _say(console, f"killed after {STOP_TIMEOUT_S:.0f} s: {', '.join(killed)}")


async def _final(demo: DemoRun | None, console: Console) -> str:
    """Print the final leaderboard and the pipeline figures; a failure message or ""."""
    if demo is None or not demo.event_id:
        return ""
    try:
        conn = await asyncpg.connect(demo.settings.database_dsn(), timeout=10)
        try:
            standings = await read_standings(conn, demo.event_id)
            total, alerts = await read_alerts(conn, demo.event_id, 1)
        finally:
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"cannot read the final leaderboard: {exc}"
    snapshot = Snapshot(standings, alerts, total, demo.last.pipeline, _header(demo))
    console.print(leaderboard_table(standings, title=f"Final leaderboard — {demo.stage_name}"))
    console.print(plain_snapshot(snapshot, top=0), markup=False)
    _say(console, f"database {setup.DEMO_DATABASE} and streams demo:* kept for inspection")
    return ""
