"""The dashboard in a real headless Chromium against a real ``gpulane serve``: the page loads
and goes live, a submitted task appears and reaches ``succeeded``, its events show on a click
as text (a task's input cannot become markup), a keyed node asks for a key once and keeps it
for the tab, and a screenshot is left in test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.test_serve_cli import Server

WAIT_S = 30.0
"""Deadline of every wait on the page (each polls: none is a sleep)."""
KEY = "k-dash-tasks"
"""The one key of the keyed node (scope: tasks)."""
HOSTILE = '<img src=x id=pwned onerror="document.title=\'pwned\'"> & <b>bold</b>'
"""A task input that would run script if the page ever wrote data as markup."""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data")
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def keyed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("GPULANE_KEYS", f"dash:{KEY}:tasks")
    s = Server(tmp_path / "data")
    s.start()
    try:
        yield s
    finally:
        s.kill()


def wait(driver: WebDriver, check: Any, what: str) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(check, message=what)


def conn_state(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "conn").get_attribute("data-state"))


def task_state(driver: WebDriver, task_id: str) -> str | None:
    cells = driver.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-id="{task_id}"] td.state')
    return cells[0].get_attribute("data-state") if cells else None


def submit(server: Server, preset: str, inp: dict[str, Any], key: str | None = None,
           device: str = "cpu") -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{server.url}/v1/tasks", headers=headers, timeout=10,
                   json={"preset": preset, "input": inp, "device": device})
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    return task_id


def held_width(driver: WebDriver, kind: str) -> float:
    """The widest VRAM bar segment of one kind of holder, in percent of its GPU."""
    widths = driver.execute_script(
        "return [...document.querySelectorAll('#gpus .seg.' + arguments[0])]"
        ".map(e => parseFloat(e.style.width))", kind)
    return max(widths, default=0.0)


def test_the_page_goes_live_and_shows_a_task_through_to_succeeded(
        server: Server, chrome: WebDriver, artifacts: Path) -> None:
    chrome.get(server.url + "/")
    wait(chrome, lambda d: conn_state(d) == "live", "the status stream went live")
    assert chrome.title == "gpulane"
    paints = chrome.execute_script(
        "return performance.getEntriesByType('paint').map(e => e.name)")
    assert "first-paint" in paints and "first-contentful-paint" in paints
    # Two simulated GPUs and the CPU pool, each with its VRAM bar or slots.
    wait(chrome, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gpus .card")) == 3,
         "the GPU cards")
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#gpus .card .bar")) == 2
    assert chrome.find_elements(By.CSS_SELECTOR, "#lanes tbody tr")  # every preset's lanes

    task_id = submit(server, "echo-stream", {"text": HOSTILE})
    wait(chrome, lambda d: task_state(d, task_id) == "succeeded", "the task succeeded")

    chrome.find_element(By.CSS_SELECTOR, f'#tasks tr[data-id="{task_id}"] button').click()
    wait(chrome, lambda d: d.find_elements(By.CSS_SELECTOR, '#events-list li[data-type="text"]'),
         "the task's events")
    shown = chrome.find_element(By.ID, "events-list").text
    assert "<img src=x id=pwned" in shown  # the input as text, not as an element
    assert not chrome.find_elements(By.ID, "pwned") and chrome.title == "gpulane"
    assert chrome.find_element(By.ID, "events-task").text == task_id

    # VRAM by holder: a GPU worker's declared VRAM, and a lease with its row in the table.
    submit(server, "sleep", {"ms": 5}, device="gpu")
    wait(chrome, lambda d: held_width(d, "worker") > 0, "a GPU worker's VRAM in a bar")
    lease = httpx.post(f"{server.url}/v1/leases", timeout=10,
                       json={"holder": "<b>trainer</b>", "vram_mb": 8192, "ttl_s": 60}).json()
    wait(chrome, lambda d: held_width(d, "lease") > 30, "the lease's VRAM in a bar")
    row = chrome.find_element(By.CSS_SELECTOR, "#leases tbody tr")
    assert lease["id"] in row.text and "<b>trainer</b>" in row.text

    shot = artifacts / "dashboard.png"
    assert chrome.save_screenshot(str(shot)) and shot.stat().st_size > 0
    # No CSP violation, no script error: the page runs under its own policy as shipped.
    severe = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_a_keyed_node_asks_for_a_key_once_and_the_tab_keeps_it(
        keyed_server: Server, chrome: WebDriver, artifacts: Path) -> None:
    chrome.get(keyed_server.url + "/")
    form = chrome.find_element(By.ID, "keyform")
    wait(chrome, lambda d: form.is_displayed(), "the key form")
    assert conn_state(chrome) == "locked"
    assert not chrome.find_element(By.ID, "board").is_displayed()

    chrome.find_element(By.ID, "key").send_keys("k-not-a-key")
    chrome.find_element(By.CSS_SELECTOR, "#keyform button").click()
    wait(chrome, lambda d: "not known" in d.find_element(By.ID, "keyerror").text,
         "the unknown key refused")

    chrome.find_element(By.ID, "key").send_keys(KEY)
    chrome.find_element(By.CSS_SELECTOR, "#keyform button").click()
    wait(chrome, lambda d: conn_state(d) == "live", "the status stream went live with the key")
    assert chrome.execute_script("return sessionStorage.getItem('gpulane.key')") == KEY
    assert chrome.execute_script("return localStorage.length") == 0  # this tab only
    wait(chrome, lambda d: "lacks the leases scope" in d.find_element(By.ID, "leases-note").text,
         "the leases the key may not read")

    task_id = submit(keyed_server, "sleep", {"ms": 5}, key=KEY)
    wait(chrome, lambda d: task_state(d, task_id) == "succeeded", "the task succeeded")

    chrome.refresh()  # the same tab: no second question
    wait(chrome, lambda d: conn_state(d) == "live", "live again after a reload")
    assert not chrome.find_element(By.ID, "keyform").is_displayed()
    assert chrome.save_screenshot(str(artifacts / "dashboard-keyed.png"))
