"""Headless Chromium for the browser tests and scripts/student_flow.py.

Driven by Selenium through Debian's chromedriver: packages chromium and chromium-driver
come from the same source build, so browser and driver always match, and nothing is
downloaded at run time (`make install` adds both where it runs as root with apt).
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "run `make install` as root, or `apt-get install -y chromium chromium-driver`"
PHONE = (375, 812)       # an iPhone's CSS pixels: what a student reads the feedback on
LAPTOP = (1280, 900)


class BrowserMissing(RuntimeError):
    """No headless Chromium can be started here; the message says what is missing."""


def find_chromium() -> tuple[str, str]:
    """(the browser, its driver), or BrowserMissing naming what is not installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise BrowserMissing("selenium is not installed (pyproject.toml's [browser] extra: "
                             "`make install`)") from None
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
        raise BrowserMissing(f"{missing} not found on PATH: {INSTALL_HINT}")
    return browser, driver


@contextmanager
def chromium(size: tuple[int, int] = LAPTOP, phone: bool = False) -> Iterator:
    """A headless Chromium (a Selenium WebDriver) of that many CSS pixels; `phone`
    emulates a touch screen's viewport, which a desktop window cannot be narrowed to."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium's own sandbox cannot start as root, which tests here run as.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={size[0]},{size[1]}"):
        options.add_argument(argument)
    if phone:
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {
            "width": size[0], "height": size[1], "pixelRatio": 2, "touch": True}})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, path: Path) -> Path:
    """Save what the browser shows and say where (pytest -s, or the script's output, prints it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"Chromium could not save a screenshot to {path}")
    print(f"screenshot: {path}")
    return path
