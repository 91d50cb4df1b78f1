"""The console in a real headless Chromium (Debian's, through Playwright) against the real app.

The app is started as the integration suite starts it (same LiveApp, ports,
overrides and bootstrap key) but for this package only: it is taken down
before the integration tests start their own, so two never share the cores.
Screenshots of every screen land in tests/browser/artifacts/ (git-ignored).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.conftest import BOOTSTRAP_KEY, LiveApp, running_live_app

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"
AXE_JS = HERE / "vendor" / "axe.min.js"
CHROMIUM = os.environ.get("FACESERVE_CHROMIUM", "/usr/bin/chromium")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _need_browser() -> None:
    """CI installs chromium (.ci/run) and must run these; elsewhere a missing browser skips."""
    missing = []
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail("browser tests need " + ", ".join(missing))
        pytest.skip("browser tests need " + ", ".join(missing))


class RunningApp:
    """A service already up (FACESERVE_CONSOLE_URL), for working on the console itself."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def client(self, *, key: str | None = BOOTSTRAP_KEY, timeout: float = 120) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, timeout=timeout, headers={"x-api-key": key} if key else {})


@pytest.fixture(scope="package")
def console_app() -> Iterator[LiveApp | RunningApp]:
    _need_browser()
    if os.environ.get("FACESERVE_CONSOLE_URL"):
        yield RunningApp(os.environ["FACESERVE_CONSOLE_URL"])
        return
    with running_live_app("faceserve_console") as app:
        yield app


@pytest.fixture(scope="package")
def browser(console_app: Any) -> Iterator[Any]:
    # After the app: Playwright's sync API keeps an event loop running in this
    # thread, and the app's set-up (the test database) runs asyncio.run().
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox",
            # a synthetic camera, granted without a prompt, for the webcam path
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        ])
        try:
            yield b
        finally:
            b.close()


class Console:
    """One browser tab on the console, with what went wrong in its scripts."""

    def __init__(self, browser: Any, app: LiveApp) -> None:
        self.app = app
        self.context = browser.new_context(viewport={"width": 1366, "height": 900}, permissions=["camera"])
        self.context.set_default_timeout(60_000)  # identify on 2 busy cores
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, key: str | None = BOOTSTRAP_KEY) -> "Console":
        self.page.goto(f"{self.app.url}/console/")
        self.page.wait_for_selector("#key-state:has-text('key set')", state="attached")
        if key is not None:
            self.page.fill("#key-input", key)
            self.page.click("#key-form button[type=submit]")
        return self

    def shot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"uncaught errors in the page: {self.errors}"


@pytest.fixture()
def new_console(browser: Any, console_app: LiveApp) -> Iterator[Any]:
    opened: list[Console] = []

    def make() -> Console:
        c = Console(browser, console_app)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    return AXE_JS.read_text()


@pytest.fixture(scope="session")
def key() -> str:
    return BOOTSTRAP_KEY
