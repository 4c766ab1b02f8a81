"""Delivery of outbox events to Directus Flow webhooks: at least once, in order per entry.

Each round claims, with ``FOR UPDATE SKIP LOCKED``, the oldest pending event of each entry
(its *head*) that is due and not leased, leases it for a while, posts it, and records the
outcome. An entry's next event becomes its head only once the previous one is delivered
(or dead), so an entry's events arrive in order; entries proceed independently. Any
number of dispatchers may run. A dispatcher that dies mid-delivery leaves its leases to
expire; the events are then claimed and posted again — delivered twice perhaps, never
lost. Receivers deduplicate by ``event_id``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote

import asyncpg
import httpx
import orjson
from prometheus_client import Counter, Gauge, Histogram

from processor import __version__
from processor.adapters.outbox import NOTIFY_CHANNEL, iso_utc
from processor.logs import get_logger
from processor.settings import Settings

log = get_logger("dispatcher")

OUTBOX = Gauge("processor_events_outbox", "Events in the outbox by status (sampled)", ["status"])
DELIVERED = Counter("processor_events_delivered_total", "Events delivered (2xx)", ["type"])
FAILED = Counter("processor_events_failed_total", "Failed delivery attempts", ["type", "reason"])
DEAD = Counter("processor_events_dead_total", "Events given up after max attempts", ["type"])
SKIPPED = Counter("processor_events_skipped_total", "Events no webhook route matched", ["type"])
LATENCY = Histogram(
    "processor_events_delivery_latency_seconds",
    "From outbox insert to confirmed delivery",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)

# Database failures worth waiting out; anything else is a bug or a missing migration.
TRANSIENT_DB_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TransactionRollbackError,
)

GAUGE_REFRESH_S: Final = 5.0


class RouteError(ValueError):
    """``PROCESSOR_WEBHOOK_ROUTES`` names a flow id but ``PROCESSOR_DIRECTUS_URL`` is unset."""


class OutboxMissingError(RuntimeError):
    """The outbox table does not exist: the migrations have not been applied."""


# --- pure parts: routing, backoff, payload ----------------------------------------------


def resolve_target(value: str, directus_url: str | None) -> str:
    """A route's URL: a full ``http(s)://`` URL as is, else a Directus flow trigger URL."""
    if value.startswith(("http://", "https://")):
        return value
    if directus_url is None:
        raise RouteError(
            f"webhook route target {value!r} is a flow id but PROCESSOR_DIRECTUS_URL is not set"
        )
    return f"{directus_url.rstrip('/')}/flows/trigger/{quote(value, safe='')}"


def _matches(pattern: str, event_type: str) -> bool:
    """``*`` matches all; ``anomaly``, ``anomaly.`` and ``anomaly.*`` match ``anomaly.…``."""
    if pattern == "*":
        return True
    stem = pattern.removesuffix("*").removesuffix(".")
    return event_type == stem or event_type.startswith(stem + ".")


class Router:
    """Maps an event type to one webhook URL: exact type, else longest prefix, else ``*``."""

    def __init__(self, routes: Mapping[str, str], directus_url: str | None) -> None:
        self._targets = {p: resolve_target(v, directus_url) for p, v in routes.items()}

    def target(self, event_type: str) -> str | None:
        """The URL for ``event_type``, or ``None`` when no route matches."""
        if event_type in self._targets:
            return self._targets[event_type]
        matching = [p for p in self._targets if _matches(p, event_type)]
        if not matching:
            return None
        best = max(matching, key=lambda p: (p != "*", len(p)))
        return self._targets[best]


def backoff_delay(attempts: int, initial: float, maximum: float, rand: float) -> float:
    """Seconds before the next try after ``attempts`` tries: doubling, capped, 50–100 % jitter."""
    base = min(maximum, initial * 2.0 ** min(attempts - 1, 60))
    return base * (0.5 + 0.5 * rand)


