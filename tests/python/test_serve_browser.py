"""`embstore serve` in a real browser: headless Chromium driven by Selenium loads the page while
a writer process appends, sees the projection render and follow a new epoch, searches a key and
sees its neighbours and trajectory, then sees the error the page shows when the store is damaged.
Saves a screenshot into the test's tmp dir (path printed)."""
import json
import os
import shutil
import time

import numpy as np
import pytest

import embstore
from serve_helpers import ServerProcess, WriterProcess

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("aiohttp")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian chromium and chromium-driver (tools/packages.txt)")
DIM = 16


def chromium(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,950", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_page_renders_follows_a_writer_and_draws_a_trajectory(store, tmp_path):
    embstore.create(store, dim=DIM)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(k): str(k % 10) for k in range(300)}))
    writer = WriterProcess(store, DIM)
    server = driver = None
    try:
        writer.append(0, 0, 300)
        server = ServerProcess(store, "--labels", str(labels))
        driver = chromium(tmp_path)
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        status = driver.find_element(By.ID, "projection-status")
        wait.until(lambda d: status.get_attribute("data-epoch") == "0")
        assert int(status.get_attribute("data-points")) == 300
        drawn = driver.execute_script(
            "return window.embstoreChart().data.datasets.reduce((n, d) => n + d.data.length, 0)")
        assert drawn == 300
        assert driver.find_element(By.ID, "rows").text == "300"
        # The last commit the store recorded, from before the server started, in local time.
        recorded = embstore.info(store)["last_commit_unix_ns"] / 1e9
        shown = driver.execute_script("return new Date(arguments[0] * 1000).toLocaleString()",
                                      recorded)
        wait.until(lambda d: d.find_element(By.ID, "last-commit").text == shown)

        # A new epoch arrives while the page is open: the page follows it.
        writer.send(1, 0, 300, batch=30)
        wait.until(lambda d: d.find_element(By.ID, "rows").text != "300")
        writer.done()
        wait.until(lambda d: status.get_attribute("data-epoch") == "1"
                   and status.get_attribute("data-rows") == "300")
        assert driver.find_element(By.ID, "epoch-count").text == "2"

        key_box = driver.find_element(By.ID, "key")
        key_box.send_keys("abc")
        driver.find_element(By.ID, "search").click()
        search_error = driver.find_element(By.ID, "search-error")
        wait.until(lambda d: search_error.is_displayed())
        assert "non-negative integer" in search_error.text

        key_box.clear()
        key_box.send_keys("7")
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#trajectory li")) == 2)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")) == 10)
        trajectory = driver.execute_script(
            "return window.embstoreChart().data.datasets"
            ".filter(d => d.label === 'trajectory of key 7')"
            ".map(d => d.data.map(p => [p.epoch, p.x, p.y]))")
        history = server.ok("/api/history?key=7")["trajectory"]
        assert trajectory == [[[p["epoch"], p["x"], p["y"]] for p in history]]
        neighbour_keys = [int(tr.find_element(By.TAG_NAME, "td").text) for tr in
                          driver.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")]
        assert neighbour_keys == [n["key"] for n in
                                  server.ok("/api/neighbours?key=7&epoch=1&k=10")["neighbours"]]
        assert not driver.find_element(By.ID, "error").is_displayed()

        shot = tmp_path / "serve-page.png"
        assert driver.save_screenshot(str(shot))
        print(f"\nscreenshot of the page: {shot}")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe

        # The store is damaged under the page: it says so, and the server keeps answering.
        rows_file = os.path.join(store, f"rows.{embstore.info(store)['generation']}")
        os.truncate(rows_file, 4096)
        error = driver.find_element(By.ID, "error")
        wait.until(lambda d: error.is_displayed() and "truncated" in error.text)
        assert rows_file in error.text
        assert server.alive()
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            code, err = server.stop()
            assert code == 0, err
        writer.close()
