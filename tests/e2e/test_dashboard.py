"""The live dashboard in headless Chromium (Debian's, driven by Playwright), against a
real `cqrskit serve`.

The page loads with no console errors and draws the pipeline; the lag figure
rises while the gate domain holds the views back and falls to 0 when it lets
go; a record inserted through the form is read back through the form, fresh.
Screenshots go to test-artifacts/dashboard/ (CQRSKIT_TEST_ARTIFACTS to move it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Server, ServerPool, insert

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CQRSKIT_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
CHROMIUM_FLAGS = [
    # The machine's network is closed: no background connections, no QUIC, no GPU.
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium() -> str:
    """Debian's Chromium, installed by scripts/install-chromium when it is missing."""
    found = shutil.which("chromium")
    if found is None:
        done = subprocess.run([str(REPO / "scripts" / "install-chromium")],
                              capture_output=True, text=True, timeout=600)
        found = shutil.which("chromium")
        if found is None:
            reason = f"Chromium is not installed and scripts/install-chromium failed: " \
                     f"{done.stderr.strip()[-500:]}"
            if os.environ.get("CQRSKIT_REQUIRE_SERVICES") == "1":
                pytest.fail(reason, pytrace=False)
            pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()


def _wait_for_text(
    page: Any, selector: str, check: Callable[[str], bool], timeout: float = 30
) -> None:
    """Poll an element's text from Python. Not `page.wait_for_function`: its string
    predicate runs through eval, which the dashboard's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not check(page.text_content(selector) or ""):
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} still shows {page.text_content(selector)!r}")
        page.wait_for_timeout(50)


@pytest.fixture
def server(servers: ServerPool, tmp_path: Path) -> Server:
    return servers.new({
        "CQRSKIT_DOMAINS": "cqrskit.domains.records,gate_domain",
        "CQRSKIT_TEST_GATE_FILE": str(tmp_path / "gate"),
        "CQRSKIT_STATUS_INTERVAL": "0.2",
    })


def test_dashboard_shows_the_pipeline_lag_and_a_record_round_trip(
    browser: Any, server: Server, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(server.url + "/")
    page.wait_for_selector("#connection.live")
    for node in ("API", "Command handler", "Command DB", "Event stream", "Update processors",
                 "Query DB", "Query handler"):
        assert page.locator("#pipeline .node b", has_text=node).count() == 1, node
    page.locator("#lag-table tbody tr").nth(2).wait_for()  # at least 3 rows
    assert page.text_content("#lag-events") == "0"

    # Hold the views back: the lag figure rises while the log grows.
    gate = tmp_path / "gate"
    gate.touch()
    with server.client() as client:
        insert(client, {"gate": True})
        for i in range(5):
            insert(client, {"i": i})
    _wait_for_text(page, "#lag-events", lambda text: text.isdigit() and int(text) >= 5)
    assert page.locator("#node-query-db.behind").count() == 1
    page.screenshot(path=str(ARTIFACTS / "lagging.png"), full_page=True)

    # Let go: the processor catches up and the figure falls back to 0.
    gate.unlink()
    _wait_for_text(page, "#lag-events", lambda text: text == "0")
    assert page.locator("#recent tbody tr").count() >= 6

    # A record through the form, read back through the form with its consistency token.
    page.fill("#insert-data", '{"color": "teal", "size": 7}')
    page.click("#insert-form button")
    _wait_for_text(page, "#insert-result", lambda text: text.startswith("202"))
    record_id = page.input_value("#query-id")
    assert record_id
    page.click("#query-form button")
    _wait_for_text(page, "#query-result", lambda text: "200" in text)
    answer = page.text_content("#query-result") or ""
    assert "(fresh read)" in answer and '"color": "teal"' in answer and record_id in answer
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # Bad input in the form gets the API's 4xx, shown as an error, and changes nothing.
    page.fill("#insert-data", "[1, 2]")
    page.click("#insert-form button")
    page.wait_for_selector("#insert-result.error")
    assert (page.text_content("#insert-result") or "").startswith("422")
    page.close()
    assert not [p for p in problems if "422" not in p], problems