def retry_after_s(header: str | None) -> float | None:
    """The delay a ``Retry-After: <seconds>`` header asks for (HTTP dates are ignored)."""
    if header is None or not header.strip().isdigit():
        return None
    return float(header.strip())


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """An outbox event this dispatcher holds a lease on."""

    id: int
    event_id: uuid.UUID
    type: str
    entry_key: str
    occurred_at: dt.datetime
    body: Mapping[str, Any]
    attempts: int
    lease_token: uuid.UUID

    @classmethod
    def from_row(cls, row: Mapping[str, Any], token: uuid.UUID) -> ClaimedEvent:
        return cls(
            id=row["id"],
            event_id=row["event_id"],
            type=row["type"],
            entry_key=row["entry_key"],
            occurred_at=row["occurred_at"],
            body=orjson.loads(row["body"]),
            attempts=row["attempts"],
            lease_token=token,
        )


def envelope(event: ClaimedEvent) -> bytes:
    """The JSON posted for ``event``: identity, order and time, then ``row`` and ``context``."""
    return orjson.dumps(
        {
            **event.body,
            "event_id": str(event.event_id),
            "type": event.type,
            "occurred_at": iso_utc(event.occurred_at),
            "entry_key": event.entry_key,
            "sequence": event.id,
            "attempt": event.attempts,
        }
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one POST: delivered, or why not (``reason`` is a metric label)."""

    ok: bool
    reason: str = ""
    error: str = ""
    retry_after: float | None = None


# --- SQL --------------------------------------------------------------------------------

# Heads only: a pending event with no older pending event of its entry. Scanning pending
# events in id order and probing (entry_key, id) for an older one stops after LIMIT heads,
# instead of computing every entry's head on each round.
_CLAIM = """
WITH claimable AS (
    SELECT o.id
    FROM processor.outbox o
    WHERE o.status = 'pending'
      AND o.next_attempt_at <= now()
      AND (o.leased_until IS NULL OR o.leased_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM processor.outbox p
          WHERE p.status = 'pending' AND p.entry_key = o.entry_key AND p.id < o.id
      )
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE processor.outbox o
SET attempts = o.attempts + 1,
    leased_until = now() + make_interval(secs => $2),
    lease_token = $3
FROM claimable c
WHERE o.id = c.id
RETURNING o.id, o.event_id, o.type, o.entry_key, o.occurred_at, o.body::text AS body,
          o.attempts
"""

_DELIVERED = """
UPDATE processor.outbox
SET status = 'delivered', delivered_at = now(), leased_until = NULL, lease_token = NULL,
    last_error = NULL
WHERE id = $1 AND status = 'pending'
RETURNING extract(epoch FROM now() - recorded_at)::float8
"""

_FAILED = """
UPDATE processor.outbox
SET status = CASE WHEN attempts >= $3 THEN 'dead' ELSE 'pending' END,
    next_attempt_at = now() + make_interval(secs => $4),
    leased_until = NULL, lease_token = NULL, last_error = $5
WHERE id = $1 AND lease_token = $2 AND status = 'pending'
RETURNING status
"""

_SKIPPED = """
UPDATE processor.outbox
SET status = 'skipped', attempts = attempts - 1, leased_until = NULL, lease_token = NULL,
    last_error = $3
WHERE id = $1 AND lease_token = $2 AND status = 'pending'
"""

_COUNTS = """
SELECT status, count(*) AS n FROM processor.outbox
WHERE status IN ('pending', 'dead') GROUP BY status
"""


# --- the dispatcher ---------------------------------------------------------------------


def make_http_client(settings: Settings, concurrency: int = 16) -> httpx.AsyncClient:
    """The HTTP client for webhooks: settings' timeout, no redirects, bounded connections."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.webhook_timeout_s),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=concurrency),
        headers={"user-agent": f"processor/{__version__}"},
    )


def webhooks_configured(settings: Settings) -> bool:
    """Whether ``processor run`` should start a dispatcher."""
    return settings.dispatch_enabled and bool(settings.webhook_routes)


class Dispatcher:
    """Posts outbox events to their routed webhooks; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        concurrency: int = 16,
        poll_interval_s: float = 1.0,
        lease_s: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        directus = str(settings.directus_url) if settings.directus_url else None
        self._router = Router(settings.webhook_routes, directus)
        self._pool = pool
        self._settings = settings
        self._http = http
        self._concurrency = concurrency
        self._poll_interval_s = poll_interval_s
        # Past the request timeout plus margin the attempt is surely over: safe to retake.
        self._lease_s = lease_s if lease_s is not None else settings.webhook_timeout_s + 5.0
        self._rand = rand
        token = settings.webhook_token
        self._auth = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    async def run_once(self) -> int:
        """Claim the due heads of up to ``concurrency`` entries, post them, record outcomes.

        Returns how many events were claimed (0: nothing is due).
        """
        token = uuid.uuid4()
        try:
            rows = await self._pool.fetch(_CLAIM, self._concurrency, self._lease_s, token)
        except asyncpg.UndefinedTableError as exc:
            raise OutboxMissingError(
                "table processor.outbox is missing: run `processor schema migrate`"
            ) from exc
        events = [ClaimedEvent.from_row(r, token) for r in rows]
        results = await asyncio.gather(*(self._deliver(e) for e in events), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(events)

    async def drain(self) -> int:
        """Run rounds until nothing is due (events waiting for a retry stay); returns claims."""
        total = 0
        while claimed := await self.run_once():
            total += claimed
        await self.refresh_gauges()
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; a round in flight finishes first."""
        wakeup = _Wakeup()
        await wakeup.start(self._settings.database_dsn())
        try:
            await self._loop(stop, wakeup)
        finally:
            await wakeup.close()

    async def _loop(self, stop: asyncio.Event, wakeup: _Wakeup) -> None:
        failures = 0
        next_refresh = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                claimed = await self.run_once()
                if loop.time() >= next_refresh:
                    await self.refresh_gauges()
                    next_refresh = loop.time() + GAUGE_REFRESH_S
                failures = 0
            except TRANSIENT_DB_ERRORS as exc:
                failures += 1
                delay = self._db_backoff(failures)
                log.warning("outbox unavailable, retrying", error=repr(exc), retry_in_s=delay)
                await _wait_any([stop], delay)
                continue
            if claimed == 0:
                await _wait_any([stop, wakeup.event], self._poll_interval_s)
                wakeup.event.clear()

    def _db_backoff(self, failures: int) -> float:
        s = self._settings
        return backoff_delay(failures, s.retry_initial_s, s.retry_max_s, self._rand())

    async def refresh_gauges(self) -> None:
        """Sample how many events are pending and dead into the outbox gauge."""
        counts = {r["status"]: r["n"] for r in await self._pool.fetch(_COUNTS)}
        for status in ("pending", "dead"):
            OUTBOX.labels(status=status).set(counts.get(status, 0))

    async def _deliver(self, event: ClaimedEvent) -> None:
        url = self._router.target(event.type)
        if url is None:
            await self._mark_skipped(event)
            return
        attempt = await self._post(event, url)
        if attempt.ok:
            await self._mark_delivered(event)
        else:
            await self._mark_failed(event, attempt)

    async def _post(self, event: ClaimedEvent, url: str) -> Attempt:
        """POST the event; every failure is an :class:`Attempt` with its cause, not a raise."""
        timeout = self._settings.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout):
                response = await self._http.post(
                    url, content=envelope(event), headers=self._headers(event)
                )
        except (TimeoutError, httpx.TimeoutException):
            return Attempt(ok=False, reason="timeout", error=f"no response within {timeout:g}s")
        except httpx.TransportError as exc:
            return Attempt(ok=False, reason="connection", error=f"{type(exc).__name__}: {exc}")
        if response.is_success:
            return Attempt(ok=True)
        return Attempt(
            ok=False,
            reason=f"http_{response.status_code}",
            error=f"HTTP {response.status_code}: {response.text[:200]}",
            retry_after=retry_after_s(response.headers.get("retry-after")),
        )

    def _headers(self, event: ClaimedEvent) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "idempotency-key": str(event.event_id),
            "x-processor-event-type": event.type,
            **self._auth,
        }

    async def _mark_delivered(self, event: ClaimedEvent) -> None:
        latency = await self._pool.fetchval(_DELIVERED, event.id)
        DELIVERED.labels(type=event.type).inc()
        if latency is not None:
            LATENCY.observe(max(0.0, latency))
        log.debug("event delivered", event_id=str(event.event_id), type=event.type)

    async def _mark_failed(self, event: ClaimedEvent, attempt: Attempt) -> None:
        s = self._settings
        delay = backoff_delay(
            event.attempts, s.webhook_backoff_initial_s, s.webhook_backoff_max_s, self._rand()
        )
        if attempt.retry_after is not None:
            delay = max(delay, min(attempt.retry_after, s.webhook_backoff_max_s))
        status = await self._pool.fetchval(
            _FAILED, event.id, event.lease_token, s.webhook_max_attempts, delay, attempt.error
        )
        FAILED.labels(type=event.type, reason=attempt.reason).inc()
        if status == "dead":
            DEAD.labels(type=event.type).inc()
            log.error(
                "event dead",
                event_id=str(event.event_id),
                type=event.type,
                attempts=event.attempts,
                error=attempt.error,
            )
        else:
            log.info(
                "delivery failed, will retry",
                event_id=str(event.event_id),
                attempts=event.attempts,
                retry_in_s=round(delay, 3),
                error=attempt.error,
            )

    async def _mark_skipped(self, event: ClaimedEvent) -> None:
        error = f"no webhook route for type {event.type}"
        await self._pool.execute(_SKIPPED, event.id, event.lease_token, error)
        SKIPPED.labels(type=event.type).inc()


