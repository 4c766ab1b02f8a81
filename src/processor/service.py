"""``processor run``: the service — pipeline, domain and emitters — with its lifecycle.

Lifecycle (as uvicorn does it): SIGTERM/SIGINT stop reading, the in-flight batches are
stored, acknowledged and the pools closed within ``shutdown_timeout_s``; a second signal
forces exit. ``--burst`` drains the stream and exits (tools, tests). ``--check`` asks a
running instance's /readyz and exits 0 or 1 (for health probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import click
import redis.asyncio as aioredis

from processor.adapters import errors
from processor.adapters.http_probe import ProbeServer
from processor.adapters.positions_store import PositionsStore, init_connection
from processor.adapters.redis_stream import StreamSource
from processor.cli import settings_or_exit
from processor.core import metrics
from processor.core.gc_tuning import tune_for_throughput
from processor.core.pipeline import CommitHook, Pipeline, PipelineConfig
from processor.core.retry import Backoff
from processor.core.state import DeviceStates
from processor.logs import configure_logging, get_logger
from processor.settings import Settings

log = get_logger("service")


class StartupError(Exception):
    """The service cannot start; the message says what to fix."""


@dataclass
class Runtime:
    """What the running service holds; components add hooks and background tasks."""

    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    source: StreamSource
    store: PositionsStore
    states: DeviceStates
    hooks: list[tuple[str, CommitHook]] = field(default_factory=list)
    background: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    drains: list[Callable[[float], Awaitable[None]]] = field(default_factory=list)
    ready: bool = False


Component = Callable[[Runtime], Awaitable[None]]


def pipeline_config(settings: Settings) -> PipelineConfig:
    return PipelineConfig(
        batch_max_size=settings.batch_max_size,
        batch_max_age_s=settings.batch_max_age_ms / 1000,
        queue_max_batches=settings.queue_max_batches,
        write_concurrency=settings.write_concurrency,
        max_entry_bytes=settings.max_entry_bytes,
        max_io_elements=settings.max_io_elements,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
    )


def stream_source(
    client: aioredis.Redis, settings: Settings, group: str | None = None
) -> StreamSource:
    """The consumer-group source for the record stream, configured from settings."""
    return StreamSource(
        client,
        stream=settings.stream,
        group=group or settings.group,
        consumer=settings.consumer,
        dead_letter_stream=settings.dead_letter_stream,
        max_deliveries=settings.max_deliveries,
        claim_idle_ms=settings.claim_idle_ms,
        count=settings.read_count,
        block_ms=min(settings.read_block_ms, settings.batch_max_age_ms),
    )


async def connect_postgres(settings: Settings, stop: asyncio.Event) -> asyncpg.Pool:
    """A pool, waiting (with backoff) for PostgreSQL to answer."""
    backoff = Backoff(settings.retry_initial_s, settings.retry_max_s)
    while True:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                settings.database_dsn(),
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                command_timeout=settings.db_command_timeout_s,
                init=init_connection,
            )
            return pool
        except Exception as exc:
            if not errors.is_transient(exc) or stop.is_set():
                raise StartupError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc
            delay = backoff.next_delay()
            log.warning("waiting for PostgreSQL", error=str(exc), delay_s=round(delay, 2))
            await asyncio.sleep(delay)


async def check_migrations(pool: asyncpg.Pool) -> None:
    """Refuse to start on a database the owned migrations have not been applied to."""
    from processor.adapters.migrations import all_migrations

    async with pool.acquire() as conn:
        exists = await conn.fetchval("SELECT to_regclass('processor.schema_migrations')")
        done = set()
        if exists:
            done = {
                r[0] for r in await conn.fetch("SELECT version FROM processor.schema_migrations")
            }
    missing = [f"{m.version:04d}_{m.name}" for m in all_migrations() if m.version not in done]
    if missing:
        raise StartupError(
            "database schema is not migrated (missing: " + ", ".join(missing) + "); "
            "run `processor schema migrate`"
        )


async def check_directus(pool: asyncpg.Pool) -> None:
    """Refuse to start when a Directus table or column the processor uses is missing."""
    try:
        from processor.adapters.directus_schema import check_schema  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # the Directus schema module is optional in a pipeline-only build
        return
    async with pool.acquire() as conn:
        problems = await check_schema(conn)
    if problems:
        raise StartupError("Directus schema check failed:\n  " + "\n  ".join(problems))


async def build_runtime(settings: Settings, stop: asyncio.Event) -> Runtime:
    pool = await connect_postgres(settings, stop)
    try:
        await check_migrations(pool)
        await check_directus(pool)
        client = aioredis.Redis.from_url(settings.redis_dsn(), health_check_interval=30)
        source = stream_source(client, settings)
        await _retry_startup(source.ensure_group, settings, stop, "redis")
        store = PositionsStore(pool, settings)
        await store.detect_layout()
    except BaseException:
        await pool.close()
        raise
    runtime = Runtime(settings, pool, client, source, store, DeviceStates(settings.state_capacity))
    for component in components(settings):
        await component(runtime)
    return runtime


async def _build_with_retry(settings: Settings, stop: asyncio.Event) -> Runtime:
    """Build the runtime, retrying the whole start when a dependency drops mid-way."""
    backoff = Backoff(settings.retry_initial_s, settings.retry_max_s)
    while True:
        try:
            return await build_runtime(settings, stop)
        except Exception as exc:
            if not errors.is_transient(exc) or stop.is_set():
                raise
            delay = backoff.next_delay()
            log.warning("start interrupted, retrying", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(delay)


def components(settings: Settings) -> list[Component]:
    """The optional parts wired into the service, in order."""
    found: list[Component] = []
    for module_name in (
        "processor.adapters.mappings",
        "processor.adapters.domain_live",
        "processor.adapters.dispatcher",
    ):
        with contextlib.suppress(ModuleNotFoundError):
            module = __import__(module_name, fromlist=["install"])
            found.append(module.install)
    return found


async def _retry_startup(
    action: Callable[[], Awaitable[Any]], settings: Settings, stop: asyncio.Event, name: str
) -> None:
    backoff = Backoff(settings.retry_initial_s, settings.retry_max_s)
    while True:
        try:
            await action()
            return
        except Exception as exc:
            if not errors.is_transient(exc) or stop.is_set():
                raise StartupError(f"{name}: {type(exc).__name__}: {exc}") from exc
            delay = backoff.next_delay()
            log.warning("waiting for dependency", dependency=name, error=str(exc))
            await asyncio.sleep(delay)


async def _gauges(runtime: Runtime, stop: asyncio.Event) -> None:
    """Sample pending entries and stream lag for the metrics, every few seconds."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            metrics.PENDING.set(await runtime.source.pending_count())
            lag = await runtime.source.lag_entries()
            if lag is not None:
                metrics.STREAM_LAG.set(lag)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5)


