"""Fixtures for gateway tests: a real gateway in-process on port 0, real Redis."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from processor.adapters.live import LivePublisher
from processor.gateway.server import Gateway
from processor.settings import Settings, load_settings

GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def gateway_settings(
    redis_url: str, stream_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings for a gateway on a free loopback port, under this test's live prefix."""
    for key in list(os.environ):
        if key.startswith("PROCESSOR_"):
            monkeypatch.delenv(key)
    return load_settings(
        redis_url=redis_url,
        live_prefix=f"{stream_prefix}:live",
        gateway_host="127.0.0.1",
        gateway_port=0,
        log_format="console",
    )


@pytest.fixture
async def start_gateway(
    gateway_settings: Settings, aredis: aioredis.Redis
) -> AsyncIterator[GatewayFactory]:
    """Start gateways with setting overrides; all are stopped at the end of the test."""
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        settings = gateway_settings.model_copy(update=overrides)
        gateway = Gateway(settings, aredis)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


@pytest.fixture
def publisher(aredis: aioredis.Redis, gateway_settings: Settings) -> LivePublisher:
    """A publisher writing under this test's live prefix."""
    return LivePublisher(aredis, gateway_settings.live_prefix)