class _Wakeup:
    """``LISTEN processor_outbox`` on a connection of its own; polling covers its absence."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    async def start(self, dsn: str) -> None:
        try:
            self._conn = await asyncpg.connect(dsn)
            await self._conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("cannot listen for outbox notifications; polling", error=repr(exc))
            await self.close()

    def _notified(self, *_: object) -> None:
        self.event.set()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


async def _wait_any(events: Sequence[asyncio.Event], wait_s: float) -> None:
    """Return when any of ``events`` is set or after ``wait_s`` seconds."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def run_dispatcher(
    pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event, **options: Any
) -> None:
    """Run a :class:`Dispatcher` with its own HTTP client until ``stop`` is set.

    ``options`` are the Dispatcher's keyword arguments.
    """
    concurrency = int(options.get("concurrency", 16))
    async with make_http_client(settings, concurrency) as http:
        await Dispatcher(pool, settings, http, **options).run(stop)


class ServiceRuntime(Protocol):
    """What :func:`install` needs of ``processor.service.Runtime``."""

    settings: Settings
    background: list[Callable[[asyncio.Event], Awaitable[None]]]


async def install(runtime: ServiceRuntime) -> None:
    """Service component: ``processor run`` dispatches when webhook routes are configured.

    The dispatcher gets a small pool of its own so that webhook traffic never takes
    connections from the throughput pipeline. Routes are checked here, at start-up.
    """
    settings = runtime.settings
    if not webhooks_configured(settings):
        return
    Router(settings.webhook_routes, str(settings.directus_url) if settings.directus_url else None)
    runtime.background.append(lambda stop: _supervised(settings, stop))


async def _supervised(settings: Settings, stop: asyncio.Event) -> None:
    """Run the dispatcher until ``stop``; after an unexpected failure, log and start again."""
    failures = 0
    while not stop.is_set():
        try:
            pool = await asyncpg.create_pool(settings.database_dsn(), min_size=1, max_size=4)
            try:
                await run_dispatcher(pool, settings, stop)
            finally:
                await pool.close()
        except Exception as exc:  # noqa: BLE001 - nothing stops the service; logged, retried
            failures += 1
            delay = backoff_delay(failures, settings.retry_initial_s, settings.retry_max_s, 1.0)
            log.error("dispatcher failed, restarting", error=repr(exc), retry_in_s=delay)
            await _wait_any([stop], delay)
