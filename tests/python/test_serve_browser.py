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
from serve_helpers import ServerProcess, WriterProcess, class_rows

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
        neighbour_keys = [tr.find_element(By.TAG_NAME, "td").text for tr in
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


def chart_points(driver):
    """The projection's points on the chart (no labels file: one dataset), as [x, y] pairs."""
    return driver.execute_script(
        "return window.embstoreChart().data.datasets.filter(d => d.label === 'rows')"
        ".flatMap(d => d.data.map(p => [p.x, p.y]))")


def script_errors(driver):
    """The page's console errors, but for the HTTP errors of requests (404s it shows)."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def test_page_redraws_an_epoch_a_truncate_rewrote_and_says_when_its_epoch_is_gone(store, tmp_path):
    """A run resumed from a checkpoint: the epoch shown is truncated away and written again, with
    as many rows (other vectors), between two polls of the page: the page redraws it (it
    compared only the epoch and its rows, and kept the old points). Then the epoch looked at is
    truncated away: the page drops its points and says so (it went on showing them), and draws
    the epoch once it is written again."""
    rng = np.random.default_rng(8)
    keys = np.arange(200)
    with embstore.Writer(store, dim=DIM) as w:
        for epoch in range(3):
            w.append(keys, class_rows(keys, epoch, DIM, rng), epoch)
    server = ServerProcess(store)
    driver = None
    try:
        driver = chromium(tmp_path)
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        status = driver.find_element(By.ID, "projection-status")
        wait.until(lambda d: status.get_attribute("data-epoch") == "2")
        before = chart_points(driver)
        assert len(before) == 200

        with embstore.Writer(store) as w:
            w.truncate(from_epoch=2)
            w.append(keys, class_rows(keys, 2, DIM, rng) * 100, 2)
        p = server.until("/api/projection?epoch=2",  # once the server has the new rows
                         lambda p: [[x, y] for x, y in zip(p["x"], p["y"])] != before)
        assert server.ok("/api/stats")["epochs"][-1] == {"epoch": "2", "rows": 200}
        redrawn = [[x, y] for x, y in zip(p["x"], p["y"])]
        wait.until(lambda d: chart_points(d) == redrawn)
        assert status.get_attribute("data-epoch") == "2"

        next(b for b in driver.find_elements(By.CSS_SELECTOR, "#epoch-bars span")
             if b.get_attribute("data-epoch") == "1").click()
        wait.until(lambda d: status.get_attribute("data-epoch") == "1")
        assert not driver.find_element(By.ID, "follow").is_selected()
        with embstore.Writer(store) as w:
            w.truncate(from_epoch=1)
        wait.until(lambda d: "epoch 1 is no longer in the store" in status.text)
        assert chart_points(driver) == []
        assert driver.find_element(By.ID, "rows").text == "200"

        with embstore.Writer(store) as w:
            w.append(keys, class_rows(keys, 1, DIM, rng), 1)
        wait.until(lambda d: status.get_attribute("data-epoch") == "1"
                   and status.get_attribute("data-rows") == "200")
        assert len(chart_points(driver)) == 200
        assert script_errors(driver) == []
    finally:
        if driver is not None:
            driver.quit()
        code, err = server.stop()
        assert code == 0, err


def test_a_searched_key_keeps_its_trajectory_at_an_epoch_without_its_row(store, tmp_path):
    """The page follows a new epoch that has not reached the searched key yet: its neighbours
    there are a 404, which threw the key's trajectory away too (the search disappeared at each
    new epoch). The trajectory stays, the page says the neighbours are not available at that
    epoch, and shows them once the key's row is written."""
    rng = np.random.default_rng(9)
    with embstore.Writer(store, dim=DIM) as w:
        for epoch in range(3):
            w.append(np.arange(200), class_rows(np.arange(200), epoch, DIM, rng), epoch)
    server = ServerProcess(store)
    driver = None
    try:
        driver = chromium(tmp_path)
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        status = driver.find_element(By.ID, "projection-status")
        wait.until(lambda d: status.get_attribute("data-epoch") == "2")
        driver.find_element(By.ID, "key").send_keys("150")
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")) == 10)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#trajectory li")) == 3

        with embstore.Writer(store) as w:  # epoch 3 begins: keys 0..99, not yet 150
            w.append(np.arange(100), class_rows(np.arange(100), 3, DIM, rng), 3)
        wait.until(lambda d: status.get_attribute("data-epoch") == "3")  # searched again
        assert driver.find_element(By.ID, "search-result").is_displayed()
        assert not driver.find_element(By.ID, "search-error").is_displayed()
        assert [li.get_attribute("data-epoch") for li in
                driver.find_elements(By.CSS_SELECTOR, "#trajectory li")] == ["0", "1", "2"]
        missing = driver.find_element(By.ID, "neighbours-missing")
        assert missing.is_displayed()
        assert not driver.find_element(By.ID, "neighbours").is_displayed()
        assert "not available at epoch 3: key 150 has no row at epoch 3" in missing.text

        with embstore.Writer(store) as w:  # the rest of epoch 3 (redrawn within 5 s)
            w.append(np.arange(100, 200), class_rows(np.arange(100, 200), 3, DIM, rng), 3)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#trajectory li")) == 4)
        wait.until(lambda d: not missing.is_displayed())
        assert len(driver.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")) == 10
        assert driver.find_element(By.ID, "neighbours").is_displayed()
        assert script_errors(driver) == []
    finally:
        if driver is not None:
            driver.quit()
        code, err = server.stop()
        assert code == 0, err


def test_the_page_keeps_keys_and_epochs_above_2_53_exact(store, tmp_path):
    """Keys and epochs are uint64: sent as JSON numbers, the page's JSON.parse rounded those above
    2**53, so it showed epoch 9223372036854775813 as 9223372036854776000 and asked the server for
    that epoch (a 404: no projection). The page shows, requests and searches them exactly."""
    epoch, top = 2**63 + 5, 2**64 - 1
    keys = np.array([top, top - 1, top - 2, 2**53 + 1, 2**53] + list(range(20)), np.uint64)
    rng = np.random.default_rng(14)
    with embstore.Writer(store, dim=DIM) as w:
        w.append(keys, class_rows(np.arange(len(keys)), 0, DIM, rng), epoch=2**53 + 1)
        w.append(keys, class_rows(np.arange(len(keys)), 1, DIM, rng), epoch=epoch)
    server = ServerProcess(store)
    driver = None
    try:
        driver = chromium(tmp_path)
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        status = driver.find_element(By.ID, "projection-status")
        wait.until(lambda d: status.get_attribute("data-points") == str(len(keys)))
        assert status.get_attribute("data-epoch") == str(epoch)
        assert driver.find_element(By.ID, "epoch-value").text == "9223372036854775813"
        assert [b.get_attribute("data-epoch") for b in
                driver.find_elements(By.CSS_SELECTOR, "#epoch-bars span")] == \
            ["9007199254740993", "9223372036854775813"]
        drawn = driver.execute_script(
            "return window.embstoreChart().data.datasets.flatMap(d => d.data.map(p => p.key))")
        assert sorted(drawn) == sorted(str(k) for k in keys.tolist())

        driver.find_element(By.ID, "key").send_keys(str(top))
        driver.find_element(By.ID, "search").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#trajectory li")) == 2)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")) == 10)
        assert driver.find_element(By.ID, "result-key").text == "18446744073709551615"
        assert [li.get_attribute("data-epoch") for li in
                driver.find_elements(By.CSS_SELECTOR, "#trajectory li")] == \
            ["9007199254740993", "9223372036854775813"]
        shown = [tr.find_element(By.TAG_NAME, "td").text for tr in
                 driver.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")]
        assert shown == [n["key"] for n in server.ok(
            f"/api/neighbours?key={top}&epoch={epoch}&k=10")["neighbours"]]
        # The trajectory's point at the epoch drawn is the one marked (compared as strings).
        radii = driver.execute_script(
            "return window.embstoreChart().data.datasets"
            ".filter(d => d.label === 'trajectory of key 18446744073709551615')"
            ".map(d => d.pointRadius)")
        assert radii == [[3, 7]]
        assert not driver.find_element(By.ID, "error").is_displayed()
        assert not driver.find_element(By.ID, "search-error").is_displayed()
        assert script_errors(driver) == []
    finally:
        if driver is not None:
            driver.quit()
        code, err = server.stop()
        assert code == 0, err
