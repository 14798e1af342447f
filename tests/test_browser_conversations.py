"""Real-browser checks of the chat people reach for first: many conversations (new, switch,
rename, delete, search) kept across a reload and a server restart, and across browsers for a
login; ‹ › versions after Regenerate; Continue after a cut-off reply; the phone layout."""

import shutil
import time
from pathlib import Path

import pytest

from conftest import ARTIFACTS, RunningApp, free_port
from test_browser import BOT, USER, send, texts, wait_done
from test_browser_sharing import browser, log_in, open_page  # noqa: F401 - `browser` is a fixture

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)"),
]
DOCS = Path(__file__).resolve().parent.parent / "docs"
LIST = "#conversations label"


def titles(page):
    return [t.strip() for t in texts(page, LIST)]


def wait_titles(page, expected, timeout=30):
    page.wait_for_function(
        "([sel, want]) => JSON.stringify([...document.querySelectorAll(sel)].map(l => l.innerText.trim()))"
        " === JSON.stringify(want)", arg=[LIST, list(expected)], timeout=timeout * 1000)


def wait_chat(page, users, timeout=30):
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == {users}", timeout=timeout * 1000)


def pick(page, title, user_text):
    """Switch to a conversation and wait until its chat is on screen."""
    page.click(f"{LIST}:has-text('{title}')")
    page.wait_for_function(
        "([sel, text]) => { const u = [...document.querySelectorAll(sel)]; "
        "return u.length == 1 && u[0].innerText.includes(text); }", arg=[USER, user_text], timeout=30_000)
    page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].pop()?.innerText.trim().length > 0",
                           timeout=30_000)


def two_chats(page):
    send(page, "What is the capital of France? Answer in one sentence.")
    wait_done(page)
    page.click("#new-chat")
    wait_chat(page, 0)
    send(page, "Name a primary colour. One word.")
    wait_chat(page, 1)  # the status line says "Thinking…" from here on, until this reply ends
    wait_done(page)
    wait_titles(page, ["Name a primary colour. One word.", "What is the capital of France? Answer in one sentence."])


def test_many_conversations_survive_reload_and_restart(browser, tmp_path):  # noqa: F811
    port, state = free_port(), tmp_path / "state"
    app = RunningApp("--state-dir", str(state), port=port)
    try:
        page = open_page(browser.new_context(viewport={"width": 1400, "height": 900}), app.url)
        two_chats(page)
        # Switch back to the first: its chat comes back.
        pick(page, "What is the capital", "capital of France")
        assert "Paris" in texts(page, BOT)[-1]
        # Rename it, and search.
        page.click("#chat-menu")
        page.fill("#chat-title textarea, #chat-title input", "Geography")
        page.click("#rename-chat")
        wait_titles(page, ["Geography", "Name a primary colour. One word."])
        page.fill("#search-chats textarea, #search-chats input", "geo")
        page.wait_for_function(f"document.querySelectorAll('{LIST}').length == 1", timeout=10_000)
        page.fill("#search-chats textarea, #search-chats input", "")
        page.wait_for_function(f"document.querySelectorAll('{LIST}').length == 2", timeout=10_000)
        page.screenshot(path=str(DOCS / "conversations.png"))
        page.reload(wait_until="domcontentloaded")
        wait_titles(page, ["Geography", "Name a primary colour. One word."])
        wait_chat(page, 1)
        assert "Paris" in texts(page, BOT)[-1]  # the chat on screen before the reload
    finally:
        app.stop()
    app = RunningApp("--state-dir", str(state), port=port)  # same address: the browser's storage is per origin
    try:
        page.reload(wait_until="domcontentloaded")
        wait_titles(page, ["Geography", "Name a primary colour. One word."])
        pick(page, "Name a primary", "primary colour")
        assert "colour" in texts(page, USER)[-1]
        # Delete it (two steps): the other one stays.
        page.click("#chat-menu") if not page.is_visible("#delete-chat") else None
        page.click("#delete-chat")
        page.click("#delete-confirm")
        wait_titles(page, ["Geography"])
        wait_chat(page, 1)
        assert "Paris" in texts(page, BOT)[-1]
        page.reload(wait_until="domcontentloaded")
        wait_titles(page, ["Geography"])
    finally:
        app.stop()


