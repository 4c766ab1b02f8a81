"""The live page in real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright
from pydantic import SecretStr

from processor.adapters.live import LivePublisher

from .conftest import GatewayFactory
from .helpers import position

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ROUTE = [(15.90 + 0.01 * i, 45.80 + 0.012 * math.sin(i / 2.5)) for i in range(16)]
TOKEN = "officials-token"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is not installed (scripts/ensure-chromium.sh installs it)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def course() -> dict[str, Any]:
    start, finish = ROUTE[0], ROUTE[-1]
    zone = [[15.955, 45.79], [15.985, 45.79], [15.985, 45.822], [15.955, 45.822], [15.955, 45.79]]
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"kind": "route"}, "geometry": _line(ROUTE)},
            {"type": "Feature", "properties": {"name": "Start"}, "geometry": _point(start)},
            {"type": "Feature", "properties": {"name": "Finish"}, "geometry": _point(finish)},
            {"type": "Feature", "properties": {"name": "WP1"}, "geometry": _point(ROUTE[7])},
            {
                "type": "Feature",
                "properties": {"kind": "speed_zone", "limit_kmh": 50},
                "geometry": {"type": "Polygon", "coordinates": [zone]},
            },
        ],
    }


def leaderboard(finished: bool) -> list[dict[str, Any]]:
    split = {"name": "WP1", "ts": 1_717_243_500_000, "elapsed_ms": 301_400}
    running = [
        {
            "rank": None,
            "number": number,
            "name": name,
            "class": "T1",
            "status": "running",
            "splits": [split] if number == "7" else [],
            "start_ts": 1_717_243_200_000,
            "finish_ts": None,
            "elapsed_ms": None,
            "penalty_ms": 0,
            "total_ms": None,
            "gap_ms": None,
            "class_rank": None,
            "last_split": "WP1" if number == "7" else None,
        }
        for number, name in [("7", "Ana Horvat / Ivo Kovač"), ("12", "Lena Berg / Tom Ruiz")]
    ]
    if not finished:
        return running
    done = {
        **running[0],
        "rank": 1,
        "status": "finished",
        "splits": [split, {"name": "Finish", "ts": 1_717_243_812_300, "elapsed_ms": 612_300}],
        "finish_ts": 1_717_243_812_300,
        "elapsed_ms": 612_300,
        "penalty_ms": 10_000,
        "total_ms": 622_300,
        "gap_ms": 0,
        "class_rank": 1,
        "last_split": "Finish",
    }
    return [done, running[1]]


async def publish_race(publisher: LivePublisher) -> None:
    await publisher.publish_catalog(
        [{"id": 1, "name": "Rally Test 2026", "stages": [{"id": 11, "name": "SS1 Sljeme"}]}]
    )
    await publisher.publish_course(1, course())
    for second, at in enumerate([3, 4, 5]):
        rows = [
            position(n, 1_000 * second, lon=ROUTE[at + k][0], lat=ROUTE[at + k][1])
            for n, k in [("7", 6), ("12", 2), ("31", 0)]
        ]
        await publisher.publish_positions(1, rows)
        await publisher.flush()
    await publisher.publish_leaderboard(11, leaderboard(finished=False))
    await publisher.publish_standings(
        1, [{"rank": 1, "number": "3", "name": "Mia Novak", "class": "T2",
             "stages_finished": 4, "total_ms": 3_912_000, "gap_ms": 0}]
    )  # fmt: skip
    await publisher.publish_alert(
        1,
        {
            "kind": "stopped",
            "severity": "critical",
            "number": "31",
            "device_imei": "356307042440031",
            "started_at": "2024-06-01T12:05:00Z",
            "ended_at": None,
            "details": {"stopped_s": 120},
        },
    )


async def test_live_page_shows_leaderboard_after_finish_and_vehicles_on_the_map(
    start_gateway: GatewayFactory, publisher: LivePublisher, browser: Browser
) -> None:
    await publish_race(publisher)
    gateway = await start_gateway(gateway_alerts_token=SecretStr(TOKEN))
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"http://127.0.0.1:{gateway.port}/?token={TOKEN}")

    await page.wait_for_selector("#status.online")
    await page.wait_for_function("document.querySelectorAll('#map-vehicles .vehicle').length === 3")
    assert await page.locator("#map-course .route").count() == 1
    assert await page.locator("#leaderboard tbody tr.running").count() == 2

    await publisher.publish_leaderboard(11, leaderboard(finished=True))  # #7 crosses the finish
    await publisher.publish_positions(1, [position("7", 9_000, lon=ROUTE[15][0], lat=ROUTE[15][1])])
    await publisher.flush()
    finished = page.locator("#leaderboard tbody tr:not(.running)")
    await finished.first.wait_for()
    await _expect_row(page, ["1", "7", "Ana Horvat / Ivo Kovač", "T1"])
    await page.wait_for_selector("#alerts li.critical")
    await page.wait_for_timeout(300)  # let the flash animation start for the picture

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "gateway-live-page.png"), full_page=True)
    assert await page.locator("#standings tbody tr").count() == 1
    # The updates above reached Chromium as shared, pre-compressed frames.
    assert "permessage-deflate" in await page.evaluate("state.ws.extensions")
    assert errors == []


async def _expect_row(page: Page, cells: list[str]) -> None:
    row = page.locator("#leaderboard tbody tr:not(.running)").first
    texts = [t.strip() for t in await row.locator("td").all_inner_texts()]
    assert texts[: len(cells)] == cells
    assert texts[-2:] == ["10:22.3", "—"]


def _line(points: list[tuple[float, float]]) -> dict[str, Any]:
    return {"type": "LineString", "coordinates": [list(p) for p in points]}


def _point(point: tuple[float, float]) -> dict[str, Any]:
    return {"type": "Point", "coordinates": list(point)}
