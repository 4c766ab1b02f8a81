"""One simulated vehicle and its tracker: motion along the route and 1 Hz FMB920 records.

A :class:`Vehicle` is advanced one second at a time by :meth:`Vehicle.tick`, which
returns the deliveries of that second: ``(received_at_ms, payload_dict)`` pairs, where a
payload is the stream contract v1 record before JSON encoding. Faults live here because
they are things a tracker does (lose coverage, resend, lose the fix, reboot, jump, keep a
wrong clock) or things a crew does (stop, press SOS, crash, retire, speed, miss a
waypoint). Every random draw comes from the vehicle's own generator, so a vehicle
behaves the same whatever the size of the field around it.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Final

from processor.tools.sim_course import Course, Waypoint
from processor.tools.sim_geo import EARTH_RADIUS_M, STEP_M, Route

PREROLL_MS: Final = 60_000  # trackers switch on this long before their start
PARK_AFTER_FINISH_MS: Final = 30_000
STRANDED_MS: Final = 600_000  # a retired or crashed vehicle keeps reporting this long
BACKLOG_PER_S: Final = 50  # records a tracker uploads per second after a coverage gap
CODEC_8E: Final = 142
VIN_EVERY_S: Final = 60
IO_ICCID: Final = "11"
_PER_STEP: Final = 1.0 / STEP_M
_DEG_PER_M: Final = math.degrees(1.0 / EARTH_RADIUS_M)
# Standard normal quantiles: a draw is one lookup by random bits, several times cheaper
# than random.gauss, and as deterministic.
_NORMAL: Final = tuple(NormalDist().inv_cdf((k + 0.5) / 4096) for k in range(4096))


@dataclass(frozen=True, slots=True)
class VehicleClass:
    """Performance envelope of a class: top speed, cornering grip, acceleration, braking."""

    name: str
    vmax_kmh: float
    lateral_ms2: float
    accel_ms2: float
    decel_ms2: float


VEHICLE_CLASSES: Final = {
    "T1": VehicleClass("T1", 170.0, 6.0, 3.5, 6.0),  # rally-raid cars
    "M": VehicleClass("M", 155.0, 5.0, 4.5, 5.5),  # motorcycles
    "T4": VehicleClass("T4", 140.0, 3.0, 1.8, 3.5),  # trucks
}


@dataclass(frozen=True, slots=True)
class FaultRates:
    """How often each fault happens; every rate is a fraction in [0, 1].

    Per record: ``duplicate`` (a delivery is resent), ``no_fix`` (records without a GNSS
    fix, in runs of 3–12; one run in ten follows a reboot, ``lat = lon = 0``). Per
    vehicle-minute on the stage: ``gap`` (a coverage gap of 20–180 s starts). Per vehicle
    (the count is ``ceil(rate * vehicles)``, each on a different vehicle while there are
    enough): the one-off incidents.
    """

    duplicate: float = 0.01
    no_fix: float = 0.01
    gap: float = 0.02
    spike: float = 0.04
    bad_clock: float = 0.02
    sos: float = 0.02
    crash: float = 0.02
    stopped: float = 0.02
    low_battery: float = 0.04
    speeding: float = 0.04
    missed_waypoint: float = 0.04
    dnf: float = 0.04

    def incidents(self) -> dict[str, float]:
        """The per-vehicle incident rates by name."""
        return {
            "spike": self.spike,
            "bad_clock": self.bad_clock,
            "sos": self.sos,
            "crash": self.crash,
            "stopped": self.stopped,
            "low_battery": self.low_battery,
            "speeding": self.speeding,
            "missed_waypoint": self.missed_waypoint,
            "dnf": self.dnf,
        }


@dataclass(slots=True)
class Incidents:
    """The one-off incidents planned for one vehicle (times are ms since its start)."""

    spike_ms: int | None = None
    bad_clock: tuple[int, int, int] | None = None  # from, until, clock offset
    sos_s: float | None = None
    crash_s: float | None = None
    stop: tuple[float, int] | None = None  # route distance, duration ms
    dnf_s: float | None = None
    power_cut_ms: int | None = None
    speeding_kmh: int | None = None
    missed: Waypoint | None = None
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Terrain:
    """Course-wide surface: a speed cap (m/s) and an altitude (m) at every route vertex."""

    caps: list[float]
    altitudes: list[float]


def make_terrain(rng: random.Random, route: Route) -> Terrain:
    """Sections of 0.5–3 km with a surface speed cap, and rolling altitude."""
    n = len(route.xs)
    caps: list[float] = []
    while len(caps) < n:
        cap = rng.uniform(70.0, 190.0) / 3.6
        caps.extend([cap] * int(rng.uniform(500, 3000) / STEP_M))
    waves = [(rng.uniform(15, 70), rng.uniform(1500, 9000), rng.uniform(0, 6.3)) for _ in range(3)]
    base = rng.uniform(650, 900)
    alts = [
        base + sum(a * math.sin(2 * math.pi * i * STEP_M / w + p) for a, w, p in waves)
        for i in range(n)
    ]
    return Terrain(caps[:n], alts)


def speed_profile(
    route: Route,
    terrain: Terrain,
    klass: VehicleClass,
    zone_caps: Sequence[tuple[float, float, float]],
) -> list[float]:
    """Fastest speed (m/s) at each vertex: class, surface, corner grip and zone limits,
    then smoothed so that reaching it never needs more than the class can accelerate or
    brake."""
    vmax = klass.vmax_kmh / 3.6
    v = [
        min(vmax, cap, math.sqrt(klass.lateral_ms2 * r))
        for cap, r in zip(terrain.caps, route.radii, strict=True)
    ]
    for s0, s1, cap_kmh in zone_caps:
        # Slow down before the zone boundary, not on it: GPS noise moves fixes by metres.
        for i in range(route.index(s0 - 40), route.index(s1 + 40) + 1):
            v[i] = min(v[i], cap_kmh / 3.6)
    up, down = 2 * klass.accel_ms2 * STEP_M, 2 * klass.decel_ms2 * STEP_M
    for i in range(1, len(v)):
        v[i] = min(v[i], math.sqrt(v[i - 1] ** 2 + up))
    for i in range(len(v) - 2, -1, -1):
        v[i] = min(v[i], math.sqrt(v[i + 1] ** 2 + down))
    return v


@dataclass(frozen=True, slots=True)
class Tracker:
    """Static identity and calibration of one tracker."""

    imei: str
    iccid: int
    vin: bytes
    odometer_m: int
    cell: int
    phase_ms: int

    @classmethod
    def draw(cls, rng: random.Random, imei: str) -> Tracker:
        """A tracker with a SIM, a vehicle VIN, some kilometres behind it and a 1 Hz phase."""
        return cls(
            imei=imei,
            iccid=8_921_200_000_000_000_000 + rng.randrange(10**14),
            vin=f"VF1SIM{rng.randrange(10**11):011d}".encode(),
            odometer_m=rng.randrange(5_000_000, 200_000_000),
            cell=rng.randrange(10_000, 60_000),
            phase_ms=rng.randrange(0, 1000, 10),
        )


class Vehicle:
    """A competitor driving the stage; :meth:`tick` moves it 1 s and returns deliveries."""

    def __init__(
        self,
        index: int,
        course: Course,
        terrain: Terrain,
        profile: list[float],
        rng: random.Random,
        rates: FaultRates,
        incidents: Incidents,
    ) -> None:
        entry = course.entries[index]
        self.index = index
        self.imei = entry.imei
        self.klass = VEHICLE_CLASSES.get(entry.klass, VEHICLE_CLASSES["T1"])
        self.route, self.terrain, self.profile = course.route, terrain, profile
        self.plane = course.plane
        self.rng, self.rates, self.incidents = rng, rates, incidents
        self.start_ms = entry.start_ms
        self.on_ms = entry.start_ms - PREROLL_MS
        self.tracker = Tracker.draw(rng, entry.imei)
        self.skill = rng.uniform(0.82, 1.0)
        self.lane = rng.uniform(-2.5, 2.5)
        self.end_s = course.route.length - 20.0
        self.s = course.start_s - 30.0 - rng.uniform(0, 15)
        self.v = 0.0
        self.pace = 0.0
        self.ex = self.ey = 0.0
        self.bits = rng.getrandbits
        self.last_index = len(course.route.xs) - 1
        self.brake2 = 2 * self.klass.decel_ms2
        self.lon_per_m = _DEG_PER_M / math.cos(math.radians(course.plane.lat0))
        self.records = 0
        self.last_recv = 0
        self.vin_sentinel = {"$bytes": base64.b64encode(self.tracker.vin).decode("ascii")}
        self.io_template = self._template()
        self.stops = self._planned_stops()
        self.halt_until: int | None = None  # ms; None = not halted
        self.off_at: int | None = None  # ms when the ignition goes off for good
        self.done = False
        self.last_fix: dict[str, Any] | None = None
        # A run of mean length L starting with probability q per record covers a share
        # qL / (1 + qL) of the records; solving that for the no-fix rate gives q.
        self.no_fix_q = rates.no_fix / (7.5 * (1.0 - min(rates.no_fix, 0.9)))
        self.gap_q = rates.gap / 60.0  # the gap rate is per minute on the stage
        self.dup_rate = rates.duplicate
        self.angle = 0
        self.no_fix_left = 0
        self.rebooted = False
        self.gap_until: int | None = None
        self.backlog: list[dict[str, Any]] = []
        self.trip_m = 0.0
        self.slow = _SlowState()
        self.counts: dict[str, int] = {}
        self.sos_press_ms = -1

    def _template(self) -> dict[str, Any]:
        """The IO elements in the order every record carries them, at their resting values."""
        return {
            "239": 1, "240": 0, "80": 0, "21": 0, "200": 0, "69": 1, "181": 0, "182": 0,
            "66": 0, "67": 0, "68": 0, "24": 0, "205": 0, "206": 2_210, "241": 60_401,
            "16": 0, "199": 0, "113": 100, "1": 0, "17": 0, "18": 0, "19": 0, "252": 0,
            "318": 0, IO_ICCID: {"$bigint": str(self.tracker.iccid)},
        }  # fmt: skip

    # -- planning -----------------------------------------------------------------------

    def _planned_stops(self) -> list[tuple[float, str]]:
        """Where the vehicle will come to a halt, in route order, and why."""
        inc = self.incidents
        stops: list[tuple[float, str]] = [(self.end_s, "parked")]
        for s, why in ((inc.sos_s, "sos"), (inc.dnf_s, "dnf")):
            if s is not None:
                stops.append((s, why))
        if inc.stop is not None:
            stops.append((inc.stop[0], "stopped"))
        return sorted(stops)

    # -- the second-by-second loop --------------------------------------------------------

    def tick(self, second_ms: int) -> list[tuple[int, dict[str, Any]]]:
        """Advance to ``second_ms`` (a whole simulated second) and return its deliveries."""
        t = second_ms + self.tracker.phase_ms
        if self.done or t < self.on_ms:
            return []
        event = self._move(t)
        if self.off_at is not None and t >= self.off_at:
            self.done = True
            event = "ignition_off"
        record = self._record(t, event)
        return self._deliver(t, record)

    def _move(self, t: int) -> str | None:
        """Move one second; the name of a notable event of this second, if any."""
        if self.halt_until is not None:
            if t < self.halt_until:
                self.v = 0.0
                return "sos" if t == self.sos_press_ms else None
            self.halt_until = None
        if t < self.start_ms or self.off_at is not None:
            self.v = 0.0
            return None
        event = self._drive(t)
        cut = self.incidents.power_cut_ms
        if event is None and cut is not None and t - self.start_ms >= cut:
            self.incidents.power_cut_ms = None
            self.slow.power_cut_at = t
            self._count("low_battery")
            return "power_cut"
        return event

    def _drive(self, t: int) -> str | None:
        """Follow the speed profile (scaled by skill and pace) towards the next stop."""
        v, s, profile, last = self.v, self.s, self.profile, self.last_index
        self.pace = pace = 0.9 * self.pace + 0.012 * _NORMAL[self.bits(12)]
        i, j = int(s * _PER_STEP), int((s + v) * _PER_STEP)
        base = min(profile[min(i, last)], profile[min(j, last)])
        # Pace and skill only ever slow a crew down: the profile already holds every limit.
        target = min(base, base * self.skill * (1.0 + pace))
        stop_s, why = self.stops[0]
        target = min(target, math.sqrt(self.brake2 * max(0.0, stop_s - s)))
        klass = self.klass
        if target > v:
            new_v = min(target, v + klass.accel_ms2)
        else:
            new_v = max(target, v - 1.5 * klass.decel_ms2)
        step = (v + new_v) / 2
        crash_s = self.incidents.crash_s
        if crash_s is not None and s < crash_s <= s + step:
            self.s, self.v = crash_s, 0.0
            self.stops = [(crash_s, "crash")]
            self._halt_for_good(t)
            return "crash"
        self.s, self.v = s + step, new_v
        self.trip_m += step
        if stop_s - self.s < 1.0 or (new_v < 0.5 and stop_s - self.s < 5.0):
            return self._halt(t, why)
        return None

    def _halt(self, t: int, why: str) -> str | None:
        """Come to rest at the next planned stop and decide for how long."""
        self.s, self.v = self.stops[0][0], 0.0
        self.stops.pop(0)
        if why in ("parked", "dnf"):
            self._halt_for_good(t, PARK_AFTER_FINISH_MS if why == "parked" else STRANDED_MS)
        elif why == "stopped" and self.incidents.stop is not None:
            self.halt_until = t + self.incidents.stop[1]
        elif why == "sos":
            self.halt_until = t + self.rng.randrange(60_000, 150_000, 1000)
            self.sos_press_ms = t + 5_000
        return None

    def _halt_for_good(self, t: int, for_ms: int = STRANDED_MS) -> None:
        self.halt_until = t + for_ms + 3_600_000
        self.off_at = t + for_ms

    # -- the record -----------------------------------------------------------------------

    def _position(self) -> tuple[float, float, int]:
        """True position plus correlated GNSS noise (a few metres), and the route vertex."""
        route, s = self.route, self.s
        lateral = self.lane
        missed = self.incidents.missed
        if missed is not None and abs(s - missed.s) < 400.0:
            bump = 0.5 * (1.0 + math.cos(math.pi * (s - missed.s) / 400.0))
            lateral += bump * (missed.radius_m + 120.0)
        i = min(int(s * _PER_STEP), self.last_index - 1)
        f = s * _PER_STEP - i
        xs, ys = route.xs, route.ys
        bits = self.bits
        self.ex = ex = 0.85 * self.ex + 1.3 * _NORMAL[bits(12)]
        self.ey = ey = 0.85 * self.ey + 1.3 * _NORMAL[bits(12)]
        x = xs[i] + f * (xs[i + 1] - xs[i]) + lateral * route.nx[i] + ex
        y = ys[i] + f * (ys[i + 1] - ys[i]) + lateral * route.ny[i] + ey
        return x, y, i

    def _record(self, t: int, event: str | None) -> dict[str, Any]:
        """The record the tracker logs at ``t`` (true time), faults applied."""
        self.records += 1
        x, y, i = self._position()
        if self.incidents.spike_ms is not None and t - self.start_ms >= self.incidents.spike_ms:
            x, y = self._spike(x, y)
        plane = self.plane
        lat = plane.lat0 + y * _DEG_PER_M
        lon = plane.lon0 + x * self.lon_per_m
        v = self.v
        speed = int(v * 3.6 + self.pace * 20 + 0.5) if v > 0.4 else 0
        if speed > 0:
            self.angle = int(self.route.headings[i] + self.ey + 360.5) % 360
        slow = self.slow
        if t >= slow.next_ms or slow.power_cut_at is not None:
            slow.refresh(self.rng, t)
        record: dict[str, Any] = {
            "codec": CODEC_8E,
            "ts": t,
            "received_at": 0,
            "priority": 0,
            "lat": round(lat, 7),
            "lon": round(lon, 7),
            "alt": int(self.terrain.altitudes[i] + self.ex + 0.5),
            "angle": self.angle,
            "sat": slow.sat,
            "speed": speed,
            "event_io": 0,
            "generation": None,
            "io": self._io(t, speed, i, slow),
        }
        if event is not None:
            self._apply_event(record, event)
        if self.no_fix_left or self.rng.random() < self.no_fix_q:
            self._no_fix(record)
        else:
            self.last_fix = record
        if self.incidents.bad_clock is not None:
            self._apply_clock(record, t)
        return record

    def _spike(self, x: float, y: float) -> tuple[float, float]:
        """Throw this one fix kilometres away (a multipath or receiver glitch)."""
        self.incidents.spike_ms = None
        self._count("spike")
        bearing = self.rng.uniform(0, 2 * math.pi)
        jump = self.rng.uniform(3000, 8000)
        return x + jump * math.sin(bearing), y + jump * math.cos(bearing)

    def _io(self, t: int, speed: int, i: int, slow: _SlowState) -> dict[str, Any]:
        """The FMB920 IO set of one record (unsigned wire values, sentinels for 8 bytes)."""
        io = self.io_template.copy()
        moving = 1 if speed > 0 else 0
        battery = slow.battery_pct
        v = self.v
        lateral_mg = min(1500, int(v * v / self.route.radii[i] * 101.9))
        second = t // 1000
        io["240"] = moving
        io["80"] = moving
        io["21"] = 0 if self.gap_until is not None else slow.gsm
        io["181"] = slow.pdop
        io["182"] = slow.hdop
        io["66"] = slow.external_mv
        io["67"] = 3_500 + battery * 7
        io["68"] = slow.current_ma
        io["24"] = speed
        io["205"] = self.tracker.cell + int(self.s / 3000)
        io["16"] = self.tracker.odometer_m + int(self.trip_m)
        io["199"] = int(self.trip_m)
        io["113"] = battery
        io["17"] = int(self.pace * 800) & 0xFFFF
        io["18"] = lateral_mg
        io["19"] = (-1000 + (second * 7919 + self.index * 31) % 41 - 20) & 0xFFFF
        if slow.power_cut_at is not None:
            io["252"] = 1
        if second % VIN_EVERY_S == 0:
            io["256"] = self.vin_sentinel
        return io

    def _apply_event(self, record: dict[str, Any], event: str | None) -> None:
        """Mark the record of a notable event: priority, trigger IO, the IO's value."""
        if event is None:
            return
        io = record["io"]
        if event == "sos":
            record["priority"], record["event_io"], io["1"] = 2, 1, 1
            self._count("sos")
        elif event == "crash":
            record["priority"], record["event_io"], io["247"] = 1, 247, 1
            self._count("crash")
        elif event == "power_cut":
            record["priority"], record["event_io"], io["252"], io["66"] = 1, 252, 1, 0
        elif event == "ignition_off":
            record["priority"], record["event_io"], io["239"], io["240"] = 1, 239, 0, 0
            io["66"] = 12_450  # engine off: the vehicle battery alone

    def _no_fix(self, record: dict[str, Any]) -> None:
        """Turn the record into a no-fix one: last coordinates (0, 0 after a reboot), sat 0."""
        if self.no_fix_left == 0:
            self.no_fix_left = self.rng.randint(3, 12)
            self.rebooted = self.rng.random() < 0.1
            if self.rebooted:
                self._count("reboot")
        self.no_fix_left -= 1
        self._count("no_fix")
        last = self.last_fix
        if self.rebooted or last is None:
            lat, lon, alt = 0.0, 0.0, 0
        else:
            lat, lon, alt = last["lat"], last["lon"], last["alt"]
        record.update(lat=lat, lon=lon, alt=alt, sat=0, speed=0, angle=0)
        io = record["io"]
        io["69"], io["181"], io["182"], io["24"] = 2, 0, 0, 0

    def _apply_clock(self, record: dict[str, Any], t: int) -> None:
        """Shift ``ts`` while the tracker's clock is wrong."""
        bad = self.incidents.bad_clock
        if bad is not None and bad[0] <= t - self.start_ms < bad[1]:
            record["ts"] = t + bad[2]
            self._count("bad_clock")

    # -- delivery -------------------------------------------------------------------------

    def _deliver(self, t: int, record: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """When the record (and any backlog) reaches ingestion: now, later or twice."""
        rnd = self.rng.random
        if self.gap_until is not None:
            if t < self.gap_until and not self.done:
                self.backlog.append(record)
                return []
            self.gap_until = None
        elif t >= self.start_ms and self.off_at is None and rnd() < self.gap_q:
            self.gap_until = t + self.rng.randrange(20, 181) * 1000
            self._count("gaps")
            self.backlog.append(record)
            return []
        # One TCP connection per tracker: live records arrive in the order they were logged.
        recv = max(t + 250 + int(rnd() * 1550), self.last_recv + 5)
        self.last_recv = recv
        out = [(recv, record)]
        if self.backlog:
            out += self._backlog(t)
        dup_rate = self.dup_rate
        if dup_rate > 0:
            for recv, rec in out[:]:
                if rnd() < dup_rate:
                    out.append((recv + 2_000 + int(rnd() * 28_000), rec))
                    self._count("duplicates")
        return out

    def _backlog(self, t: int) -> list[tuple[int, dict[str, Any]]]:
        """Records logged during a gap, uploaded newest first once coverage is back."""
        rnd = self.rng.random
        out = [
            (t + 1000 + (n // BACKLOG_PER_S) * 1000 + int(rnd() * 900), old)
            for n, old in enumerate(reversed(self.backlog))
        ]
        self._count("backlog", len(self.backlog))
        self.backlog = []
        return out

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


class _SlowState:
    """Tracker values that drift slowly: refreshed every 10 s to keep records cheap."""

    __slots__ = (
        "battery_pct",
        "current_ma",
        "external_mv",
        "gsm",
        "hdop",
        "next_ms",
        "pdop",
        "power_cut_at",
        "sat",
    )

    def __init__(self) -> None:
        self.next_ms = 0
        self.sat = 10
        self.gsm = 4
        self.hdop = 9
        self.pdop = 13
        self.external_mv = 14_100
        self.current_ma = 0
        self.battery_pct = 100
        self.power_cut_at: int | None = None

    def refresh(self, rng: random.Random, t: int) -> _SlowState:
        """Draw new slow values when their 10 s are up; battery drains after a power cut."""
        if self.power_cut_at is not None:
            # Internal battery only: one percent every 12 s from 32 %, down to 3 %.
            self.battery_pct = max(3, 32 - (t - self.power_cut_at) // 12_000)
            self.external_mv = 0
            self.current_ma = 120
        if t < self.next_ms:
            return self
        self.next_ms = t + 10_000
        self.sat = rng.randint(7, 15)
        self.gsm = rng.randint(2, 5)
        self.hdop = rng.randint(6, 14)
        self.pdop = self.hdop + rng.randint(3, 7)
        if self.power_cut_at is None:
            self.external_mv = rng.randint(13_800, 14_400)
            self.current_ma = rng.randint(0, 25)
        return self
