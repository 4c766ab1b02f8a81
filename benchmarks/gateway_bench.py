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
import base64
import contextlib
import gc
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
import zlib
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

    hists: dict[str, list[int]] = field(default_factory=dict)
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


class LeanClient(asyncio.Protocol):
    """A minimal RFC 6455 client: handshake, frame boundaries, pong, nothing more.

    Thousands of clients share a process here, so each must cost little per frame: only
    the first bytes of an update are inflated to read ``published_at``; the rest of the
    frame is skipped. (The tests use the full ``websockets`` client.)
    """

    def __init__(self, stats: ClientStats, channels: list[str], compression: bool) -> None:
        self.stats, self.channels, self.compression = stats, channels, compression
        self.buffer = bytearray()
        self.handshaken = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        extensions = (
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            if self.compression
            else ""
        )
        transport.write(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extensions}\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:12])
            del self.buffer[: end + 4]
            if not status.endswith(b"101"):
                self.handshaken.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self.upgraded = True
            for channel in self.channels:
                self._send(1, orjson.dumps({"type": "subscribe", "channel": channel}))
            self.handshaken.set_result(None)
        self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        if not self.handshaken.done():
            self.handshaken.set_exception(exc or ConnectionError("closed"))

    def _frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            first, length = buffer[0], buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                return
            head = bytes(buffer[offset : offset + min(length, 256)])
            self._frame(
                first, head, bytes(buffer[offset : offset + length]) if first & 0x40 else b""
            )
            del buffer[: offset + length]

    def _frame(self, first: int, head: bytes, whole: bytes) -> None:
        opcode = first & 0x0F
        if opcode == 0x9:  # ping: answer with the same payload
            self._send(0xA, head)
            return
        if opcode != 0x1:
            return
        text = zlib.decompressobj(-15).decompress(whole, 200) if first & 0x40 else head
        if text.startswith(b'{"type":"snapshot"'):
            self.stats.snapshots += 1
            return
        published = _published_at(text) if text.startswith(b'{"type":"update"') else None
        if published is None:
            return
        self.stats.updates += 1
        if self.stats.measuring:
            delay = int(time.time() * 1000) - published
            kind = "leaderboard" if b":leaderboard" in text[:80] else "positions"
            hist = self.stats.hists.setdefault(kind, [0] * (HIST_MAX_MS + 1))
            hist[min(max(delay, 0), HIST_MAX_MS)] += 1

    def _send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header = (
            bytes([0x80 | opcode, 0x80 | len(payload)])
            if len(payload) < 126
            else (bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big"))
        )
        self.transport.write(header + mask + masked)


async def _client(
    port: int, channels: list[str], stats: ClientStats, gate: asyncio.Semaphore, compression: bool
) -> asyncio.Transport | None:
    loop = asyncio.get_running_loop()
    error: Exception | None = None
    async with gate:
        for attempt in range(5):
            try:
                transport, protocol = await loop.create_connection(
                    lambda: LeanClient(stats, channels, compression), "127.0.0.1", port
                )
                await asyncio.wait_for(protocol.handshaken, 60)
                stats.connected += 1
                return transport
            except Exception as exc:  # noqa: BLE001 - any failure counts as a failed client
                error = exc
                await asyncio.sleep(0.2 * (attempt + 1))
    stats.failed += 1
    if stats.failed <= 3:
        print(f"client failed to connect: {error!r}", file=sys.stderr)
    return None


def _read_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(commands.put_nowait, line.strip())


async def clients_main(port: int, count: int, channels: list[str], compression: bool) -> None:
    """Open ``count`` clients; report readiness, then measure on the parent's command."""
    raise_fd_limit()
    # The harness's own garbage-collection pauses would count as delivery latency.
    gc.disable()
    stats = ClientStats()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=_read_commands, args=(loop, commands), daemon=True).start()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tasks = [
        asyncio.create_task(_client(port, channels, stats, gate, compression)) for _ in range(count)
    ]
    await _wait_connected(stats, count, len(channels))
    _emit({"ready": stats.connected, "failed": stats.failed})
    while (command := await commands.get()) != "report":
        if command == "measure":
            stats.hists = {}
            stats.updates = 0
            stats.measuring = True
    stats.measuring = False
    hists = {kind: _sparse(hist) for kind, hist in stats.hists.items()}
    _emit({"hists": hists, "updates": stats.updates, "closed": stats.closed})
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


def _sparse(hist: list[int]) -> dict[str, int]:
    return {str(ms): n for ms, n in enumerate(hist) if n}


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
    latencies: dict[str, dict[int, int]]
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


def start_gateway(port: int, prefix: str, shared: bool) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PROCESSOR_REDIS_URL": REDIS_URL,
        "PROCESSOR_LIVE_PREFIX": prefix,
        "PROCESSOR_GATEWAY_HOST": "127.0.0.1",
        "PROCESSOR_GATEWAY_PORT": str(port),
        "PROCESSOR_GATEWAY_CONNECT_RATE_PER_S": "1000000",
        "PROCESSOR_GATEWAY_CONNECT_BURST": "1000000",
        "PROCESSOR_LOG_LEVEL": "warning",
        "PROCESSOR_GATEWAY_REUSE_PORT": "true" if shared else "false",
    }
    cmd = [sys.executable, "-m", "processor", "gateway"]
    gateway = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1),
        ):
            return gateway
        time.sleep(0.2)
    gateway.kill()
    raise RuntimeError("gateway did not start")