async def _partitions_ahead(runtime: Runtime, stop: asyncio.Event) -> None:
    """Keep the next days' partitions created (native partitioning only), hourly."""
    from processor.adapters.partitions import ensure_ahead

    while not stop.is_set():
        if runtime.store.native:
            try:
                async with runtime.pool.acquire() as conn:
                    await ensure_ahead(conn, runtime.settings)
            except Exception as exc:  # noqa: BLE001 - retried next hour; writes create on demand
                log.warning("creating partitions ahead failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=3600)


async def serve(settings: Settings, stop: asyncio.Event, *, burst: bool = False) -> Pipeline:
    """Run the service until ``stop`` is set (or the stream is drained in burst mode)."""
    runtime = await _build_with_retry(settings, stop)
    pipeline = Pipeline(
        runtime.source,
        runtime.store,
        pipeline_config(settings),
        states=runtime.states,
        transient=errors.is_transient,
        hooks=runtime.hooks,
    )
    probe = ProbeServer(settings.http_host, settings.http_port, lambda: runtime.ready)
    if not burst:
        await probe.start()
    background_stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = [
        asyncio.create_task(_gauges(runtime, background_stop)),
        asyncio.create_task(_partitions_ahead(runtime, background_stop)),
    ]
    tasks.extend(asyncio.ensure_future(job(background_stop)) for job in runtime.background)
    runtime.ready = True
    log.info(
        "processor started",
        stream=settings.stream,
        group=settings.group,
        consumer=settings.consumer,
        burst=burst,
    )
    try:
        await pipeline.run(stop, burst=burst)
        if burst:  # tools and tests: let derived work (the domain) catch up before exiting
            for drain in runtime.drains:
                await drain(settings.shutdown_timeout_s * 4)
    finally:
        runtime.ready = False
        background_stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await probe.close()
        for closer in runtime.closers:
            await closer()
        await runtime.redis.aclose()
        await runtime.pool.close()
        log.info("processor stopped", **_stats(pipeline))
    return pipeline


def _stats(pipeline: Pipeline) -> dict[str, int]:
    s = pipeline.stats
    return {
        "read": s.read,
        "stored": s.stored,
        "duplicates": s.duplicates,
        "dead_lettered": s.dead_lettered,
        "batches": s.batches,
    }


def install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: exit at once."""

    def handle(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal, exiting now", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


async def _main(settings: Settings, burst: bool) -> None:
    stop = asyncio.Event()
    install_signals(asyncio.get_running_loop(), stop)
    task = asyncio.create_task(serve(settings, stop, burst=burst))
    await asyncio.wait(
        {task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    if not task.done():
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=settings.shutdown_timeout_s)
        except TimeoutError:
            log.error(
                "shutdown timed out, in-flight entries stay pending for redelivery",
                timeout_s=settings.shutdown_timeout_s,
            )
            task.cancel()
            return
    task.result()


def check_running(settings: Settings) -> bool:
    """Ask the local instance's /readyz; True when it answers 200."""
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host  # noqa: S104
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.http_port}/readyz", timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@click.command("run")
@click.option("--burst", is_flag=True, help="Drain the stream, then exit.")
@click.option("--check", is_flag=True, help="Exit 0 if the local instance is ready, else 1.")
@click.option("--stream", default=None, help="Stream to read [PROCESSOR_STREAM].")
@click.option("--group", default=None, help="Consumer group [PROCESSOR_GROUP].")
@click.option("--consumer", default=None, help="Consumer name [PROCESSOR_CONSUMER].")
@click.option(
    "--http-port", type=int, default=None, help="Metrics/probe port [PROCESSOR_HTTP_PORT]."
)
@click.option("--log-format", type=click.Choice(["json", "console"]), default=None)
def run_command(
    burst: bool,
    check: bool,
    stream: str | None,
    group: str | None,
    consumer: str | None,
    http_port: int | None,
    log_format: str | None,
) -> None:
    """Run the processor service (pipeline, domain, emitters)."""
    settings = settings_or_exit(
        stream=stream, group=group, consumer=consumer, http_port=http_port, log_format=log_format
    )
    if check:
        sys.exit(0 if check_running(settings) else 1)
    configure_logging(settings.log_format, settings.log_level)
    tune_for_throughput()
    try:
        asyncio.run(_main(settings, burst))
    except StartupError as exc:
        log.error("cannot start", reason=str(exc))
        click.echo(f"processor: cannot start: {exc}", err=True)
        sys.exit(1)
