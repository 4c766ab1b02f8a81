"""A real gateway, real WebSocket clients and real Redis: subscriptions, order, limits."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from processor.adapters.live import LivePublisher
from processor.gateway.cli import gateway as gateway_command

from .conftest import GatewayFactory
from .helpers import (
    leaderboard_rows,
    open_client,
    open_tiny_client,
    position,
    recv_json,
    subscribe,
)

pytestmark = pytest.mark.integration


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_subscriber_gets_snapshot_then_every_update_in_order(
    start_gateway: GatewayFactory, publisher: LivePublisher
) -> None:
    await publisher.publish_leaderboard(7, leaderboard_rows(3, version=0))
    gateway = await start_gateway()
    async with await open_client(gateway) as ws:
        snapshot = await subscribe(ws, "stage:7:leaderboard")
        assert snapshot["type"] == "snapshot"
        assert snapshot["seq"] == 1
        assert [row["rank"] for row in snapshot["data"]["rows"]] == [1, 2, 3]
        for version in range(1, 21):
            await publisher.publish_leaderboard(7, leaderboard_rows(3, version))
        updates = [await recv_json(ws) for _ in range(20)]
    assert [u["type"] for u in updates] == ["update"] * 20
    assert [u["seq"] for u in updates] == list(range(2, 22))
    assert updates[-1]["data"]["rows"][0]["name"].startswith("Crew 0 / v20")
    assert all(u["published_at"] > 0 for u in updates)


async def test_two_gateway_instances_deliver_the_same_sequence_compressed_or_not(
    start_gateway: GatewayFactory, publisher: LivePublisher
) -> None:
    first, second = await start_gateway(), await start_gateway()
    plain, deflate = open_client(first, compression=None), open_client(second)
    async with await plain as a, await deflate as b:
        assert (await subscribe(a, "event:3:standings"))["seq"] == 0
        assert (await subscribe(b, "event:3:standings"))["seq"] == 0
        for version in range(10):
            await publisher.publish_standings(3, [{"rank": 1, "number": "1", "v": version}])
        seen_a = [(await recv_json(a))["seq"] for _ in range(10)]
        seen_b = [(await recv_json(b))["seq"] for _ in range(10)]
    assert seen_a == seen_b == list(range(1, 11))


async def test_positions_snapshot_has_latest_per_entry_with_trail(
    start_gateway: GatewayFactory, aredis: Any, gateway_settings: Any
) -> None:
    clock = ManualClock()
    publisher = LivePublisher(aredis, gateway_settings.live_prefix, clock=clock)
    for second in range(3):
        clock.now += 1.0
        rows = [position("1", 1_000 * second, lon=16 + second), position("2", 1_000 * second)]
        await publisher.publish_positions(5, rows)
    gateway = await start_gateway()
    async with await open_client(gateway) as ws:
        snapshot = await subscribe(ws, "event:5:positions")
        entries = {e["number"]: e for e in snapshot["data"]["entries"]}
        assert entries["1"]["ts"] == 2_000
        assert [point[0] for point in entries["1"]["trail"]] == [16, 17, 18]
        clock.now += 1.0
        await publisher.publish_positions(5, [position("1", 3_000, lon=19)])
        update = await recv_json(ws)
    assert update["seq"] == snapshot["seq"] + 1
    assert update["data"]["entries"] == [position("1", 3_000, lon=19)]


async def test_positions_are_throttled_to_one_per_entry_per_second(
    aredis: Any, gateway_settings: Any
) -> None:
    clock = ManualClock()
    publisher = LivePublisher(aredis, gateway_settings.live_prefix, clock=clock)
    assert await publisher.publish_positions(1, [position("9", 1_000)]) == 1
    clock.now += 0.3
    assert await publisher.publish_positions(1, [position("9", 1_300)]) is None
    assert await publisher.publish_positions(1, [position("9", 900)]) is None  # stale
    clock.now += 0.8
    assert await publisher.publish_positions(1, [position("9", 1_600)]) == 2
    clock.now += 0.1
    await publisher.publish_positions(1, [position("9", 1_700)])
    await publisher.flush()
    stored = await aredis.hget(publisher.keys.snapshot("event:1:positions"), "9")
    assert orjson.loads(stored)["ts"] == 1_700


async def test_lagging_client_gets_coalesced_updates_ending_with_the_latest(
    start_gateway: GatewayFactory, publisher: LivePublisher
) -> None:
    gateway = await start_gateway(
        gateway_write_limit_bytes=16_384,
        gateway_socket_send_buffer_bytes=32_768,
        gateway_client_queue=10_000,
    )
    async with await open_tiny_client(gateway) as slow:
        await subscribe(slow, "stage:2:leaderboard")
        for version in range(1, 301):  # ~8 MB: more than the socket buffers hold
            await publisher.publish_leaderboard(2, leaderboard_rows(100, version, pad=40))
        received = await _read_until_seq(slow, 300)
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(seqs)
    assert len(seqs) < 300, "a lagging client should have skipped superseded leaderboards"
    assert received[-1]["data"]["rows"][0]["name"].startswith("Crew 0 / v300")
    assert gateway.stats.slow_disconnects == 0


async def test_client_that_never_reads_is_disconnected_without_delaying_a_fast_one(
    start_gateway: GatewayFactory, publisher: LivePublisher, record_property: Any
) -> None:
    gateway = await start_gateway(
        gateway_write_limit_bytes=16_384,
        gateway_socket_send_buffer_bytes=32_768,
        gateway_client_queue=16,
    )
    coalesced_before = _coalesced()
    slow = await open_tiny_client(gateway)
    await subscribe(slow, "stage:4:leaderboard")
    async with await open_client(gateway) as fast:
        await subscribe(fast, "stage:4:leaderboard")
        reader = asyncio.create_task(_collect(fast, count=200))
        for version in range(1, 201):
            await publisher.publish_leaderboard(4, leaderboard_rows(100, version, pad=40))
            await asyncio.sleep(0.002)
        latencies, seqs, coalesced = await asyncio.wait_for(reader, 30)
    await _wait_for(lambda: gateway.stats.slow_disconnects == 1)
    with pytest.raises(ConnectionClosed):
        await _read_forever(slow)  # whatever reached its buffers, then the end
    assert _coalesced() > coalesced_before, "the slow client's updates were coalesced first"
    assert seqs == list(range(1, 201))
    assert not coalesced, "the fast client must never have been treated as lagging"
    p50, worst = statistics.median(latencies), max(latencies)
    record_property("fast_client_latency_ms", f"p50={p50:.1f} max={worst:.1f}")
    print(f"fast client delivery latency: p50={p50:.1f} ms max={worst:.1f} ms")


async def test_alerts_channel_refuses_a_missing_or_wrong_token(
    start_gateway: GatewayFactory, publisher: LivePublisher
) -> None:
    await publisher.publish_alert(9, {"kind": "sos", "severity": "critical", "number": "12"})
    gateway = await start_gateway(gateway_alerts_token=SecretStr("officials-only"))
    async with await open_client(gateway) as ws:
        missing = await subscribe(ws, "event:9:alerts")
        wrong = await subscribe(ws, "event:9:alerts", token="guess")
        right = await subscribe(ws, "event:9:alerts", token="officials-only")
    assert (missing["type"], missing["code"]) == ("error", "forbidden")
    assert (wrong["type"], wrong["code"]) == ("error", "forbidden")
    assert right["type"] == "snapshot"
    assert right["data"]["alerts"][0]["kind"] == "sos"


async def test_alerts_channel_is_closed_when_no_token_is_configured(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway()
    async with await open_client(gateway) as ws:
        answer = await subscribe(ws, "event:9:alerts", token="anything")
    assert answer["code"] == "forbidden"


async def test_origin_not_in_the_allow_list_is_refused(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(gateway_allowed_origins=("https://live.example.org",))
    with pytest.raises(InvalidStatus) as refused:
        await open_client(gateway, origin="https://evil.example.com")
    assert refused.value.response.status_code == 403
    async with await open_client(gateway, origin="https://live.example.org") as ws:
        assert (await subscribe(ws, "stage:1:leaderboard"))["type"] == "snapshot"


async def test_connection_rate_limit_refuses_a_burst(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(gateway_connect_burst=3, gateway_connect_rate_per_s=0.01)
    opened = [await open_client(gateway) for _ in range(3)]
    with pytest.raises(InvalidStatus) as refused:
        await open_client(gateway)
    assert refused.value.response.status_code == 429
    for ws in opened:
        await ws.close()


async def test_subscription_rate_and_count_are_limited(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(gateway_subscribe_burst=3, gateway_subscribe_rate_per_s=0.01)
    async with await open_client(gateway) as ws:
        answers = [await subscribe(ws, f"stage:{i}:leaderboard") for i in range(4)]
    assert [a["type"] for a in answers] == ["snapshot"] * 3 + ["error"]
    assert answers[-1]["code"] == "rate_limited"
    gateway = await start_gateway(gateway_max_subscriptions=2)
    async with await open_client(gateway) as ws:
        answers = [await subscribe(ws, f"stage:{i}:leaderboard") for i in range(3)]
    assert answers[-1]["code"] == "too_many_subscriptions"


async def test_bad_requests_get_errors_and_the_connection_stays_usable(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway()
    async with await open_client(gateway) as ws:
        await ws.send("not json")
        assert (await recv_json(ws))["code"] == "bad_json"
        await ws.send('{"type":"subscribe","channel":"event:1:secrets"}')
        assert (await recv_json(ws))["code"] == "bad_channel"
        await ws.send('{"type":"ping"}')
        assert (await recv_json(ws))["type"] == "pong"


async def test_oversized_client_message_closes_the_connection(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway(gateway_max_message_bytes=1_024)
    async with await open_client(gateway) as ws:
        await ws.send("x" * 2_000)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_sequence_gap_sends_a_fresh_snapshot(
    start_gateway: GatewayFactory, publisher: LivePublisher, aredis: Any
) -> None:
    gateway = await start_gateway()
    async with await open_client(gateway) as ws:
        await subscribe(ws, "event:2:standings")
        await aredis.incr(publisher.keys.seq("event:2:standings"))  # an update "lost"
        await publisher.publish_standings(2, [{"rank": 1, "number": "5"}])
        answer = await recv_json(ws)
    assert (answer["type"], answer["seq"]) == ("snapshot", 2)
    assert answer["data"]["rows"] == [{"rank": 1, "number": "5"}]


async def test_page_and_static_files_are_served_over_http(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway()
    base = f"http://127.0.0.1:{gateway.port}"
    async with httpx.AsyncClient(base_url=base) as http:
        page = await http.get("/")
        script = await http.get("/static/app.js")
        health = await http.get("/healthz")
        escape = await http.get("/static/../server.py")
    assert page.status_code == 200
    assert "<title>" in page.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert health.json()["status"] == "ok"
    assert escape.status_code == 404


async def _collect(ws: ClientConnection, count: int) -> tuple[list[float], list[int], bool]:
    latencies: list[float] = []
    seqs: list[int] = []
    coalesced = False
    while len(seqs) < count:
        message = await recv_json(ws, wait_s=10)
        latencies.append(time.time() * 1000 - message["published_at"])
        seqs.append(message["seq"])
        coalesced |= bool(message.get("coalesced"))
    return latencies, seqs, coalesced


async def _read_until_seq(ws: ClientConnection, seq: int) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    while not received or received[-1]["seq"] < seq:
        received.append(await recv_json(ws, wait_s=10))
    return received


def _coalesced() -> float:
    return REGISTRY.get_sample_value("gateway_coalesced_total") or 0.0


async def _read_forever(ws: ClientConnection) -> None:
    while True:
        await asyncio.wait_for(ws.recv(), 10)


async def _wait_for(condition: Any, wait_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_check_mode_exits_zero_only_when_the_gateway_answers(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway()
    args = ["--check", "--port", str(gateway.port)]
    runner = CliRunner()
    up = await asyncio.to_thread(runner.invoke, gateway_command, args)
    await gateway.stop()
    down = await asyncio.to_thread(runner.invoke, gateway_command, args)
    assert (up.exit_code, down.exit_code) == (0, 1)
