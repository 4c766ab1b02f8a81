"""Gateway fan-out: thousands of WebSocket clients on loopback, latency publish → client.

Run from the repository root (Redis on 127.0.0.1:6379)::

    python -m benchmarks.gateway_bench [--clients 5000] [--duration 30]

Processes: this one publishes through :class:`LivePublisher` like the processor does
after each commit (positions of ``--vehicles`` entries at 1 Hz each, spread over commits
every ``--commit-ms``; a full stage leaderboard every ``--leaderboard-s``); the gateway
runs as ``processor gateway`` in a process of its own; clients are split over
``--client-procs`` processes, each client subscribed to the stage leaderboard and the
event's positions. Latency is the client's receive time minus the update's
``published_at`` (same machine, same clock). The same-run reference is one client alone
under the same publishing load. Everything is loopback-only and bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import psutil
import redis.asyncio as aioredis

from benchmarks.common import percentile
from processor.adapters.live import LivePublisher

REDIS_URL = os.environ.get("PROCESSOR_REDIS_URL", "redis://127.0.0.1:6379/0")
TARGET_P99_MS = 250.0
HIST_MAX_MS = 10_000
CONNECT_CONCURRENCY = 200
PHASE_TIMEOUT_S = 180.0


def raise_fd_limit() -> int:
    """Raise the open-files soft limit to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---- client processes ----------------------------------------------------------------------


@dataclass
class ClientStats:
    """What one client process measured."""

    hist: list[int] = field(default_factory=lambda: [0] * (HIST_MAX_MS + 1))
    connected: int = 0
    snapshots: int = 0
    updates: int = 0
    closed: int = 0
    failed: int = 0
    measuring: bool = False


def _published_at(frame: bytes) -> int | None:
    """The ``published_at`` of an update frame, found without parsing the whole frame."""
    at = frame.find(b'"published_at":', 0, 200)
    if at < 0:
        return None
    start = at + len(b'"published_at":')
    end = frame.index(b",", start)
    return int(frame[start:end])


async def _client(url: str, channels: list[str], stats: ClientStats, gate: asyncio.Semaphore):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with gate:
        error: Exception | None = None
        for attempt in range(5):
            try:
                ws = await connect(url, compression=None, max_size=2**24, open_timeout=60)
                break
            except Exception as exc:  # noqa: BLE001 - any failure counts as a failed client
                error = exc
                await asyncio.sleep(0.2 * (attempt + 1))
        else:
            stats.failed += 1
            if stats.failed <= 3:
                print(f"client failed to connect: {error!r}", file=sys.stderr)
            return
        for channel in channels:
            await ws.send(orjson.dumps({"type": "subscribe", "channel": channel}).decode())
    stats.connected += 1
    try:
        while True:
            frame = await ws.recv(decode=False)
            published = _published_at(frame) if frame.startswith(b'{"type":"update"') else None
            if published is None:
                stats.snapshots += frame.startswith(b'{"type":"snapshot"')
                continue
            stats.updates += 1
            if stats.measuring:
                delay = int(time.time() * 1000) - published
                stats.hist[min(max(delay, 0), HIST_MAX_MS)] += 1
    except ConnectionClosed:
        stats.closed += 1


def _read_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(commands.put_nowait, line.strip())


async def clients_main(port: int, count: int, channels: list[str]) -> None:
    """Open ``count`` clients; report readiness, then measure on the parent's command."""
    raise_fd_limit()
    stats = ClientStats()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=_read_commands, args=(loop, commands), daemon=True).start()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    url = f"ws://127.0.0.1:{port}/ws"
    tasks = [asyncio.create_task(_client(url, channels, stats, gate)) for _ in range(count)]
    await _wait_connected(stats, count, len(channels))
    _emit({"ready": stats.connected, "failed": stats.failed})
    while (command := await commands.get()) != "report":
        if command == "measure":
            stats.hist = [0] * (HIST_MAX_MS + 1)
            stats.updates = 0
            stats.measuring = True
    stats.measuring = False
    hist = {str(ms): n for ms, n in _sparse(stats.hist).items()}
    _emit({"hist": hist, "updates": stats.updates, "closed": stats.closed})
    for task in tasks:
        task.cancel()


