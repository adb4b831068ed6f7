"""Saves a screenshot of the live page of `embstore serve` (headless Chromium via Selenium),
after searching a sample id so that its neighbours and trajectory are drawn.

Usage: screenshot.py URL OUT.png [--key K]
"""
import argparse
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--key", default="0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(args.url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: int(d.find_element(By.ID, "projection-status")
                                     .get_attribute("data-points")) > 0)
            driver.find_element(By.ID, "key").send_keys(args.key)
            driver.find_element(By.ID, "search").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#trajectory li"))
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
