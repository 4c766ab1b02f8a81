"""``processor gateway``: serve live leaderboards over WebSocket and the live page."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

import click
import httpx

from processor.cli import settings_or_exit
from processor.logs import configure_logging, get_logger
from processor.settings import Settings

log = get_logger("gateway.cli")

GC_YOUNG_THRESHOLD = 50_000


@click.command("gateway")
@click.option("--host", default=None, help="Address to bind [PROCESSOR_GATEWAY_HOST].")
@click.option("--port", type=int, default=None, help="Port to bind [PROCESSOR_GATEWAY_PORT].")
@click.option("--redis-url", default=None, help="Redis URL [PROCESSOR_REDIS_URL].")
@click.option("--live-prefix", default=None, help="Live key prefix [PROCESSOR_LIVE_PREFIX].")
@click.option("--check", is_flag=True, help="Exit 0 if the local gateway answers, else 1.")
def gateway(
    host: str | None,
    port: int | None,
    redis_url: str | None,
    live_prefix: str | None,
    check: bool,
) -> None:
    """Serve live leaderboards over WebSocket (/ws) and the live page (/)."""
    settings = settings_or_exit(
        gateway_host=host, gateway_port=port, redis_url=redis_url, live_prefix=live_prefix
    )
    if check:
        sys.exit(0 if _healthy(settings) else 1)
    configure_logging(settings.log_format, settings.log_level)
    if settings.log_level != "debug":
        # websockets logs every connection and HTTP response at info: too much at scale.
        logging.getLogger("websockets").setLevel(logging.WARNING)
    asyncio.run(_main(settings))


def _healthy(settings: Settings) -> bool:
    """Whether the gateway at the configured address answers ``/healthz``."""
    host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "") else settings.gateway_host  # noqa: S104 - a probe of the wildcard bind goes to loopback
    url = f"http://{host}:{settings.gateway_port}/healthz"
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


async def _main(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; a second signal exits at once."""
    from processor.gateway.server import run_gateway

    # Thousands of connections are hundreds of thousands of long-lived objects: fewer, larger
    # young collections promote fewer temporaries, so full collections (a pause of a few
    # hundred milliseconds each at that size) come far less often.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        log.info("stopping gateway")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await run_gateway(settings, stop)