class ClientProcs:
    """Client processes driven over stdin/stdout with JSON lines."""

    def __init__(self, port: int, counts: list[int], channels: list[str], *extra: str) -> None:
        cmd = [sys.executable, "-m", "benchmarks.gateway_bench", "--role", "clients", *extra]
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
    name: str, clients: ClientProcs, gateway: list[psutil.Process], seconds: float, settle: float
) -> Phase:
    ready = await clients.wait_ready()
    await asyncio.sleep(settle)  # steady state: let the connection storm's backlog drain
    others = [psutil.Process(pid) for pid in clients.pids()]
    before = sum(_cpu(g) for g in gateway), sum(_cpu(p) for p in others), time.monotonic()
    clients.command("measure")
    await asyncio.sleep(seconds)
    reports = await clients.report()
    elapsed = time.monotonic() - before[2]
    merged: dict[str, dict[int, int]] = {}
    for report in reports:
        for kind, hist in report["hists"].items():
            into = merged.setdefault(kind, {})
            for ms, n in hist.items():
                into[int(ms)] = into.get(int(ms), 0) + n
    gateway_cpu = (sum(_cpu(g) for g in gateway) - before[0]) / elapsed * 100
    total = (
        sum(_cpu(g) for g in gateway) + sum(_cpu(p) for p in others) - before[0] - before[1]
    ) / elapsed
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
    compression = "off" if args.no_compression else "on"
    load1, load5, _ = os.getloadavg()
    print(
        f"gateway processes {args.gateway_procs}, client processes {args.client_procs},"
        f" compression {compression}; load average {load1:.1f} (1 min) {load5:.1f} (5 min)"
    )
    header = (
        f"{'phase':<13} {'clients':>7} {'frames':>9} {'frames/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'gw CPU%':>8} {'gw+cl CPU%':>10} {'closed':>6}"
    )
    print(header)
    for phase in phases:
        _row(phase.name, phase, _expand_all(phase.latencies))
        if phase.name == "load":
            for kind in sorted(phase.latencies):
                _row(f"  {kind}", phase, _expand(phase.latencies[kind]))
    load = _expand_all(phases[-1].latencies)
    p99 = percentile(load, 99) if load else float("inf")
    verdict = "met" if p99 <= TARGET_P99_MS else "NOT met"
    print(f"target: p99 <= {TARGET_P99_MS:.0f} ms with {phases[-1].clients} clients: {verdict}")


def _row(name: str, phase: Phase, values: list[int]) -> None:
    p50 = percentile(values, 50) if values else float("nan")
    p99 = percentile(values, 99) if values else float("nan")
    worst = max(values) if values else float("nan")
    print(
        f"{name:<13} {phase.clients:>7} {len(values):>9} "
        f"{len(values) / phase.seconds:>9.0f} {p50:>7.0f} {p99:>7.0f} {worst:>7.0f} "
        f"{phase.gateway_cpu:>8.0f} {phase.total_cpu:>10.0f} {phase.closed:>6}"
    )


def _expand_all(hists: dict[str, dict[int, int]]) -> list[int]:
    return sorted(v for hist in hists.values() for v in _expand(hist))


async def orchestrate(args: argparse.Namespace) -> None:
    limit = raise_fd_limit()
    print(f"open-files limit {limit}")
    prefix = f"bench:{uuid.uuid4().hex[:8]}:live"
    port = _free_port()
    redis = aioredis.Redis.from_url(REDIS_URL)
    shared = args.gateway_procs > 1
    gateways = [start_gateway(port, prefix, shared) for _ in range(args.gateway_procs)]
    channels = ["stage:1:leaderboard", "event:1:positions"]
    publisher_task = asyncio.create_task(publish_forever(LivePublisher(redis, prefix), args))
    phases: list[Phase] = []
    running: list[ClientProcs] = []
    try:
        gw = [psutil.Process(gateway.pid) for gateway in gateways]
        extra = ["--no-compression"] if args.no_compression else []
        running.append(ClientProcs(port, [1], channels, *extra))
        phases.append(await measure("reference", running[-1], gw, args.reference_s, 1.0))
        running.pop().stop()
        counts = _split(args.clients, args.client_procs)
        running.append(ClientProcs(port, counts, channels, *extra))
        started = time.monotonic()
        phase = await measure("load", running[-1], gw, args.duration, args.settle_s)
        ramp = time.monotonic() - started - phase.seconds - args.settle_s
        print(f"connected {phase.clients} clients (+ snapshots) in {ramp:.1f} s")
        phases.append(phase)
    finally:
        for procs in running:
            procs.stop()
        publisher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher_task
        for gateway in gateways:
            _stop(gateway)
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    print_phases(phases, args)


def _split(total: int, parts: int) -> list[int]:
    share = total // parts
    return [share] * (parts - 1) + [total - share * (parts - 1)]


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=5_000)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--gateway-procs", type=int, default=1, help="sharing the port")
    parser.add_argument("--vehicles", type=int, default=200)
    parser.add_argument("--commit-ms", type=int, default=200)
    parser.add_argument("--leaderboard-s", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--reference-s", type=float, default=5.0)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--no-compression", action="store_true", help="clients decline deflate")
    parser.add_argument("--role", choices=["orchestrate", "clients"], default="orchestrate")
    parser.add_argument("--port", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--channels", default="")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.role == "clients":
        channels = args.channels.split(",")
        asyncio.run(clients_main(args.port, args.count, channels, not args.no_compression))
    else:
        asyncio.run(asyncio.wait_for(orchestrate(args), timeout=600))


if __name__ == "__main__":
    main()
