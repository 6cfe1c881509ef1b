"""The dashboard in a real browser: Debian's chromium driven by playwright.

`batchlab dashboard` is started on a free localhost port; the Scaling page must show the
campaign and render its Vega chart, and the SQL page must run a SELECT. Skipped when
/usr/bin/chromium is absent, unless BATCHLAB_REQUIRE_BROWSER=1 (CI)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app.conftest import CAMPAIGN

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _browser_unavailable(reason: str) -> None:
    if os.environ.get("BATCHLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"BATCHLAB_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dashboard(dashboard_db, tmp_path):
    """`batchlab dashboard --storage URL --port P` running; yields the base URL."""
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "dashboard", "--storage", dashboard_db,
         "--port", str(port)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
             "PYTHONPATH": str(ROOT)},
        # its own process group: `batchlab dashboard` waits on a `streamlit run` child,
        # and both must stop at the end
        start_new_session=True)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("dashboard did not start:\n" + (tmp_path / "dashboard.log").read_text())
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_scaling_and_sql_pages_in_chromium(dashboard, tmp_path):
    if not Path(CHROMIUM).exists():
        _browser_unavailable(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_unavailable("the playwright package is not installed")
    shots = Path(os.environ.get("BATCHLAB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{dashboard}/scaling?campaign={CAMPAIGN}", wait_until="domcontentloaded")
            page.get_by_role("heading", name=f"Scaling: {CAMPAIGN}").wait_for(timeout=45_000)
            chart = page.locator('[data-testid="stVegaLiteChart"]').first
            chart.locator("canvas, svg").first.wait_for(timeout=45_000)
            box = chart.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 200
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "scaling.png"), full_page=True)
            assert (shots / "scaling.png").read_bytes()[:4] == b"\x89PNG"

            page.locator('[data-testid="stSidebarNav"] a', has_text="SQL").click()
            page.get_by_role("heading", name="SQL").wait_for(timeout=30_000)
            query = page.locator("textarea").first
            query.fill("SELECT batch_size, steps_to_result FROM bl_cell_results "
                       "WHERE campaign_id = 1 AND steps_to_result IS NOT NULL ORDER BY batch_size")
            query.press("Control+Enter")
            page.get_by_role("button", name="Run query").click()
            page.get_by_text("4 rows in").wait_for(timeout=30_000)
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "sql.png"), full_page=True)

            query.fill("DELETE FROM bl_trials")
            query.press("Control+Enter")
            page.get_by_role("button", name="Run query").click()
            page.get_by_text("attempt to write a readonly database").wait_for(timeout=30_000)
        finally:
            browser.close()
