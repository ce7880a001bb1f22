"""The gateway's page in real headless Chromium: candles drawn from klines produced to the topics, updated live.

The gateway runs as a user starts it (``python -m services.gateway``) on the test's own topics; the test
produces klines the way the aggregator does, opens the page, and reads the chart's own series data back
through the library's API (``window.klinesChart.candles()`` = Lightweight Charts' ``series.data()``), checks
that candles are actually painted on the canvas, and saves a screenshot under the test's tmp dir.

Needs Chromium and its driver (Debian: ``apt-get install -y chromium chromium-driver``) and the ``selenium``
package (``make test`` installs both); without them it is skipped with that message, and fails under CI.
``CHROMIUM_BIN`` and ``CHROMEDRIVER`` override where they are looked for.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import pytest
from ports import free_port

from services.core.intervals import close_time
from services.core.models import Kline
from services.shared.kafka import make_producer
from services.shared.messages import encode_kline, kline_key
from services.shared.settings import Settings

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC
HISTORY = 30
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"


def _find(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((path for name in names if (path := shutil.which(name))), None)


def kline(symbol: str, t: int, close: str, *, final: bool, n: int = 5) -> Kline:
    c = Decimal(close)
    o = c - Decimal("0.5") if (t // 60_000) % 3 else c + Decimal("0.5")  # some candles up, some down
    return Kline(
        symbol, "1m", t, close_time("1m", t), t // 1000, t // 1000 + n - 1, o, max(o, c) + Decimal("0.25"),
        min(o, c) - Decimal("0.25"), c, Decimal(n), n, final, Decimal(n) * c, Decimal(n) / 2, Decimal(n) * c / 2,
    )  # fmt: skip


def produce(settings: Settings, klines: list[Kline]) -> None:
    async def send() -> None:
        producer = make_producer(settings.kafka, client_suffix="test-browser")
        await producer.start()
        try:
            for seq, k in enumerate(klines, start=int(time.time() * 1000)):
                if k.x:
                    await producer.send_and_wait(
                        settings.kafka.topics.finalized, encode_kline(k), key=kline_key(k.s, k.i)
                    )
                else:
                    topic = settings.kafka.topics.snapshots
                    await producer.send_and_wait(topic, encode_kline(k, seq), key=kline_key(k.s, k.i))
        finally:
            await producer.stop()

    asyncio.run(send())


@pytest.fixture
def gateway(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """``python -m services.gateway`` on the test's topics; yields its base URL."""
    port = free_port()
    t = settings.kafka.topics
    env = dict(
        os.environ,
        KLINES_CONFIG=str(REPO / "config" / "klines.toml"),
        KAFKA_BOOTSTRAP=settings.kafka.bootstrap,
        CLICKHOUSE_DSN=settings.clickhouse.dsn,  # embedded: history comes from the gateway's memory
        KLINES_KAFKA__TOPICS__SNAPSHOTS=t.snapshots,
        KLINES_KAFKA__TOPICS__FINALIZED=t.finalized,
        KLINES_GATEWAY__HTTP_PORT=str(port),
        KLINES_SERVICE__LOG_FORMAT="text",
    )
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=REPO, env=env, stdout=log, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"gateway exited:\n{log_path.read_text()}"
                try:
                    with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                        if json.loads(r.read())["ready"]:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"gateway not ready:\n{log_path.read_text()}"
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            assert proc.wait(20) == 0, log_path.read_text()