def test_regenerate_keeps_versions_and_continue_extends_a_cut_off_reply(page, app):
    # A reply cut off at max_new_tokens offers Continue, which extends the same message.
    page.click("#new-chat")
    page.click("text=Sampling")
    page.fill("#max-new-tokens input[type=number]", "12")
    page.press("#max-new-tokens input[type=number]", "Enter")
    send(page, "Write a long story about a brave dragon who learns to read.")
    wait_done(page)
    status = page.inner_text("#status")  # (once seen without: the reply's text then says why)
    assert "cut off" in status, (status, texts(page, BOT))
    page.wait_for_selector("#continue", state="visible", timeout=10_000)
    before = texts(page, BOT)[-1]
    page.click("#continue")
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length == 1 && "
                           f"document.querySelector('#status').innerText.includes('tok/s') && "
                           f"[...document.querySelectorAll(\"{BOT}\")].pop().innerText.length > {len(before) + 5}",
                           timeout=60_000)
    after = texts(page, BOT)[-1]
    assert after.startswith(before.strip()[:20]) and len(after) > len(before), (before, after)
    page.screenshot(path=str(ARTIFACTS / "browser-continue.png"))
    # Regenerate keeps the earlier reply: ‹ 2 / 2 › under the new one goes back to it.
    page.fill("#max-new-tokens input[type=number]", "40")
    page.press("#max-new-tokens input[type=number]", "Enter")
    page.click("#do-sample input") if not page.is_checked("#do-sample input") else None
    page.click("#regenerate")
    page.wait_for_selector("#chatbot button:has-text('2 / 2')", timeout=60_000)
    wait_done(page)
    second = texts(page, BOT)[-1]
    page.screenshot(path=str(DOCS / "versions.png"))
    page.click("#chatbot button:has-text('‹')")
    page.wait_for_selector("#chatbot button:has-text('1 / 2')", timeout=20_000)
    assert texts(page, BOT)[-1].startswith(after.strip()[:20])
    page.click("#chatbot button:has-text('›')")
    page.wait_for_selector("#chatbot button:has-text('2 / 2')", timeout=20_000)
    assert texts(page, BOT)[-1] == second


def test_a_login_finds_its_conversations_in_another_browser(browser):  # noqa: F811
    app = RunningApp("--auth", "alice:wonder", "--admin", "alice", "--auth", "bob:builder")
    try:
        alice = log_in(browser, app.url, "alice", "wonder")
        two_chats(alice)
        # A second browser (a new context: no shared storage) logged in as alice finds both.
        again = log_in(browser, app.url, "alice", "wonder")
        wait_titles(again, ["Name a primary colour. One word.", "What is the capital of France? Answer in one sentence."])
        wait_chat(again, 1)
        # Bob sees none of them.
        bob = log_in(browser, app.url, "bob", "builder")
        time.sleep(1.5)
        assert titles(bob) == []
    finally:
        app.stop()


def test_phone_layout_keeps_input_send_stop_and_status_in_the_first_screen(browser, app):  # noqa: F811
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = open_page(context, app.url)
    send(page, "Say hello in one short sentence.")
    wait_done(page)
    for selector in ("#chat-input textarea", "#send", "#stop", "#status"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 844, (selector, box)
        # In sight, not under the sidebar: the element at its centre is it (or inside it).
        on_top = page.evaluate("([sel, x, y]) => document.querySelector(sel).contains(document.elementFromPoint(x, y))",
                               [selector, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
        assert on_top, f"{selector} is covered"
    send_box, stop_box = page.locator("#send").bounding_box(), page.locator("#stop").bounding_box()
    assert abs(send_box["y"] - stop_box["y"]) < 5  # Send and Stop on one row
    page.screenshot(path=str(DOCS / "phone.png"))


def test_a_reply_in_its_middle_survives_a_reload_and_a_server_restart(browser, tmp_path):  # noqa: F811
    """Without a login the browser keeps the chats, and gets its copy when a reply ends; meanwhile
    the server holds the chat (the question at once, the reply every 2 s), so a reload, or a
    restart of the server, in the middle of a reply loses neither the question nor what came."""
    port, state = free_port(), tmp_path / "state"
    app = RunningApp("--state-dir", str(state), port=port)
    count = "Count from 1 to 1000, one number per line, and write nothing else."
    try:
        page = open_page(browser.new_context(viewport={"width": 1400, "height": 900}), app.url)
        page.click("text=Sampling")
        page.fill("#max-new-tokens input[type=number]", "3000")
        page.press("#max-new-tokens input[type=number]", "Enter")
        send(page, count)
        streaming(page, 20)
        page.reload(wait_until="domcontentloaded")
        wait_chat(page, 1)
        assert texts(page, USER)[-1].strip() == count
        page.wait_for_function(f"document.querySelectorAll('{LIST}').length == 1", timeout=10_000)
        assert titles(page)[0].startswith("Count from 1 to 1000")
        # Then a restart: a new question, and the server stops while its reply streams.
        page.click("#new-chat")
        wait_chat(page, 0)
        send(page, "Now count from 1000 down to 1, one number per line.")
        streaming(page, 20)
        time.sleep(2.5)  # a checkpoint of the reply was written
        shown = texts(page, BOT)[-1]
    finally:
        app.stop()
    app = RunningApp("--state-dir", str(state), port=port)
    try:
        page.reload(wait_until="domcontentloaded")
        wait_chat(page, 1)
        assert "down to 1" in texts(page, USER)[-1]
        kept = texts(page, BOT)[-1]
        assert kept.split()[:3] == shown.split()[:3], (shown, kept)  # what streamed before the stop
        assert len(titles(page)) == 2
    finally:
        app.stop()


def streaming(page, chars):
    """Until the reply being written shows `chars` characters (it is still streaming)."""
    page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].pop()?.innerText.trim().length > {chars}",
                           timeout=60_000)
    assert "Thinking" in page.inner_text("#status") or "tok/s" not in page.inner_text("#status")
