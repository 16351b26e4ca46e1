"""The console in a real browser: Debian's Chromium, driven headless by Selenium through
Debian's chromedriver (nothing is downloaded at run time). Every page's screenshot is kept
under test-artifacts/console/, and no page may log a console error (a
Content-Security-Policy violation is one)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts" / "console"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = (
            "Debian's chromium and chromium-driver are not installed (make test installs them)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


class Page:
    """The browser on the console, with the checks every page gets."""

    def __init__(self, driver: Any, server: Any) -> None:
        self.driver, self.server = driver, server

    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
        errors = self.errors()
        assert not errors, errors

    def errors(self) -> list[dict]:
        """Console errors: script errors, policy violations, assets that failed to load.
        The refusals a test asks for (401, 403, 429 pages) are not errors of the page, nor
        is what another site's pages fail to load (an identity provider's sign-in pages)."""
        return [
            e
            for e in self.driver.get_log("browser")
            if e["level"] == "SEVERE"
            and not (
                e["source"] == "network"
                and (
                    any(f"status of {c} " in e["message"] for c in (400, 401, 403, 429))
                    or not e["message"].startswith(self.server.url)
                )
            )
        ]

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def fill(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            field = self.find(f'[name="{name}"]')
            field.clear()
            field.send_keys(value)

    def click(self, css: str) -> None:
        """Click, and wait for the page it loads (a form's answer, a link)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.wait import WebDriverWait

        old = self.find("html")
        self.find(css).click()

        def gone(_: Any) -> bool:
            try:
                old.is_enabled()
            except WebDriverException:  # stale, or detached while it was being asked
                return True
            return False

        WebDriverWait(self.driver, 10).until(gone)

    def sign_in(self, key: str) -> None:
        self.driver.delete_all_cookies()
        self.open("/ui/signin")
        self.fill({"key": key})
        self.click("#signin")

    @property
    def path(self) -> str:
        return urllib.parse.urlparse(self.driver.current_url).path
