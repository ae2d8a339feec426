"""A headless Chromium driven by selenium, and where the browser tests leave their artifacts.

Chromium and chromedriver are Debian's (``apt-get install chromium chromium-driver``; .ci/run
installs them). Missing here, the browser tests are skipped; with the environment variable
``CI`` set they fail instead, so that a CI image without them cannot pass.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("GPULANE_TEST_ARTIFACTS", REPO / "test-artifacts"))
"""Where screenshots go (git ignores test-artifacts/; CI may upload it)."""


def chromium_paths() -> tuple[str, str]:
    """The Chromium binary and its chromedriver, or a skip (a failure when CI is set)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        msg = "chromium and chromedriver are not installed (apt-get install chromium " \
              "chromium-driver): the dashboard cannot be tested in a browser"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set, so this is an error)")
        pytest.skip(msg)
    return browser, driver


def headless_chromium(width: int = 1400, height: int = 1000) -> WebDriver:
    """A started headless Chromium driven by selenium; quit it after use."""
    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture
def chrome() -> Iterator[WebDriver]:
    drv = headless_chromium()
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