def _missing(why: str) -> NoReturn:
    """CI installs the browser (deploy/local/setup.sh), so there a missing one fails; elsewhere it is a skip."""
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    try:
        from selenium import webdriver
    except ImportError:
        _missing(f"selenium is not installed ({INSTALL})")
    chromium = _find("CHROMIUM_BIN", "chromium", "chromium-browser", "google-chrome")
    driver_path = _find("CHROMEDRIVER", "chromedriver")
    if chromium is None or driver_path is None:
        _missing(f"Chromium or chromedriver not found ({INSTALL})")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_js(driver: Any, script: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for: {script}"
        time.sleep(0.1)


def bar(k: Kline) -> dict[str, float]:
    return {"time": k.t // 1000, "open": float(k.o), "high": float(k.h), "low": float(k.l), "close": float(k.c)}


# Pixels painted in the candle colours (#26a69a up, #ef5350 down) on the chart's canvases.
COUNT_CANDLE_PIXELS = """
let up = 0, down = 0;
for (const canvas of document.querySelectorAll('#chart canvas')) {
  if (!canvas.width || !canvas.height) continue;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] === 38 && data[i + 1] === 166 && data[i + 2] === 154) up++;
    if (data[i] === 239 && data[i + 1] === 83 && data[i + 2] === 80) down++;
  }
}
return [up, down];
"""


def test_the_page_draws_live_candles_from_the_topics(
    settings: Settings, gateway: str, browser: Any, tmp_path: Path
) -> None:
    past = [kline("BTCUSDT", T0 + m * 60_000, f"{100 + m % 7}.5", final=True) for m in range(HISTORY)]
    now = T0 + HISTORY * 60_000
    current = kline("BTCUSDT", now, "104.25", final=False)
    produce(settings, [*past, current, kline("ETHUSDT", now, "3000.5", final=False)])

    browser.get(gateway + "/?symbol=BTCUSDT&interval=1m")
    wait_js(browser, f"return window.klinesChart && window.klinesChart.candles().length >= {HISTORY + 1}")
    chart = "window.klinesChart"
    assert browser.execute_script(f"return {chart}.state()") == "live"
    assert browser.execute_script(f"return {chart}.stream()") == "btcusdt@kline_1m"
    candles = browser.execute_script(f"return {chart}.candles()")
    assert candles == [bar(k) for k in [*past, current]]
    volumes = browser.execute_script(f"return {chart}.volumes().map(v => [v.time, v.value])")
    assert volumes == [[k.t // 1000, float(k.v)] for k in [*past, current]]
    up, down = wait_js(browser, COUNT_CANDLE_PIXELS.replace("return [up, down];", "return up && down && [up, down];"))
    assert up > 50 and down > 50, "candles are not painted"

    # Live: the current candle changes in place, then closes, and the next one starts.
    moved = kline("BTCUSDT", now, "106.75", final=False, n=9)
    produce(settings, [moved])
    wait_js(browser, f"return {chart}.candles().at(-1).close === 106.75")
    assert browser.execute_script(f"return {chart}.candles().length") == HISTORY + 1
    closed = kline("BTCUSDT", now, "106.5", final=True, n=10)
    following = kline("BTCUSDT", now + 60_000, "106.0", final=False, n=1)
    produce(settings, [closed, following])
    wait_js(browser, f"return {chart}.candles().length === {HISTORY + 2}")
    wait_js(browser, f"return {chart}.candles().at(-2).close === 106.5")
    assert browser.execute_script(f"return {chart}.candles().slice(-2)") == [bar(closed), bar(following)]
    assert browser.find_element("id", "price").text == "106.0"  # the kline's own decimal string
    assert browser.find_element("id", "updated").text.endswith("UTC")
    assert "in progress" in browser.find_element("id", "candle-state").text
    screenshot = tmp_path / "gateway_chart.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    print(f"\nscreenshot: {screenshot}")

    # Picking another symbol re-subscribes and redraws.
    browser.execute_script(
        "const s = document.getElementById('symbol'); s.value = 'ETHUSDT'; s.dispatchEvent(new Event('change'));"
    )
    wait_js(browser, f"return {chart}.stream() === 'ethusdt@kline_1m' && {chart}.candles().length === 1")
    assert browser.execute_script(f"return {chart}.candles()") == [bar(kline("ETHUSDT", now, "3000.5", final=False))]
    assert "symbol=ETHUSDT" in browser.current_url
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
