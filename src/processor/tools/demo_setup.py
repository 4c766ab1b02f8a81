"""Set-up of ``processor demo``: its own database and streams, reset, migrated, seeded.

The demo never touches the configured database or streams: it uses the configured
PostgreSQL *server* with a database of its own (:data:`DEMO_DATABASE`, dropped and
created again at every start so each demo is the same) and Redis keys under ``demo:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from processor.adapters import directus_schema, reference
from processor.adapters.migrations import migrate
from processor.settings import Settings, load_settings
from processor.tools.simulate import SimConfig, Simulation, write_course, write_devices

DEMO_DATABASE = "processor_demo"
STREAM = "demo:records"
DEAD_LETTER_STREAM = "demo:records:dead"
LIVE_PREFIX = "demo:live"
ADMIN_DATABASE = "postgres"


class SetupError(Exception):
    """The demo cannot be set up; the message says what failed and what to check."""


@dataclass(frozen=True, slots=True)
class Race:
    """The simulated race the demo runs: what the simulator is told, what was imported."""

    start_ms: int
    seed: int
    vehicles: int
    length_km: float
    course_file: Path
    devices_file: Path


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` on the same server (query kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    """The database a URL names (``postgres`` when it names none)."""
    return urlsplit(url).path.lstrip("/") or ADMIN_DATABASE


def admin_url(url: str) -> str:
    """Where to run CREATE/DROP DATABASE: the configured database, unless it is the demo's."""
    if database_name(url) == DEMO_DATABASE:
        return with_database(url, ADMIN_DATABASE)
    return url


def demo_settings(base: Settings, http_port: int) -> Settings:
    """The settings the demo's children run with: demo database, streams and ports."""
    return load_settings(
        database_url=with_database(base.database_dsn(), DEMO_DATABASE),
        redis_url=base.redis_dsn(),
        stream=STREAM,
        dead_letter_stream=DEAD_LETTER_STREAM,
        live_prefix=LIVE_PREFIX,
        http_host="127.0.0.1",
        http_port=http_port,
    )


def child_environment(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without its PROCESSOR_* variables, plus the demo's."""
    env = {k: v for k, v in environ.items() if not k.startswith("PROCESSOR_")}
    env.update(
        {
            "PROCESSOR_DATABASE_URL": settings.database_dsn(),
            "PROCESSOR_REDIS_URL": settings.redis_dsn(),
            "PROCESSOR_STREAM": settings.stream,
            "PROCESSOR_DEAD_LETTER_STREAM": settings.dead_letter_stream,
            "PROCESSOR_LIVE_PREFIX": settings.live_prefix,
            "PROCESSOR_HTTP_HOST": settings.http_host,
            "PROCESSOR_HTTP_PORT": str(settings.http_port),
            "PROCESSOR_LOG_FORMAT": "console",
            # Closures and offline alerts are ticked by the wall clock: tick often.
            "PROCESSOR_DOMAIN_TICK_S": "1",
        }
    )
    return env


def write_race_files(race: Race) -> str:
    """Generate the course (same flags as the simulator child gets) and write its files.

    Returns the stage name. The simulator is deterministic per flags, so the child that
    sends the records drives exactly this course.
    """
    config = SimConfig(
        start_ms=race.start_ms, seed=race.seed, vehicles=race.vehicles, length_km=race.length_km
    )
    sim = Simulation(config)
    race.course_file.parent.mkdir(parents=True, exist_ok=True)
    write_course(sim.course, race.course_file)
    write_devices(sim.course, race.devices_file)
    return sim.course.stage_name


async def reset_database(base_url: str) -> None:
    """Drop and create the demo database (connections to it are closed by force)."""
    try:
        conn = await asyncpg.connect(admin_url(base_url), timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise SetupError(f"cannot connect to PostgreSQL: {exc}") from exc
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DEMO_DATABASE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
    except asyncpg.PostgresError as exc:
        raise SetupError(f"cannot create the database {DEMO_DATABASE}: {exc}") from exc
    finally:
        await conn.close()


async def prepare_database(settings: Settings, race: Race) -> int:
    """Migrate, bootstrap the Directus tables, seed mappings, import devices and course.

    Returns the imported event's id.
    """
    try:
        conn = await asyncpg.connect(settings.database_dsn(), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise SetupError(f"cannot connect to the database {DEMO_DATABASE}: {exc}") from exc
    try:
        await migrate(conn, settings)
        await directus_schema.bootstrap(conn)
        await reference.seed_io_mappings(conn, reference.read_io_csv())
        devices = reference.read_devices_csv(race.devices_file)
        await reference.import_devices(conn, devices, race.devices_file)
        summary = await reference.import_course(conn, reference.read_course(race.course_file))
    except (
        asyncpg.PostgresError,
        reference.ReferenceFileError,
        reference.CourseFormatError,
        directus_schema.SchemaFileError,
    ) as exc:
        raise SetupError(f"preparing the database {DEMO_DATABASE} failed: {exc}") from exc
    finally:
        await conn.close()
    return summary.event_id


def reset_streams(settings: Settings) -> int:
    """Delete the demo's stream, dead-letter stream and live keys; how many were deleted."""
    client = redis.Redis.from_url(settings.redis_dsn(), socket_timeout=10)
    try:
        keys: list[bytes | str] = [settings.stream, settings.dead_letter_stream]
        keys += list(client.scan_iter(match=f"{settings.live_prefix}*", count=1000))
        deleted: int = client.delete(*keys)
        return deleted
    except redis.RedisError as exc:
        raise SetupError(f"cannot reset the demo streams in Redis: {exc}") from exc
    finally:
        client.close()
