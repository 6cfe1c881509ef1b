"""Regenerate docs/screenshots/*.png: every dashboard page in headless Chromium.

    .venv/bin/python docs/make_screenshots.py                  # seeded demo database
    .venv/bin/python docs/make_screenshots.py --storage URL    # any existing database

Without --storage it builds build/screenshots/dashboard.db with the seeded rows of the
dashboard's tests (tests/app/conftest.py: two campaigns, provenance and post-training probe
results), starts `streamlit run app/main.py` headless on a free localhost port, opens each
page with Playwright driving Debian's /usr/bin/chromium (`executable_path`), waits until
the app has finished running (no "Running..." status widget, charts drawn) and saves a
full-page PNG. Needs the `playwright` Python package and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
# (file name, url path, heading that proves the page rendered, extra action)
PAGES = [("campaigns", "", "Campaigns"), ("scaling", "scaling", "Scaling: "),
         ("hyperparameters", "hparams", "Hyperparameters: "),
         ("learning_curves", "curves", "Learning curves: "), ("budgets", "budgets", "Budgets: "),
         ("dynamics", "dynamics", "Dynamics: "), ("sql", "sql", "SQL")]


CONTENT_HEIGHT_JS = """() => {
  const main = document.querySelector('[data-testid="stMain"]')
            || document.querySelector('section.main');
  const block = main && main.querySelector('[data-testid="stMainBlockContainer"]');
  if (block) return Math.ceil(block.getBoundingClientRect().height + 40);
  return Math.ceil(Math.max(main ? main.scrollHeight : 0, document.body.scrollHeight));
}"""


def demo_database(path: Path) -> str:
    from tests.app.conftest import add_provenance_and_probes, build_database
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    url = build_database(path)
    add_provenance_and_probes(url)
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_dashboard(url: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "BATCHLAB_STORAGE": url, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
           "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
         "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return process
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the dashboard did not start:\n" + log.read_text())
        time.sleep(0.3)


def wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Streamlit shows a status widget ("Running...") while the script runs; wait until it
    has been gone for a moment, then for the charts to draw."""
    deadline = time.monotonic() + timeout_ms / 1000
    quiet_since = None
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').filter(has_text="Running").count()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 1.5:
            break
        page.wait_for_timeout(200)
    for chart in page.locator('[data-testid="stVegaLiteChart"]').all():
        chart.locator("canvas, svg").first.wait_for(state="attached", timeout=30_000)
    page.wait_for_timeout(800)


def shoot(base: str, campaign: str, out: Path, width: int = 1400) -> list[Path]:
    from playwright.sync_api import sync_playwright
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            for file, path, heading in PAGES:
                page.goto(f"{base}/{path}?campaign={campaign}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=heading).first.wait_for(timeout=60_000)
                if file == "sql":
                    page.get_by_role("button", name="Run query").click()
                    page.get_by_text("rows in").first.wait_for(timeout=30_000)
                wait_until_idle(page)
                errors = page.locator('[data-testid="stException"]').count()
                if errors:
                    raise SystemExit(f"page {file} shows an exception")
                # Streamlit scrolls inside its main container, not the document: grow the
                # viewport to the content's height so the whole page is captured
                for _ in range(5):  # until the height stops changing (charts lay out late)
                    height = min(max(900, page.evaluate(CONTENT_HEIGHT_JS)), 8000)
                    if height == page.viewport_size["height"]:
                        break
                    page.set_viewport_size({"width": width, "height": height})
                    wait_until_idle(page)
                target = out / f"{file}.png"
                page.screenshot(path=str(target), full_page=True)
                page.set_viewport_size({"width": width, "height": 900})
                saved.append(target)
                print(f"saved {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}",
                      flush=True)
        finally:
            browser.close()
    return saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot every dashboard page.")
    parser.add_argument("--storage", help="an existing database (default: the seeded demo)")
    parser.add_argument("--campaign", default="demo_scaling")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    build = ROOT / "build" / "screenshots"
    build.mkdir(parents=True, exist_ok=True)
    url = args.storage or demo_database(build / "dashboard.db")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = start_dashboard(url, port, build / "dashboard.log")
    try:
        shoot(f"http://127.0.0.1:{port}", args.campaign, args.out)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
