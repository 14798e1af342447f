"""One real-browser session (Playwright driving Debian's chromium) against the launched app:
ask, watch it stream, stop, reload and find the chat, regenerate, undo, edit, clear."""

import shutil
import time

import pytest

from conftest import ARTIFACTS  # the `page` fixture is in conftest.py

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)"),
]
BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"


def texts(page, selector):
    return [el.inner_text() for el in page.query_selector_all(selector)]


def send(page, text):
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")


def wait_done(page, timeout=60):
    """Until a reply has ended normally (a stopped one's status line says "stopped"). If it does
    not, the failure says what the page showed (and tests/artifacts has its screenshot)."""
    try:
        page.wait_for_function("(s => s.includes('tok/s') && !s.includes('stopped') && !s.includes('Thinking'))"
                               "(document.querySelector('#status').innerText)", timeout=timeout * 1000)
    except Exception as e:  # noqa: BLE001 - Playwright's timeout says nothing of the page
        page.screenshot(path=str(ARTIFACTS / "browser-wait-done-failed.png"))
        raise AssertionError(f"no reply ended in {timeout} s: the status says {page.inner_text('#status')!r}; "
                             f"the chat has {texts(page, USER)!r} and {texts(page, BOT)!r}") from e


def test_chat_in_a_real_browser(page, app):
    # Ask and watch the reply grow.
    send(page, "Write a long story about a brave dragon who learns to read.")
    seen, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline and len(set(seen)) < 5:
        bots = texts(page, BOT)
        if bots and bots[-1].strip():
            seen.append(bots[-1])
        time.sleep(0.05)
    distinct = list(dict.fromkeys(seen))
    assert len(distinct) >= 5, distinct
    assert all(b.startswith(a.strip()[:10]) for a, b in zip(distinct, distinct[1:]))

    # Stop: the text stops growing and the input is usable again.
    page.click("#stop")
    time.sleep(1.0)
    stopped = texts(page, BOT)[-1]
    time.sleep(1.5)
    assert texts(page, BOT)[-1] == stopped
    assert len(stopped) > 0
    page.screenshot(path=str(ARTIFACTS / "browser-stopped.png"))

    # A short question is answered right away: the engine is free.
    send(page, "What is the capital of France? Answer in one sentence.")
    wait_done(page)
    assert "Paris" in texts(page, BOT)[-1]
    assert len(texts(page, USER)) == 2
    page.screenshot(path=str(ARTIFACTS / "browser-chat.png"))

    # Reload: the conversation comes back from the browser's storage.
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 2", timeout=30_000)
    assert "Paris" in texts(page, BOT)[-1]
    assert texts(page, BOT)[0].startswith(stopped[:20])

    # Regenerate replaces the last reply; undo puts the last question back in the box.
    page.click("#regenerate")
    wait_done(page)
    assert len(texts(page, BOT)) == 2
    page.click("#undo")
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 1", timeout=10_000)
    assert page.input_value("#chat-input textarea").startswith("What is the capital of France")

    # Edit the first question in place: the conversation continues from the edit.
    page.click("#chatbot button[aria-label='Edit']", timeout=10_000)
    box = page.wait_for_selector("#chatbot textarea.edit-textarea", timeout=10_000)
    box.fill("What is the capital of Italy? Answer in one sentence.")
    page.click("#chatbot button[aria-label='Submit']", timeout=10_000)
    page.wait_for_function("document.querySelector('#status').innerText.includes('tok/s')", timeout=60_000)
    page.wait_for_function(
        f"[...document.querySelectorAll(\"{BOT}\")].pop()?.innerText.includes('Rome')", timeout=60_000
    )
    assert texts(page, USER) == ["What is the capital of Italy? Answer in one sentence."]

    # Clear empties the chat, and that survives a reload too.
    page.click("#clear")
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 0", timeout=10_000)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#chat-input textarea")
    time.sleep(1.5)
    assert texts(page, USER) == []
