"""The page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

This test fails, never skips, when the browser or Playwright is missing: CI installs both
(``apt-get install chromium``, ``pip install playwright``; no browser download).
The screenshot lands in ``tests/artifacts/playground.png`` (git-ignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.serve.conftest import SLOVENIA

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no chromium on PATH: apt-get install -y chromium (the browser test never skips)")


def test_page_makes_an_edit_and_shows_the_gate(server) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            page.wait_for_selector("#method option", state="attached")
            page.select_option("#case", "")
            for field in ("subject", "prompt", "target", "target_true"):
                page.fill(f"#{field}", SLOVENIA[field])
            page.check("#rep")
            page.fill("#probes", "Slovenia is a country in")
            page.click("#edit")
            page.wait_for_selector("#probe-table", timeout=300_000)
            title = page.inner_text("#result-title")
            assert "Slovenia" in title and "Antarctica" in title
            rows = page.locator("#probe-table tr")
            assert rows.count() > 3
            assert page.locator(".strip span.gate").count() > 0
            assert page.locator("#beta svg").count() == 1
            page.fill("#ask", "Slovenia is located in the continent of")
            page.click("#probe")
            page.wait_for_selector("#probed table")
            page.click("#error")  # the error line stays empty
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
            # bad input: a message on the page, no crash
            page.fill("#prompt", "no slot here")
            page.click("#edit")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "must contain" in page.inner_text("#error")
            assert not errors, errors
        finally:
            browser.close()
    assert (ARTIFACTS / "playground.png").stat().st_size > 0
