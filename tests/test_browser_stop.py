"""Stop, Clear and Import while a reply streams, in a real browser (Playwright driving Debian's
chromium): no error badge, no chat written back over the user's action."""

import json
import shutil
import time

import pytest

from conftest import ARTIFACTS
from test_browser import BOT, USER, send, texts, wait_done

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)")]
ERRORS_JS = """[...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null && e.children.length == 0
    && /^\\s*error\\s*$/i.test(e.textContent || '')).length + document.querySelectorAll('.toast-body.error').length"""


def status(page):
    return page.inner_text("#status")


ENDED_JS = """(s => s.includes('stopped') || (s.includes('tok/s') && !s.includes('Thinking')))
    (document.querySelector('#status').innerText)"""


def test_stop_ten_times_in_a_row_never_shows_an_error(page):
    stopped, seen = 0, []
    for i in range(10):
        send(page, f"Write a long story about dragon number {i}.")
        # From right after Enter to well into the reply. Not later: the tiny model copies the short
        # (stopped) replies above, so its later replies end on their own within about a second.
        time.sleep(0.05 + 0.1 * (i % 4))
        page.click("#stop")
        try:
            # The question is in the chat once the server took the Send (stopped or not): only then
            # is the status this reply's, not the last one's.
            page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length >= {i + 1}", timeout=10_000)
            page.wait_for_function(ENDED_JS, timeout=10_000)  # stopped, or ended before the click landed
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser-stop-failed.png"))
            raise AssertionError(f"stop {i}: the status says {status(page)!r}") from None
        time.sleep(0.6)  # past the moment a Stop waits for a reply that had not begun
        stopped += "stopped" in status(page)
        seen.append(status(page))
        assert page.evaluate(ERRORS_JS) == 0, f"error badge after stop {i}"
        assert "Thinking" not in status(page)
        assert len(texts(page, USER)) == i + 1  # every question stays in the chat
        bots = texts(page, BOT)
        if bots and "stopped" in status(page) and len(bots) == i + 1:
            assert "(stopped)" in bots[-1] and "tokens" in bots[-1]  # the partial reply is kept, marked, counted
    print(f"\n{stopped} of 10 replies were stopped while they ran")
    # A reply the tiny model ends on its own before the click lands is fine; most are stopped.
    assert stopped >= 5, f"only {stopped} of 10 replies were still running when Stop was pressed: {seen}"
    page.screenshot(path=str(ARTIFACTS / "browser-stop-ten.png"))
    # The page still works: a question is answered to its end.
    send(page, "Say hello.")
    try:
        wait_done(page)
    finally:
        page.screenshot(path=str(ARTIFACTS / "browser-stop-after.png"))
    assert page.evaluate(ERRORS_JS) == 0 and len(texts(page, USER)) == 11


def streaming(page):
    try:
        page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].pop()?.innerText.length > 20",
                               timeout=30_000)
    finally:
        page.screenshot(path=str(ARTIFACTS / "browser-streaming.png"))


def test_clear_and_import_during_a_stream_are_not_undone(page, tmp_path):
    send(page, "Write a very long story about a dragon who learns to read.")
    streaming(page)
    page.click("#clear")
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 0", timeout=10_000)
    time.sleep(2)  # the stopped stream must not write its chat back
    assert texts(page, USER) == [] and texts(page, BOT) == []
    assert page.evaluate(ERRORS_JS) == 0


def test_import_during_a_stream_is_not_undone(page, tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "Imported question"},
                                {"role": "assistant", "content": "Imported answer"}]))
    send(page, "Write another very long story, about a knight.")
    streaming(page)
    with page.expect_file_chooser() as chooser:
        page.click("#import")
    chooser.value.set_files(str(chat))
    page.wait_for_function(f"[...document.querySelectorAll(\"{USER}\")].map(e => e.innerText).join() == "
                           "'Imported question'", timeout=15_000)
    time.sleep(2)
    assert texts(page, USER) == ["Imported question"] and texts(page, BOT) == ["Imported answer"]
    assert page.evaluate(ERRORS_JS) == 0