async def _wait_connected(stats: ClientStats, count: int, per_client: int) -> None:
    """Until every client is connected (or failed) and has its snapshots, bounded in time."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    last_report = time.monotonic()
    while time.monotonic() < deadline:
        if stats.connected + stats.failed >= count and stats.snapshots >= (
            stats.connected * per_client
        ):
            return
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            print(
                f"clients {os.getpid()}: connected {stats.connected}/{count}, failed "
                f"{stats.failed}, snapshots {stats.snapshots}",
                file=sys.stderr,
            )
        await asyncio.sleep(0.1)


def _sparse(hist: list[int]) -> dict[int, int]:
    return {ms: n for ms, n in enumerate(hist) if n}


def _emit(value: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


# ---- publisher -------------------------------------------------------------------------------


def _vehicle_row(i: int, t: float) -> dict[str, Any]:
    angle = (t / 600 + i / 200) * 2 * math.pi
    return {
        "number": str(i + 1),
        "imei": f"35630704{i:07d}",
        "ts": int(t * 1000),
        "lat": round(45.8 + 0.05 * math.sin(angle), 7),
        "lon": round(15.9 + 0.08 * math.cos(angle), 7),
        "speed": 60 + i % 70,
        "angle": int(math.degrees(angle)) % 360,
    }


def _leaderboard(vehicles: int, t: float) -> list[dict[str, Any]]:
    order = sorted(range(vehicles), key=lambda i: (i * 7919 + int(t)) % vehicles)
    rows = []
    for rank, i in enumerate(order, start=1):
        total = 600_000 + rank * 1_250
        rows.append(
            {
                "rank": rank,
                "number": str(i + 1),
                "name": f"Driver {i + 1} / Co-driver {i + 1}",
                "class": ("T1", "T2", "T3")[i % 3],
                "status": "finished",
                "splits": [
                    {"name": "WP1", "ts": int(t * 1000), "elapsed_ms": total // 3},
                    {"name": "WP2", "ts": int(t * 1000), "elapsed_ms": 2 * total // 3},
                ],
                "start_ts": int(t * 1000) - total,
                "finish_ts": int(t * 1000),
                "elapsed_ms": total,
                "penalty_ms": 0,
                "total_ms": total,
                "gap_ms": total - 601_250,
                "class_rank": rank,
                "last_split": "WP2",
            }
        )
    return rows


async def publish_forever(publisher: LivePublisher, args: argparse.Namespace) -> None:
    """Publish positions per commit and the leaderboard periodically, until cancelled."""
    slots = max(1, round(1000 / args.commit_ms))
    tick, next_board = 0, time.monotonic()
    start = time.monotonic()
    while True:
        now = time.time()
        slot = tick % slots
        rows = [_vehicle_row(i, now) for i in range(args.vehicles) if i % slots == slot]
        await publisher.publish_positions(1, rows)
        if time.monotonic() >= next_board:
            await publisher.publish_leaderboard(1, _leaderboard(args.vehicles, now))
            next_board += args.leaderboard_s
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * args.commit_ms / 1000 - time.monotonic()))


# ---- orchestration ---------------------------------------------------------------------------


@dataclass
class Phase:
    """The figures of one measured phase."""

    name: str
    clients: int
    latencies: dict[int, int]
    updates: int
    closed: int
    seconds: float
    gateway_cpu: float
    total_cpu: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_gateway(port: int, prefix: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PROCESSOR_REDIS_URL": REDIS_URL,
        "PROCESSOR_LIVE_PREFIX": prefix,
        "PROCESSOR_GATEWAY_HOST": "127.0.0.1",
        "PROCESSOR_GATEWAY_PORT": str(port),
        "PROCESSOR_GATEWAY_CONNECT_RATE_PER_S": "1000000",
        "PROCESSOR_GATEWAY_CONNECT_BURST": "1000000",
        "PROCESSOR_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "processor", "gateway"]
    gateway = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return gateway
        time.sleep(0.2)
    gateway.kill()
    raise RuntimeError("gateway did not start")


class ClientProcs:
    """Client processes driven over stdin/stdout with JSON lines."""

    def __init__(self, port: int, counts: list[int], channels: list[str]) -> None:
        cmd = [sys.executable, "-m", "benchmarks.gateway_bench", "--role", "clients"]
        self.procs = [
            subprocess.Popen(
                [*cmd, "--port", str(port), "--count", str(n), "--channels", ",".join(channels)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for n in counts
        ]

    async def wait_ready(self) -> int:
        answers = await asyncio.gather(*(self._line(p) for p in self.procs))
        return sum(int(a["ready"]) for a in answers)

    def command(self, text: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()

    async def report(self) -> list[dict[str, Any]]:
        self.command("report")
        return list(await asyncio.gather(*(self._line(p) for p in self.procs)))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()

    @staticmethod
    async def _line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), PHASE_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"client process {proc.pid} ended early")
        answer: dict[str, Any] = orjson.loads(line)
        return answer


async def measure(
    name: str, clients: ClientProcs, gateway: psutil.Process, seconds: float
) -> Phase:
    ready = await clients.wait_ready()
    others = [psutil.Process(pid) for pid in clients.pids()]
    before = _cpu(gateway), sum(_cpu(p) for p in others), time.monotonic()
    clients.command("measure")
    await asyncio.sleep(seconds)
    reports = await clients.report()
    elapsed = time.monotonic() - before[2]
    merged: dict[int, int] = {}
    for report in reports:
        for ms, n in report["hist"].items():
            merged[int(ms)] = merged.get(int(ms), 0) + n
    gateway_cpu = (_cpu(gateway) - before[0]) / elapsed * 100
    total = (_cpu(gateway) + sum(_cpu(p) for p in others) - before[0] - before[1]) / elapsed
    return Phase(
        name,
        ready,
        merged,
        sum(r["updates"] for r in reports),
        sum(r["closed"] for r in reports),
        elapsed,
        gateway_cpu,
        total * 100,
    )


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _expand(hist: dict[int, int]) -> list[int]:
    values: list[int] = []
    for ms in sorted(hist):
        values.extend([ms] * hist[ms])
    return values


def print_phases(phases: list[Phase], args: argparse.Namespace) -> None:
    print(
        f"gateway fan-out: {args.vehicles} vehicles at 1 Hz (commits every {args.commit_ms} ms),"
        f" stage leaderboard every {args.leaderboard_s} s; {os.cpu_count()} CPUs"
    )
    header = (
        f"{'phase':<10} {'clients':>7} {'frames':>9} {'frames/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'gw CPU%':>8} {'gw+cl CPU%':>10} {'closed':>6}"
    )
    print(header)
    for phase in phases:
        values = _expand(phase.latencies)
        p50 = percentile(values, 50) if values else float("nan")
        p99 = percentile(values, 99) if values else float("nan")
        worst = max(values) if values else float("nan")
        print(
            f"{phase.name:<10} {phase.clients:>7} {phase.updates:>9} "
            f"{phase.updates / phase.seconds:>9.0f} {p50:>7.0f} {p99:>7.0f} {worst:>7.0f} "
            f"{phase.gateway_cpu:>8.0f} {phase.total_cpu:>10.0f} {phase.closed:>6}"
        )
    load = _expand(phases[-1].latencies)
    p99 = percentile(load, 99) if load else float("inf")
    verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
    print(f"target: p99 <= {TARGET_P99_MS:.0f} ms with {phases[-1].clients} clients: {verdict}")


async def orchestrate(args: argparse.Namespace) -> None:
    limit = raise_fd_limit()
    print(f"open-files limit {limit}")
    prefix = f"bench:{uuid.uuid4().hex[:8]}:live"
    port = _free_port()
    redis = aioredis.Redis.from_url(REDIS_URL)
    gateway = start_gateway(port, prefix)
    channels = ["stage:1:leaderboard", "event:1:positions"]
    publisher_task = asyncio.create_task(publish_forever(LivePublisher(redis, prefix), args))
    phases: list[Phase] = []
    try:
        gw = psutil.Process(gateway.pid)
        reference = ClientProcs(port, [1], channels)
        phases.append(await measure("reference", reference, gw, args.reference_s))
        reference.stop()
        share = args.clients // args.client_procs
        counts = [share] * (args.client_procs - 1) + [args.clients - share * (args.client_procs - 1)]
        started = time.monotonic()
        load = ClientProcs(port, counts, channels)
        phase = await measure("load", load, gw, args.duration)
        print(f"connected {phase.clients} clients in {time.monotonic() - started - phase.seconds:.1f} s")
        phases.append(phase)
        load.stop()
    finally:
        publisher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher_task
        gateway.terminate()
        gateway.wait(timeout=30)
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    print_phases(phases, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=5_000)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--vehicles", type=int, default=200)
    parser.add_argument("--commit-ms", type=int, default=200)
    parser.add_argument("--leaderboard-s", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--reference-s", type=float, default=5.0)
    parser.add_argument("--role", choices=["orchestrate", "clients"], default="orchestrate")
    parser.add_argument("--port", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--channels", default="")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.role == "clients":
        asyncio.run(clients_main(args.port, args.count, args.channels.split(",")))
    else:
        asyncio.run(asyncio.wait_for(orchestrate(args), timeout=600))


if __name__ == "__main__":
    main()
