"""Pure pieces of the gateway and the live publisher: no sockets, no Redis."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.adapters.live import LiveKeys, PositionThrottle
from processor.gateway.coalesce import Outbox
from processor.gateway.protocol import (
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    parse_request,
    valid_channel,
)
from processor.gateway.ratelimit import KeyedLimiter, TokenBucket
from processor.gateway.state import PositionsState, SharedFrame, parse_update

from .helpers import position


def update(channel: str, seq: int, data: Any) -> Any:
    raw = orjson.dumps({"seq": seq, "published_at": 1_000 + seq, "data": data})
    return parse_update(channel, raw)


def frames(outbox: Outbox) -> list[dict[str, Any]]:
    return [orjson.loads(frame) for frame in outbox.drain()]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"type":"ping"}', Ping()),
        ('{"type":"subscribe","channel":"stage:4:leaderboard"}', Subscribe("stage:4:leaderboard")),
        (
            '{"type":"subscribe","channel":"event:a-1:alerts","token":"t"}',
            Subscribe("event:a-1:alerts", "t"),
        ),
        ('{"type":"unsubscribe","channel":"events"}', Unsubscribe("events")),
    ],
)
def test_parse_request_accepts_the_documented_messages(raw: str, expected: object) -> None:
    assert parse_request(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{", "bad_json"),
        ("[1]", "bad_message"),
        ('{"type":"shout"}', "bad_type"),
        ('{"type":"subscribe","channel":"event:1:secrets"}', "bad_channel"),
        ('{"type":"subscribe","channel":"stage:../x:leaderboard"}', "bad_channel"),
        ('{"type":"subscribe","channel":"event:1:alerts","token":5}', "bad_message"),
    ],
)
def test_parse_request_rejects_with_a_reason(raw: str, code: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_request(raw)
    assert refused.value.code == code


@given(st.text(max_size=80))
def test_only_channel_names_of_the_grammar_are_valid(name: str) -> None:
    if valid_channel(name) and name != "events":
        kind, ident, suffix = name.split(":")
        assert (kind, suffix) in {
            ("event", "positions"),
            ("event", "standings"),
            ("event", "alerts"),
            ("event", "course"),
            ("stage", "leaderboard"),
        }
        assert ident.isascii()
        assert all(c.isalnum() or c in "_-" for c in ident)


@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_any_plain_id_makes_valid_channels(ident: str) -> None:
    assert valid_channel(f"event:{ident}:positions")
    assert valid_channel(f"stage:{ident}:leaderboard")
    assert not valid_channel(f"stage:{ident}:leaderboard\n")


def test_update_frame_is_the_published_bytes_with_a_header() -> None:
    parsed = update("stage:1:leaderboard", 7, {"rows": [{"rank": 1}]})
    frame = orjson.loads(parsed.frame)
    assert frame == {
        "type": "update",
        "channel": "stage:1:leaderboard",
        "seq": 7,
        "published_at": 1_007,
        "data": {"rows": [{"rank": 1}]},
    }


def test_compressed_shared_frame_inflates_to_the_payload() -> None:
    payload = orjson.dumps({"rows": [{"rank": i, "name": "Crew"} for i in range(300)]})
    wire = SharedFrame(payload).wire(12)
    assert wire[0] == 0xC1  # FIN, RSV1 (compressed), text
    assert wire[1] == 126 or wire[1] == 127 or wire[1] < 126
    body = wire[4:] if wire[1] == 126 else wire[2:] if wire[1] < 126 else wire[10:]
    assert zlib.decompressobj(-12).decompress(body + b"\x00\x00\xff\xff") == payload
    assert len(wire) < len(payload) / 5
    assert SharedFrame(payload).wire(0)[0] == 0x81


def test_lagging_client_gets_only_the_latest_leaderboard() -> None:
    outbox = Outbox(limit=100)
    for seq in range(1, 6):
        outbox.push_update(update("stage:1:leaderboard", seq, {"rows": [seq]}))
    assert [(f["seq"], f["data"]) for f in frames(outbox)] == [(5, {"rows": [5]})]


def test_lagging_client_gets_positions_merged_per_entry() -> None:
    outbox = Outbox(limit=100)
    outbox.push_update(
        update("event:1:positions", 1, {"entries": [position("1", 1), position("2", 1)]})
    )
    outbox.push_update(update("event:1:positions", 2, {"entries": [position("1", 2)]}))
    (merged,) = frames(outbox)
    assert merged["seq"] == 2
    assert merged["coalesced"] is True
    assert {e["number"]: e["ts"] for e in merged["data"]["entries"]} == {"1": 2, "2": 1}


def test_lagging_client_keeps_every_alert_in_order() -> None:
    outbox = Outbox(limit=100)
    for seq in range(1, 4):
        outbox.push_update(update("event:1:alerts", seq, {"kind": f"k{seq}"}))
    assert [f["data"]["kind"] for f in frames(outbox)] == ["k1", "k2", "k3"]


def test_snapshot_supersedes_pending_updates_of_its_channel_only() -> None:
    outbox = Outbox(limit=100)
    outbox.push_update(update("stage:1:leaderboard", 1, {"rows": []}))
    outbox.push_update(update("event:1:standings", 1, {"rows": []}))
    outbox.push_snapshot("stage:1:leaderboard", b'{"type":"snapshot","seq":3}')
    outbox.push_update(update("stage:1:leaderboard", 4, {"rows": [4]}))
    kinds = [(f["type"], f["seq"]) for f in frames(outbox)]
    assert kinds == [("update", 1), ("snapshot", 3), ("update", 4)]


def test_outbox_reports_when_a_client_falls_past_the_limit() -> None:
    outbox = Outbox(limit=3)
    results = [outbox.push_update(update("stage:1:leaderboard", s, {})) for s in range(1, 5)]
    assert results == [True, True, True, False]
    outbox.drain()
    assert outbox.push_update(update("stage:1:leaderboard", 5, {})) is True


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.4) is False
    assert bucket.allow(0.5) is True


def test_keyed_limiter_keeps_addresses_apart_and_bounded() -> None:
    limiter = KeyedLimiter(rate=0.001, burst=1, capacity=2)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert limiter.allow("c", 0.0)
    assert limiter.allow("a", 0.0), "the oldest address was forgotten"


def test_throttle_drops_stale_positions_and_holds_early_ones() -> None:
    throttle = PositionThrottle(interval_s=1.0, batch_s=0.5)
    assert [r["ts"] for r in throttle.offer("e", [position("1", 1_000)], now=0.0)] == [1_000]
    assert throttle.offer("e", [position("1", 900)], now=1.5) == []  # older: dropped
    assert throttle.offer("e", [position("1", 1_500)], now=1.6) != []
    assert throttle.offer("e", [position("1", 2_000)], now=1.9) == []  # within the second
    assert [r["ts"] for r in throttle.due("e", 1.9, force=True)] == [2_000]


def test_throttle_sends_an_events_positions_together_every_batch() -> None:
    throttle = PositionThrottle(interval_s=1.0, batch_s=0.5)
    assert len(throttle.offer("e", [position("1", 0)], now=0.0)) == 1
    assert throttle.offer("e", [position("2", 0)], now=0.1) == []  # waits for the batch
    batch = throttle.offer("e", [position("3", 0)], now=0.5)
    assert sorted(r["number"] for r in batch) == ["2", "3"]


def test_trail_keeps_the_last_points_of_an_entry() -> None:
    throttle = PositionThrottle()
    for ts in range(30):
        throttle.offer("e", [position("1", ts, lon=float(ts))], now=float(ts))
    trail = throttle.trail("e", "1")
    assert len(trail) == 20
    assert trail[-1][0] == 29.0


def test_positions_state_extends_trails_from_updates() -> None:
    state = PositionsState("event:1:positions", 3, [{**position("1", 1), "trail": [[16, 45]]}])
    state.apply(update("event:1:positions", 4, {"entries": [position("1", 2, lon=17)]}))
    (entry,) = state.data()["entries"]
    assert entry["ts"] == 2
    assert entry["trail"] == [[16, 45], [17, 45.0]]
    assert orjson.loads(state.snapshot().payload)["seq"] == 4


def test_live_keys_put_a_channels_keys_in_one_cluster_slot() -> None:
    keys = LiveKeys("live")
    channel = "stage:9:leaderboard"
    assert keys.seq(channel) == "live:{stage:9:leaderboard}:seq"
    tags = {
        name.split("{")[1].split("}")[0]
        for name in (keys.seq(channel), keys.snapshot(channel), keys.pubsub(channel))
    }
    assert tags == {channel}
    assert keys.channel_of(keys.pubsub(channel)) == channel
    assert keys.channel_of("other:{x}:pub") is None


def test_throttle_keeps_one_batch_a_second_under_commits_every_200_ms() -> None:
    throttle = PositionThrottle(interval_s=1.0, batch_s=1.0)
    sent = 0
    for tick in range(100):  # 20 s of commits, 10 vehicles each reporting at 1 Hz
        now = tick * 0.2
        rows = [position(str(n), tick * 200) for n in range(10) if n % 5 == tick % 5]
        sent += bool(throttle.offer("e", rows, now))
    assert 19 <= sent <= 21
