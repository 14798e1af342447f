"""Real-browser checks of attachments: a picture sent to a tiny vision model built in the test
run (it reaches the prompt and stays in the chat after a reload), a PDF attached to the
embedded model (read to text, shown as a file), a picture refused by a text-only model in one
line, and a Thinking block from an imported conversation."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import RunningApp
from test_attachments import make_pdf
from test_browser import BOT, USER, send, texts, wait_done
from test_browser_sharing import browser, open_page  # noqa: F401 - `browser` is a fixture
from test_vision import build_tiny_vlm, picture

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)"),
]
DOCS = Path(__file__).resolve().parent.parent / "docs"
FILE_INPUT = "#chat-input input[type=file]"


def attach(page, *paths):
    page.set_input_files(FILE_INPUT, [str(p) for p in paths])
    # The box shows each upload once it is on the server.
    page.wait_for_function(f"document.querySelectorAll('#chat-input .thumbnail-item').length >= {len(paths)}",
                           timeout=30_000)


def ask(page, text, users):
    """Send, and wait for this reply's end (not the last one's: the status line changes late)."""
    send(page, text)
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == {users}", timeout=30_000)
    wait_done(page)


def context_used(page) -> int:
    status = page.inner_text("#status")
    return int(re.search(r"context ([\d,]+) /", status).group(1).replace(",", ""))


def test_a_picture_reaches_the_tiny_vision_model_and_stays_after_reload(browser, tmp_path):  # noqa: F811
    model = build_tiny_vlm(tmp_path / "tiny-vlm")
    png = tmp_path / "square.png"
    png.write_bytes(picture(3).data)
    app = RunningApp("--model", str(model), "--backend", "transformers", "--state-dir", str(tmp_path / "state"),
                     "--max-new-tokens", "24", timeout=180)
    try:
        page = open_page(browser.new_context(viewport={"width": 1400, "height": 900}), app.url)
        page.wait_for_selector("#attach", timeout=10_000)  # the paperclip, with its stable id
        ask(page, "what is this?", 1)
        without = context_used(page)
        page.click("#new-chat")
        page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 0", timeout=30_000)
        attach(page, png)
        ask(page, "what is this?", 2)  # the picture and the text, each in its own bubble
        with_picture = context_used(page)
        # The picture's tokens (4 per tile, with their markers) went into the prompt.
        assert with_picture > without + 4, (with_picture, without)
        page.wait_for_selector(f"{USER} img", timeout=10_000)
        assert texts(page, BOT)[-1].strip()
        page.screenshot(path=str(DOCS / "attachments.png"))
        # Kept: the picture is in the chat after a reload, and a follow-up still answers.
        page.reload(wait_until="domcontentloaded")
        page.wait_for_selector(f"{USER} img", timeout=30_000)
        ask(page, "and now?", 3)
    finally:
        app.stop()


def test_a_pdf_is_read_into_the_message_and_a_picture_is_refused_by_a_text_model(page, tmp_path):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(make_pdf(["The secret word is tangerine.", "It is written on page two as well."]))
    attach(page, pdf)
    ask(page, "What is the secret word in the file? Answer with one word.", 2)  # the file, then the text
    users = texts(page, USER)
    assert "report.pdf" in users[0] and "secret word in the file" in users[1]
    assert context_used(page) > 40  # the PDF's text was read into the prompt

    png = tmp_path / "dot.png"
    png.write_bytes(picture(1).data)
    attach(page, png)
    send(page, "What is in this picture?")
    page.wait_for_selector("text=reads text only", timeout=30_000)
    assert len(texts(page, USER)) == 2  # nothing was added to the chat


def test_an_imported_conversation_shows_its_thinking_folded(page, tmp_path):
    chat = [{"role": "user", "content": "Is 91 prime?"},
            {"role": "assistant", "content": "No: 91 = 7 × 13.",
             "reasoning_content": "91 is odd. 91 / 7 = 13, so it has the factors 7 and 13."}]
    path = tmp_path / "reasoned.json"
    path.write_text(json.dumps(chat))
    with page.expect_file_chooser() as chooser:
        page.click("#import")
    chooser.value.set_files(str(path))
    page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].some(b => b.innerText.includes('7 × 13'))",
                           timeout=30_000)
    body = page.inner_text("#chatbot")
    assert "Thinking" in body
    assert "91 is odd" not in body  # folded until it is opened
    page.click("#chatbot button:has-text('Thinking'), #chatbot :text('Thinking')")
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('91 is odd')", timeout=10_000)
    time.sleep(0.5)  # the fold opens with an animation
    page.screenshot(path=str(DOCS / "thinking.png"))
