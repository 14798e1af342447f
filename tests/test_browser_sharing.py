"""Real-browser checks of what sharing changed: the chat survives a server restart, a visitor sees
the model panel as read-only status, and other users' pages learn that the model changed."""

import shutil
import time

import pytest

from conftest import ARTIFACTS, CHROMIUM, RunningApp, free_port
from test_browser import BOT, USER, send, texts, wait_done

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)"),
]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def open_page(context, url):
    page = context.new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    return page


def test_the_chat_survives_a_server_restart(browser, tmp_path):
    port, state = free_port(), tmp_path / "state"
    app = RunningApp("--state-dir", str(state), port=port)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = open_page(context, app.url)
        before = page.evaluate("localStorage.getItem('confab-chat')")
        send(page, "What is the capital of France? Answer in one sentence.")
        wait_done(page)
        assert "Paris" in texts(page, BOT)[-1]
        # The browser's copy is written by the event after the reply: the server stops only then.
        page.wait_for_function("b => localStorage.getItem('confab-chat') !== b", arg=before, timeout=15_000)
    finally:
        app.stop()
    app = RunningApp("--state-dir", str(state), port=port)  # same address: the browser's storage is per origin
    try:
        page.reload(wait_until="domcontentloaded")
        page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 1", timeout=30_000)
        assert "Paris" in texts(page, BOT)[-1]
        page.screenshot(path=str(ARTIFACTS / "browser-after-restart.png"))
    finally:
        app.stop()


def log_in(browser, url, user, password):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(url, wait_until="domcontentloaded")
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", password)
    page.keyboard.press("Enter")
    page.wait_for_selector("#chat-input textarea", timeout=60_000)
    page.wait_for_function("document.querySelector('#status').innerText.includes('context')", timeout=30_000)
    return page


def test_visitors_see_the_model_read_only_and_every_page_learns_of_a_switch(browser):
    app = RunningApp("--auth", "alice:wonder", "--auth", "bob:builder", "--admin", "alice")
    try:
        alice = log_in(browser, app.url, "alice", "wonder")
        bob = log_in(browser, app.url, "bob", "builder")
        time.sleep(1.0)  # the load chain that sets the panel for this person has run
        assert alice.is_visible("#load") and alice.is_visible("#model-path")
        assert not bob.is_visible("#load") and not bob.is_visible("#unload") and not bob.is_visible("#model-path")
        assert "chosen by this server's operator" in bob.inner_text("#model-note")
        bob.screenshot(path=str(ARTIFACTS / "browser-visitor.png"))
        alice.click("#unload")
        start = time.monotonic()
        bob.wait_for_function("document.querySelector('#status').innerText.includes('No model loaded')",
                              timeout=15_000)
        print(f"\nbob's page learned of the unload after {time.monotonic() - start:.1f} s")
        alice.click("#load")
        bob.wait_for_function("document.querySelector('#status').innerText.includes('SmolLM2')", timeout=30_000)
    finally:
        app.stop()
