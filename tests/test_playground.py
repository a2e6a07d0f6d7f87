"""The playground at ``/`` in a real headless Chromium (Debian's, driven by Selenium through the
system chromedriver, so nothing is downloaded) against a real ``python -m service``: a drawn
digit shows the label the API returns for the same pixels, a second model with another input
shape works too, and the repository panel notices a new version going live."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.live import ServiceProcess, random_mlp
from tests.service.numpy_model import publish_tiny

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1200,1000",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[ServiceProcess, Path]]:
    tmp = tmp_path_factory.mktemp("playground")
    repo = tmp / "repo"
    random_mlp(repo, "digits-mlp", hidden=(64, 64), seed=0)
    publish_tiny(repo, "tiny", seed=0)  # another input shape: (1, 6, 6), labels a/b/c
    process = ServiceProcess(repo, tmp / "server.log", poll_interval_s=0.5, log_json="false")
    try:
        process.wait_ready()
        yield process, repo
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout_s: float = 30.0):
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(condition)


def draw_seven(driver) -> None:
    """A '7': a bar across the top and a diagonal down (offsets from the pad's centre)."""
    pad = driver.find_element(By.ID, "pad")
    ActionChains(driver).move_to_element_with_offset(pad, -80, -90).click_and_hold().move_by_offset(
        80, 0
    ).move_by_offset(80, 0).move_by_offset(-60, 90).move_by_offset(-50, 90).release().perform()


def shown_result(driver, previous: object = None) -> dict:
    """The page's last result once a new one arrived, with the pixels it sent."""
    result = wait(
        driver,
        lambda d: d.execute_script(
            "const p = window.playground; return p.lastResult && p.lastResult !== arguments[0]"
            " ? {result: p.lastResult, data: p.lastInput, shape: p.lastShape} : null",
            previous,
        ),
    )
    return result


def api_label(url: str, model: str, data: list, shape: list) -> str:
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
            "outputs": [{"name": "label"}]}  # fmt: skip
    response = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"][0]


def test_a_drawn_digit_shows_the_label_the_api_gives_for_the_same_pixels(server, browser):
    process, _ = server
    browser.get(process.url + "/")
    wait(browser, lambda d: d.execute_script("return window.playground.models") == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("digits-mlp")
    wait(browser, lambda d: "[-1,1,8,8]" in d.find_element(By.ID, "input-info").text)
    info = browser.find_element(By.ID, "input-info").text
    assert "Format v1," in info and "dense ×" in info  # the layer graph from the metadata
    draw_seven(browser)
    shown = shown_result(browser)
    assert shown["shape"] == [1, 1, 8, 8]
    pixels = shown["data"]
    assert len(pixels) == 64 and min(pixels) == 0 and 8 <= max(pixels) <= 16  # ink on black
    assert all(float(p).is_integer() for p in pixels)  # integer-valued input, as trained
    label = browser.find_element(By.ID, "label").text
    assert (
        label
        == shown["result"]["label"]
        == api_label(process.url, "digits-mlp", pixels, [1, 1, 8, 8])
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10
    assert "server" in browser.find_element(By.ID, "latency").text
    assert browser.find_element(By.ID, "error").text == ""


def test_another_input_shape_and_the_repository_panel(server, browser):
    process, repo = server
    browser.get(process.url + "/")
    wait(browser, lambda d: d.execute_script("return window.playground.models") == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    wait(browser, lambda d: "[-1,1,6,6]" in d.find_element(By.ID, "input-info").text)
    draw_seven(browser)
    shown = shown_result(browser)
    assert shown["shape"] == [1, 1, 6, 6] and len(shown["data"]) == 36
    label = browser.find_element(By.ID, "label").text
    assert label in ("a", "b", "c")
    assert label == api_label(process.url, "tiny", shown["data"], [1, 1, 6, 6])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3

    def rows(d) -> list[list[str]]:
        """The repository panel's rows; none while the panel is being re-rendered (its poll
        replaces the rows, so an element read mid-render is stale)."""
        try:
            return [
                [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                for row in d.find_elements(By.CSS_SELECTOR, "#index tr")
            ]
        except StaleElementReferenceException:
            return []

    wait(browser, lambda d: ["tiny", "1", "READY", ""] in rows(d))
    publish_tiny(repo, "tiny", seed=1)  # version 2: the poller loads it, the panel notices
    notice = wait(
        browser,
        lambda d: (n := d.find_element(By.ID, "live-notice")).is_displayed() and n.text,
    )
    assert notice == "tiny version 2 is live (was 1)."
    wait(browser, lambda d: ["tiny", "2", "READY", ""] in rows(d))
    wait(browser, lambda d: ["tiny", "1", "UNAVAILABLE", "superseded by version 2"] in rows(d))
