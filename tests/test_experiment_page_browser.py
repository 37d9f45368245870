"""The experiment page in a real headless browser: Debian's Chromium driven by selenium through
Debian's chromedriver (both from apt: `apt-get install chromium chromium-driver`; `.ci/run` installs
them when it runs as root). Each test loads the page, checks what a person would look for (the
current stage, the SRM status, the plots laid out), that the browser reported no error (a blocked
load or script would be one: the page's CSP allows inline style only), and keeps a full-page
screenshot under artifacts/test-screenshots/ (or $COTRR_SCREENSHOT_DIR).

Skipped, with the reason, only when chromium or chromedriver is not installed; with
COTRR_REQUIRE_BROWSER=1 (set by .ci/run after installing them) a missing browser fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from _controller_status import Page, contract_status, write_status
from _page_app import PREFIX, send_traffic
from test_experiment_page import SALT, page_service
from test_experiment_report import run_experiment

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]

if MISSING and os.environ.get("COTRR_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"COTRR_REQUIRE_BROWSER=1 but {' and '.join(MISSING)} not on PATH")
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} not installed (apt-get install -y chromium chromium-driver)",
)


def screenshot_dir() -> Path:
    out = Path(os.environ.get("COTRR_SCREENSHOT_DIR") or REPO / "artifacts" / "test-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # --no-sandbox: Chromium's sandbox refuses to run as root (CI containers); /dev/shm is small in containers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium's own driver download (Selenium Manager) is never asked.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def full_page_screenshot(driver, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(int(height) + 40, 600), 8000))
    path = screenshot_dir() / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    return path


def check_page(driver, url: str, *, stage: str, name: str) -> Path:
    from selenium.webdriver.common.by import By

    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    assert driver.title == f"Experiment {SALT}"
    assert driver.find_element(By.ID, "current-stage").text == stage
    srm = driver.find_element(By.ID, "srm-status")
    assert srm.get_attribute("data-status") in ("ok", "flagged") and "p = " in srm.text
    assert srm.is_displayed()
    plot = driver.find_element(By.CSS_SELECTOR, "#sequence-ab svg")
    assert plot.is_displayed() and plot.size["width"] == 640 and plot.size["height"] == 240
    rows = driver.find_elements(By.CSS_SELECTOR, "#arm-table tbody tr")
    assert sorted(r.find_element(By.TAG_NAME, "td").text for r in rows) == ["control", "treatment"]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    path = full_page_screenshot(driver, name)
    width, height = png_size(path)
    assert width >= 1000 and height >= 600, (width, height)
    return path


# ----------------------------------------------------------------------------- without Ray


class _PageServer(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def page_log(bundle_a, bundle_b, records, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-events")
    run_experiment(bundle_a, bundle_b, records, root, mode="ab", salt=SALT)
    return root


@pytest.fixture(scope="module")
def page_server(bundle_a, page_log):
    """RerankService.experiment_page (what the Router's route returns) behind a stdlib HTTP server."""
    svc = page_service(bundle_a, str(page_log))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            prefix = "/experiments/"
            eid = unquote(self.path[len(prefix) :]) if self.path.startswith(prefix) else ""
            code, page = asyncio.run(svc.experiment_page(eid))
            body = page.encode()
            self.send_response(code)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = _PageServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        svc.events.close()


def test_page_in_chromium_without_ray(browser, page_server, page_log) -> None:
    from selenium.webdriver.common.by import By

    check_page(browser, f"{page_server}/experiments/{SALT}", stage="no controller", name="experiment-no-controller")
    write_status(str(page_log), contract_status(SALT, time.time() - 1200))
    try:
        check_page(browser, f"{page_server}/experiments/{SALT}", stage="5%", name="experiment-with-controller")
        rows = browser.find_elements(By.CSS_SELECTOR, "#stage-table tbody tr")
        assert [r.get_attribute("class") for r in rows] == ["done", "done", "current", "pending"]
        assert browser.find_element(By.CSS_SELECTOR, "#stage-table tr.current td").value_of_css_property(
            "background-color"
        ) != browser.find_element(By.CSS_SELECTOR, "#stage-table tr.done td").value_of_css_property("background-color")
        reasons = [
            r.find_elements(By.TAG_NAME, "td")[-1].text
            for r in browser.find_elements(By.CSS_SELECTOR, "#decision-table tbody tr")
        ]
        assert reasons[0] == "interleaving preference not harmful after 240 units"
    finally:
        (page_log / "controller" / SALT / "status.json").unlink()
    browser.get(f"{page_server}/experiments/nope")
    assert browser.find_element(By.ID, "error").get_attribute("data-code") == "not_found"


# ----------------------------------------------------------------------------- through the real app


@pytest.mark.integration
def test_page_in_chromium_through_the_serve_app(browser, serve_session, page_app, records) -> None:
    from selenium.webdriver.common.by import By

    base = f"{serve_session.http_url}{PREFIX}"
    send_traffic(base, records, 60, "browser")
    write_status(str(page_app), contract_status(SALT, time.time() - 1200))
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.get(f"/experiments/{SALT}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:300]
        missing = c.get("/experiments/no-such-experiment")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
        err = c.get("/v1/experiments/no-such-experiment").json()["error"]
        assert Page(missing.text).text("error") == f"{err['code']}: {err['message']}"
    check_page(browser, f"{base}/experiments/{SALT}", stage="5%", name="experiment-serve-app")
    assert browser.find_element(By.ID, "controller-state").text == "running"
    assert browser.find_element(By.ID, "guardrail-summary").text == "0 of 3 breached"
