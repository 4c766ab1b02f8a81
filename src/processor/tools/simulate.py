"""The race simulator: a field of vehicles on a course, as stream contract v1 entries.

:class:`Simulation` is the pure core: built from a :class:`SimConfig` (and optionally a
loaded :class:`~processor.tools.sim_course.Course`), it produces entries as a function of
the seed and of the simulated clock only. Drive it with :meth:`Simulation.step` (every
entry received up to a time) or :meth:`Simulation.batches` (one simulated second at a
time). The sinks below (JSON lines, positions CSV, Redis Stream) and :func:`run` (real
time, accelerated or as fast as possible) are the thin I/O around it.

Example, in process::

    sim = Simulation(SimConfig(seed=7, vehicles=20, start_ms=1_780_000_000_000))
    for until_ms, entries in sim.batches():
        for entry in entries:
            entry.fields()  # {"v": "1", "imei": ..., "payload": ...} for XADD
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, NamedTuple, Protocol

import orjson
import redis

from processor.tools.sim_course import (
    Course,
    generate_course,
)
from processor.tools.sim_vehicle import (
    PREROLL_MS,
    VEHICLE_CLASSES,
    FaultRates,
    Incidents,
    Terrain,
    Vehicle,
    make_terrain,
    speed_profile,
)

__all__ = [
    "CONTRACT_VERSION",
    "Entry",
    "FaultRates",
    "FileSink",
    "PositionsCsvSink",
    "RedisSink",
    "SimConfig",
    "Simulation",
    "Sink",
    "Summary",
    "run",
    "write_course",
    "write_devices",
]

CONTRACT_VERSION: Final = "1"
POSITIONS_HEADER: Final = [
    "imei",
    "ts",
    "lat",
    "lon",
    "alt",
    "angle",
    "sat",
    "speed",
    "priority",
    "event_io",
    "received_at",
    "io",
]
MAX_VEHICLES: Final = 10_000
SPEED_ZONE_MARGIN_KMH: Final = 6  # law-abiding crews stay this far under a zone's limit
INCIDENTS: Final = (
    "spike",
    "bad_clock",
    "sos",
    "crash",
    "stopped",
    "low_battery",
    "speeding",
    "missed_waypoint",
    "dnf",
)


class SimulationError(ValueError):
    """A simulation that cannot be built from its configuration."""


class Entry(NamedTuple):
    """One stream entry: ingestion time (ms), device IMEI and the payload JSON bytes."""

    received_at: int
    imei: str
    payload: bytes

    def fields(self) -> dict[str, str | bytes]:
        """The stream fields of contract v1, ready for XADD."""
        return {"v": CONTRACT_VERSION, "imei": self.imei, "payload": self.payload}


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What to simulate. ``start_ms`` is when the first tracker switches on."""

    start_ms: int
    seed: int = 1
    vehicles: int = 50
    length_km: float = 20.0
    start_interval_ms: int | None = None  # None: 30 s, closer for big fields (all within 30 min)
    rates: FaultRates = field(default_factory=FaultRates)

    def interval_ms(self) -> int:
        """Time between two scheduled starts."""
        if self.start_interval_ms is not None:
            return self.start_interval_ms
        return max(10, min(30_000, 1_800_000 // max(1, self.vehicles)))


@dataclass(slots=True)
class Summary:
    """What a run produced: counts per fault kind, records, entries, wall time."""

    counts: dict[str, int]
    records: int
    entries: int
    seconds: float

    @property
    def rate(self) -> float:
        """Entries written per wall-clock second."""
        return self.entries / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "records": self.records,
            "entries": self.entries,
            "seconds": round(self.seconds, 3),
            "entries_per_s": round(self.rate, 1),
            "faults": dict(sorted(self.counts.items())),
        }


class Simulation:
    """A deterministic race: the same config gives the same entries, byte for byte."""

    def __init__(self, config: SimConfig, course: Course | None = None) -> None:
        if course is None:
            _check(config)
        self.config = config
        seed = config.seed
        self.course = course or generate_course(
            random.Random(seed),
            vehicles=config.vehicles,
            start_ms=config.start_ms,
            length_km=config.length_km,
            start_interval_ms=config.interval_ms(),
            preroll_ms=PREROLL_MS,
        )
        terrain = make_terrain(random.Random(f"{seed}:terrain"), self.course.route)
        plans = plan_incidents(random.Random(f"{seed}:incidents"), self.course, config.rates)
        profiles: dict[tuple[str, int], list[float]] = {}
        self.vehicles = [
            Vehicle(
                i,
                self.course,
                terrain,
                _profile(self.course, terrain, self.course.entries[i].klass, plans[i], profiles),
                random.Random(f"{seed}:vehicle:{i}"),
                config.rates,
                plans[i],
            )
            for i in range(len(self.course.entries))
        ]
        self._planned = _planned_counts(plans)
        self._waiting = sorted(self.vehicles, key=lambda v: (v.on_ms, v.index))
        self._active: list[Vehicle] = []
        first = min(v.on_ms for v in self.vehicles)
        self._next_ms = first - first % 1000
        self._deliver_ms = self._next_ms
        self._due: dict[int, list[Entry]] = {}
        self._entries = 0

    # -- clock-driven API -----------------------------------------------------------------

    @property
    def clock_ms(self) -> int:
        """The simulated time up to which entries have been handed out."""
        return self._deliver_ms

    @property
    def done(self) -> bool:
        """Every tracker is off and every entry has been handed out."""
        return self._generation_done and not self._due

    @property
    def _generation_done(self) -> bool:
        return not self._waiting and not self._active

    def step(self, until_ms: int) -> list[Entry]:
        """Every entry received by ingestion up to ``until_ms``, in reception order."""
        while self._next_ms <= until_ms and not self._generation_done:
            self._generate(self._next_ms)
            self._next_ms += 1000
        out: list[Entry] = []
        while self._deliver_ms + 999 <= until_ms and (
            self._deliver_ms < self._next_ms or self._generation_done
        ):
            bucket = self._due.pop(self._deliver_ms // 1000, None)
            if bucket:
                # Entries order by reception time; ties by device then bytes: deterministic.
                bucket.sort()
                out.extend(bucket)
            self._deliver_ms += 1000
            if self.done:
                break
        self._entries += len(out)
        return out

    def batches(self, until_ms: int | None = None) -> Iterator[tuple[int, list[Entry]]]:
        """One simulated second at a time: ``(end of the second in ms, its entries)``."""
        while not self.done:
            end = self._deliver_ms + 999
            if until_ms is not None and end > until_ms:
                return
            yield end, self.step(end)

    def summary(self, seconds: float = 0.0) -> Summary:
        """Counts so far: faults injected (per kind), records logged, entries handed out."""
        counts = dict(self._planned)
        counts["records"] = sum(v.records for v in self.vehicles)
        for vehicle in self.vehicles:
            for name, n in vehicle.counts.items():
                counts[name] = counts.get(name, 0) + n
        records = counts.pop("records", 0)
        return Summary(counts, records, self._entries, seconds)

    # -- internals ------------------------------------------------------------------------

    def _generate(self, second_ms: int) -> None:
        """Tick every switched-on tracker for one second and file its deliveries."""
        waiting = self._waiting
        while waiting and waiting[0].on_ms < second_ms + 1000:
            self._active.append(waiting.pop(0))
        due, finished = self._due, False
        dumps = orjson.dumps
        for vehicle in self._active:
            imei = vehicle.imei
            for recv, record in vehicle.tick(second_ms):
                record["received_at"] = recv
                item = Entry(recv, imei, dumps(record))
                bucket = due.get(recv // 1000)
                if bucket is None:
                    due[recv // 1000] = [item]
                else:
                    bucket.append(item)
            finished = finished or vehicle.done
        if finished:
            self._active = [v for v in self._active if not v.done]


def _check(config: SimConfig) -> None:
    """Refuse a configuration the generator cannot honour."""
    if not 1 <= config.vehicles <= MAX_VEHICLES:
        raise SimulationError(f"vehicles must be 1..{MAX_VEHICLES}, got {config.vehicles}")
    if not 10 <= config.length_km <= 40:
        raise SimulationError(f"length_km must be 10..40, got {config.length_km}")


def plan_incidents(rng: random.Random, course: Course, rates: FaultRates) -> list[Incidents]:
    """Pick which vehicles get which one-off incident, and where or when.

    Each kind goes to ``ceil(rate * vehicles)`` vehicles; kinds go to different vehicles
    while there are vehicles left, so each incident is visible on its own.
    """
    n = len(course.entries)
    plans = [Incidents() for _ in range(n)]
    pool: list[int] = []
    for name, rate in rates.incidents().items():
        for _ in range(math.ceil(rate * n) if rate > 0 else 0):
            if not pool:
                pool = list(range(n))
                rng.shuffle(pool)
            index = pool.pop()
            _plan_one(rng, course, plans[index], name)
            plans[index].names.append(name)
    return plans


def _plan_one(rng: random.Random, course: Course, plan: Incidents, name: str) -> None:
    """Fill in one incident of ``name`` on ``plan``."""
    lo, hi = course.start_s, course.finish_s
    stage = hi - lo
    # Time-based incidents happen well before even a slow truck can finish.
    horizon_ms = int(stage / (100 / 3.6) * 1000 * 0.6)
    when = rng.randrange(60_000, max(61_000, horizon_ms), 1000)
    if name == "spike":
        plan.spike_ms = when
    elif name == "bad_clock":
        offset = _bad_clock_offset(rng, course.opens_ms)
        plan.bad_clock = (when, when + rng.randrange(30, 120) * 1000, offset)
    elif name == "sos":
        plan.sos_s = lo + rng.uniform(0.2, 0.8) * stage
    elif name == "crash":
        plan.crash_s = lo + rng.uniform(0.2, 0.8) * stage
    elif name == "stopped":
        plan.stop = (lo + rng.uniform(0.2, 0.8) * stage, rng.randrange(240, 480) * 1000)
    elif name == "dnf":
        plan.dnf_s = lo + rng.uniform(0.2, 0.8) * stage
    elif name == "low_battery":
        plan.power_cut_ms = when
    elif name == "speeding" and course.speed_zones():
        plan.speeding_kmh = rng.randrange(25, 50)
    elif name == "missed_waypoint" and course.waypoints:
        plan.missed = rng.choice(
            [w for w in course.waypoints if w.radius_m <= 200] or course.waypoints
        )


def _bad_clock_offset(rng: random.Random, now_ms: int) -> int:
    """How far a broken clock is off: back to 2004 (GPS week rollover) or decades ahead."""
    if rng.random() < 0.5:
        year_2004 = 1_072_915_200_000  # 2004-01-01T00:00:00Z
        return year_2004 + rng.randrange(0, 300) * 86_400_000 - now_ms
    return rng.randrange(20, 40) * 365 * 86_400_000


def _planned_counts(plans: Sequence[Incidents]) -> dict[str, int]:
    """Vehicle-level incidents counted at planning (the tracker-level ones count as they happen)."""
    counts: dict[str, int] = {}
    for plan in plans:
        for name in plan.names:
            if name in ("stopped", "speeding", "missed_waypoint", "dnf"):
                counts[name] = counts.get(name, 0) + 1
    return counts


def _profile(
    course: Course,
    terrain: Terrain,
    klass: str,
    plan: Incidents,
    cache: dict[tuple[str, int], list[float]],
) -> list[float]:
    """The vehicle's speed profile: shared per class unless it speeds through a zone."""
    cls = VEHICLE_CLASSES.get(klass, VEHICLE_CLASSES["T1"])
    margin = -plan.speeding_kmh if plan.speeding_kmh is not None else SPEED_ZONE_MARGIN_KMH
    profile = cache.get((cls.name, margin))
    if profile is None:
        caps = [(z.s0, z.s1, float((z.limit_kmh or 50) - margin)) for z in course.speed_zones()]
        profile = cache[(cls.name, margin)] = speed_profile(course.route, terrain, cls, caps)
    return profile


# -- sinks (thin I/O) ----------------------------------------------------------------------


class Sink(Protocol):
    """Somewhere entries go: a file, a CSV, a Redis Stream."""

    def write(self, entries: Sequence[Entry]) -> None:
        """Take a batch of entries in order."""

    def close(self) -> None:
        """Flush and release."""


class FileSink:
    """JSON lines, one entry per line: ``{"v": "1", "imei": ..., "payload": "<json text>"}``."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out

    def write(self, entries: Sequence[Entry]) -> None:
        """Append the entries as lines."""
        dumps = orjson.dumps
        self._out.write(
            b"".join(
                dumps({"v": CONTRACT_VERSION, "imei": e.imei, "payload": e.payload.decode()})
                + b"\n"
                for e in entries
            )
        )

    def close(self) -> None:
        """Flush the file (the caller owns and closes it)."""
        self._out.flush()


class PositionsCsvSink:
    """The DOMAIN.md ``positions.csv`` of exactly the entries written, for offline replay."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._writer = csv.writer(out, lineterminator="\n")
        self._writer.writerow(POSITIONS_HEADER)

    def write(self, entries: Sequence[Entry]) -> None:
        """One row per entry, times in ms, ``io`` as the contract's JSON object."""
        rows = []
        for e in entries:
            p = orjson.loads(e.payload)
            rows.append(
                (
                    e.imei, p["ts"], p["lat"], p["lon"], p["alt"], p["angle"], p["sat"],
                    p["speed"], p["priority"], p["event_io"], p["received_at"],
                    orjson.dumps(p["io"]).decode(),
                )
            )  # fmt: skip
        self._writer.writerows(rows)

    def close(self) -> None:
        """Flush the file (the caller owns and closes it)."""
        self._out.flush()


class RedisSink:
    """XADD to a stream, pipelined (no transaction) in batches of ``batch_size``.

    The commands are packed here as RESP arrays and sent on one of the client's pooled
    connections, then their replies read back: the same pipeline as ``client.pipeline()``,
    but redis-py's per-command argument handling costs ~8 µs an entry, more than a third
    of what the simulator spends making one, and this costs ~2 µs.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        *,
        batch_size: int = 1_000,
        maxlen: int | None = None,
    ) -> None:
        self._pool = client.connection_pool
        self._batch_size = batch_size
        self._head = xadd_head(stream, maxlen)

    def write(self, entries: Sequence[Entry]) -> None:
        """Append the entries in order, one round trip per batch."""
        conn = self._pool.get_connection()
        try:
            for lo in range(0, len(entries), self._batch_size):
                batch = entries[lo : lo + self._batch_size]
                # redis-py leaves these Connection methods unannotated.
                conn.send_packed_command([pack_xadds(self._head, batch)])  # type: ignore[no-untyped-call]
                for _ in batch:
                    conn.read_response()
        except BaseException:
            # Unread replies would be taken for the answers to the next commands.
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            self._pool.release(conn)

    def close(self) -> None:
        """Nothing is buffered between writes."""


def xadd_head(stream: str, maxlen: int | None = None) -> bytes:
    """RESP of ``XADD stream [MAXLEN ~ n] * v 1 imei``: everything before the IMEI value."""
    args = [b"XADD", stream.encode()]
    if maxlen is not None:
        args += [b"MAXLEN", b"~", str(maxlen).encode()]
    args += [b"*", b"v", CONTRACT_VERSION.encode(), b"imei"]
    body = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    return b"*%d\r\n%s" % (len(args) + 3, body)


def pack_xadds(head: bytes, entries: Iterable[Entry]) -> bytes:
    """One RESP command per entry: ``head``, the IMEI, then the payload field."""
    return b"".join(
        b"%s$%d\r\n%s\r\n$7\r\npayload\r\n$%d\r\n%s\r\n"
        % (head, len(e.imei), e.imei.encode(), len(e.payload), e.payload)
        for e in entries
    )


def write_course(course: Course, path: Path) -> None:
    """Write the course file (JSON) the processor imports."""
    path.write_bytes(orjson.dumps(course.to_file(), option=orjson.OPT_INDENT_2) + b"\n")


def write_devices(course: Course, path: Path, model: str = "FMB920") -> None:
    """Write the devices CSV (``imei,model,label``) of the course's entries."""
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("imei", "model", "label"))
        for e in course.entries:
            writer.writerow((e.imei, model, f"#{e.number} {e.klass} {e.name}"))


# -- driver --------------------------------------------------------------------------------


def run(
    sim: Simulation,
    sinks: Iterable[Sink],
    *,
    speed: float | None,
    until_ms: int | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_batch: Callable[[int, int], None] | None = None,
) -> Summary:
    """Drive ``sim`` into ``sinks``: ``speed`` times real time, or as fast as possible (None).

    Content never depends on the wall clock; only the pacing does. ``on_batch`` is called
    with (simulated ms, entries so far) after each simulated second, e.g. for progress.
    """
    targets = list(sinks)
    began = monotonic()
    sim_began = sim.clock_ms
    written = 0
    try:
        for end_ms, entries in sim.batches(until_ms):
            if speed is not None:
                lag = (end_ms - sim_began) / 1000 / speed - (monotonic() - began)
                if lag > 0:
                    sleep(lag)
            if entries:
                for sink in targets:
                    sink.write(entries)
                written += len(entries)
            if on_batch is not None:
                on_batch(end_ms, written)
    finally:
        for sink in targets:
            sink.close()
    return sim.summary(monotonic() - began)
