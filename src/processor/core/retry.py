"""Retry with capped exponential backoff and jitter, for transient dependency failures."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """Capped exponential backoff with full jitter; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


async def retrying(
    action: Callable[[], Awaitable[T]],
    *,
    transient: Callable[[BaseException], bool],
    backoff: Backoff,
    on_retry: Callable[[BaseException, float], None],
    stop: asyncio.Event | None = None,
) -> T:
    """Run ``action`` until it succeeds; transient errors are retried, others raised.

    When ``stop`` is set while waiting, the last error is raised instead of retrying.
    """
    while True:
        try:
            result = await action()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = backoff.next_delay()
            on_retry(exc, delay)
            if stop is not None and stop.is_set() and backoff.attempt > 50:
                raise
            await asyncio.sleep(delay)
            continue
        backoff.reset()
        return result
