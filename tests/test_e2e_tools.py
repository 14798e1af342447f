"""Tool calling in the page, end to end: a preset that switches the calculator on, the embedded
model writing the call (a few-shot chat teaches SmolLM2 the format), and the chat showing it as a
collapsible step."""

import json
import shutil

import pytest
from gradio_client import Client

from conftest import ARTIFACTS, RunningApp

pytestmark = pytest.mark.timeout(240)

PRESET = '''name = "SmolLM2 with tools"
backend = "llamacpp"
model = "embedded"
n_ctx = 4096
tools = ["calculator"]

[sampling]
do_sample = false
max_new_tokens = 60
'''


def text(t):  # Gradio 6 chat content is a list of parts
    return [{"type": "text", "text": t}]


def step(expression, result):
    return {"role": "assistant", "content": text(result),
            "metadata": {"title": f"Tool: calculator(expression='{expression}')", "status": "done"}}


FEW_SHOT = []
for q, e, r in [("What is 2+3?", "2+3", "5"), ("What is 10*4?", "10*4", "40")]:
    FEW_SHOT += [{"role": "user", "content": text(q)}, step(e, r), {"role": "assistant", "content": text(f"{e} = {r}.")}]


@pytest.fixture(scope="module")
def tools_app(tmp_path_factory):
    presets = tmp_path_factory.mktemp("presets")
    (presets / "smollm2-tools.toml").write_text(PRESET)
    running = RunningApp("--presets-dir", str(presets), "--preset", "smollm2-tools")
    yield running
    running.stop()


def ask(app, use_tools):
    client = Client(app.url, verbose=False)
    return client.predict(message="What is 12*7?", history=FEW_SHOT,
                          system_prompt="You are a helpful assistant with a calculator tool.",
                          do_sample=False, max_new_tokens=60, use_tools=use_tools, api_name="/respond")


def test_a_tool_call_shows_as_a_collapsible_step_and_is_saved(tools_app):
    _, chat, status, *_ = ask(tools_app, use_tools=True)
    new = chat[len(FEW_SHOT):]
    assert new[0]["role"] == "user"
    steps = [m for m in new if (m.get("metadata") or {}).get("title")]
    assert len(steps) == 1
    assert steps[0]["metadata"]["title"] == "Tool: calculator(expression='12*7')"
    assert steps[0]["metadata"]["status"] == "done"
    assert steps[0]["content"] == text("84")
    assert new[-1]["role"] == "assistant" and "<tool_call>" not in str(new[-1]["content"])
    assert "tok/s" in status or "first token" in status
    # The step is kept as data (the call in its metadata id), so the model sees it next turn.
    assert steps[0]["metadata"]["id"].startswith("call:")


def test_tools_can_be_switched_off(tools_app):
    _, chat, *_ = ask(tools_app, use_tools=False)
    new = chat[len(FEW_SHOT):]
    assert not [m for m in new if m.get("metadata") and m["metadata"].get("title")]
    assert "<tool_call>" in str(new[-1]["content"])  # the model's call is just text now


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)")
def test_steps_in_a_real_browser(tools_app, tmp_path):
    """Import a chat that used the calculator, ask a new question, and open the new step."""
    from playwright.sync_api import sync_playwright

    exported = [{"role": "system", "content": "You are a helpful assistant with a calculator tool."}]
    for q, e, r in [("What is 2+3?", "2+3", "5"), ("What is 10*4?", "10*4", "40")]:
        call = json.dumps({"name": "calculator", "arguments": {"expression": e}})
        exported += [{"role": "user", "content": q}, {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
                     {"role": "tool", "content": r}, {"role": "assistant", "content": f"{e} = {r}."}]
    chat_file = tmp_path / "chat.json"
    chat_file.write_text(json.dumps(exported))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(tools_app.url, wait_until="domcontentloaded")
        page.wait_for_selector("#chat-input textarea", timeout=60_000)
        page.wait_for_function("document.querySelector('#use-tools').innerText.includes('Use tools: calculator')",
                               timeout=30_000)
        with page.expect_file_chooser() as chooser:
            page.click("#import")
        chooser.value.set_files(str(chat_file))
        page.wait_for_function("document.querySelectorAll('#chatbot .thought-group').length == 2", timeout=30_000)
        assert "calculator(expression='2+3')" in page.inner_text("#chatbot")
        page.fill("#chat-input textarea", "What is 12*7?")
        page.press("#chat-input textarea", "Enter")
        page.wait_for_function("document.querySelector('#status').innerText.includes('tok/s')", timeout=90_000)
        groups = page.query_selector_all("#chatbot .thought-group")
        assert len(groups) == 3 and "calculator(expression='12*7')" in groups[-1].inner_text()
        groups[-1].query_selector("[role=button]").click()
        page.wait_for_function(
            "[...document.querySelectorAll('#chatbot .thought-group')].pop().innerText.includes('84')", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "browser-tools.png"))
        browser.close()
