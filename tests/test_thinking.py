"""Reasoning models: thinking told apart from the answer, in the splitter, the Reply, a tiny
transformers model whose chat template opens `<think>` (and honours `enable_thinking`), the
OpenAI API's `reasoning_content`, and a remote server's `reasoning_content` read back."""

import http.server
import json
import shutil
import threading

import pytest

from backends.base import GenerationParams, Message, ModelSpec, ParamError
from backends.manager import ModelManager
from chat.reply import Text, Thinking
from chat.thinking import ThinkSplitter, opens_thinking
from chat.tools import Toolset, ToolStep, load_tools_dir
from conftest import ROOT, hf_spec

pytestmark = pytest.mark.timeout(180)
HELLO = [Message("user", "hello there")]
GREEDY = GenerationParams(do_sample=False, max_new_tokens=12)


# ---- the splitter ----------------------------------------------------------------------------
def split(pieces, opened=False):
    splitter, thinking, answer = ThinkSplitter(opened), "", ""
    for piece in pieces:
        t, a = splitter.feed(piece)
        thinking, answer = thinking + t, answer + a
    t, a = splitter.finish()
    return thinking + t, answer + a


def every_split(text):
    """The text in one piece, char by char, and cut at every pair of places."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            yield [text[:i], text[i:j], text[j:]]


CASES = [
    ("<think>\nPlan it.\n</think>\n\nThe answer.", False, ("Plan it.\n", "The answer.")),
    ("\n<think>Plan</think>Answer", False, ("Plan", "Answer")),
    ("Plan it.\n</think>\n\nThe answer.", True, ("Plan it.\n", "The answer.")),  # the prompt opened it
    ("<think>Plan</think>Answer", True, ("Plan", "Answer")),  # opened, and the model wrote it again
    (" Paris is <b>big</b>", False, ("", " Paris is <b>big</b>")),  # no thinking: every space kept
    ("<thinking>x</thinking>", False, ("", "<thinking>x</thinking>")),
    ("Use <think> tags</think>.", False, ("", "Use <think> tags</think>.")),  # only a think block first counts
    ("<think>cut off at the tok", False, ("cut off at the tok", "")),
    ("<think>almost</thi", False, ("almost</thi", "")),
    ("all thinking", True, ("all thinking", "")),
    ("<thi", False, ("", "<thi")),
    ("  ", False, ("", "  ")),
]


@pytest.mark.parametrize("text, opened, expected", CASES)
def test_thinking_is_split_from_the_answer_wherever_the_deltas_fall(text, opened, expected):
    for pieces in every_split(text):
        assert split(pieces, opened) == expected, pieces


def test_answer_text_is_given_out_as_soon_as_it_is_known():
    s = ThinkSplitter()
    assert s.feed("<thi") == ("", "")  # may be a tag
    assert s.feed("nk>Hmm</th") == ("Hmm", "")  # the part of `</think>` is held
    assert s.feed("ink>\n\nYes") == ("", "Yes")
    assert s.feed(" no") == ("", " no")


def test_a_prompt_that_ends_inside_think_is_recognised():
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_thinking("<|im_start|>assistant\n")


# ---- the Reply, over a fake engine -----------------------------------------------------------
def test_reply_streams_thinking_apart_and_keeps_only_the_answer(fake):
    fake._backend.step_delay = 0.01
    reply = fake.reply(HELLO, GenerationParams())
    events = list(reply)
    thought = "".join(e.text for e in events if isinstance(e, Thinking))
    said = "".join(e.text for e in events if isinstance(e, Text))
    assert thought == reply.reasoning == "The user greets me.\n" and said == reply.text == "Hello there!"
    assert len([e for e in events if isinstance(e, Thinking)]) > 3  # streamed, not given at the end
    assert 0.03 < reply.thinking_s < reply.usage.total_s
    assert reply.turn() == [Message("assistant", "Hello there!")]  # thinking is never sent back


def test_thinking_opened_by_the_prompt_ends_at_its_close_tag(fake):
    fake._backend.prompt_tail = "<think>\n"
    fake._backend.script = "The user greets me.\n</think>\n\nHello there!"
    reply = fake.reply(HELLO, GenerationParams()).wait()
    assert (reply.reasoning, reply.text, reply.finish_reason) == ("The user greets me.\n", "Hello there!", "stop")


def test_a_reply_cut_off_while_thinking_has_no_answer_to_keep(fake):
    reply = fake.reply(HELLO, GenerationParams(max_new_tokens=4)).wait()
    assert reply.finish_reason == "length" and reply.reasoning and reply.text == "" and reply.turn() == []


def test_a_tool_call_inside_thinking_is_not_run(fake):
    calculator = load_tools_dir(ROOT / "tools")["calculator"]
    fake._backend.script = ('<think>I could call <tool_call>\n{"name": "calculator", "arguments": {"expression": '
                            '"2+2"}}\n</tool_call> but I know it.</think>It is 4.')
    reply = fake.reply(HELLO, GenerationParams(), tools=Toolset([calculator]))
    events = list(reply)
    assert not [e for e in events if isinstance(e, ToolStep)] and not reply.steps
    assert reply.text == "It is 4." and "<tool_call>" in reply.reasoning and reply.finish_reason == "stop"
    assert len(fake._backend.seen) == 1  # one round: no call came back to the model


# ---- a tiny transformers model whose template opens <think> ----------------------------------
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)  # as Qwen3's: thinking unless `enable_thinking` is false, then an empty think block


@pytest.fixture(scope="module")
def thinker(tiny_model_dir, tmp_path_factory):
    """The tiny Llama built in the run, with a thinking chat template of its own, loaded."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-thinker")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(folder)
    manager = ModelManager()
    manager.load(hf_spec(folder))
    yield manager
    manager.unload()


def test_the_template_opens_thinking_unless_it_is_turned_off(thinker):
    assert thinker.render(HELLO).text.endswith("hello there<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert thinker.render(HELLO, thinking=True).text == thinker.render(HELLO).text
    assert thinker.render(HELLO, thinking=False).text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_tiny_models_reply_after_an_opened_think_is_its_thinking(thinker):
    reply = thinker.reply(HELLO, GREEDY).wait()
    assert reply.error is None and reply.finish_reason == "length"
    assert reply.reasoning.strip() and reply.text == "" and reply.turn() == []  # it never closed the tag
    assert 0 < reply.thinking_s <= reply.usage.total_s
    off = thinker.reply(HELLO, GREEDY.replace(thinking=False)).wait()
    assert off.reasoning == "" and off.text.strip() and off.turn() == [Message("assistant", off.text.strip())]


def test_thinking_must_be_true_false_or_unset():
    assert GenerationParams().thinking is None and GenerationParams.from_dict({"thinking": False}).thinking is False
    with pytest.raises(ParamError, match="thinking must be true, false or empty"):
        GenerationParams.from_dict({"thinking": "yes"})


# ---- the OpenAI API --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(thinker):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.openai_api import build_router

    app = FastAPI()
    app.include_router(build_router(thinker, lambda: "tiny-thinker"))
    with TestClient(app) as client:
        yield client


def ask(api, **body):
    return api.post("/v1/chat/completions", json={"messages": [m.to_dict() for m in HELLO], "max_tokens": 12,
                                                  "temperature": 0, **body})


def test_api_returns_thinking_as_reasoning_content_never_as_content(api):
    whole = ask(api).json()["choices"][0]
    assert whole["message"]["reasoning_content"].strip() and whole["message"]["content"] == ""
    with api.stream("POST", "/v1/chat/completions", json={"messages": [m.to_dict() for m in HELLO],
                                                          "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    assert len(reasoning) > 1 and "".join(reasoning) == whole["message"]["reasoning_content"]
    assert not "".join(d.get("content") or "" for d in deltas)


def test_api_maps_enable_thinking_onto_the_template(api):
    message = ask(api, chat_template_kwargs={"enable_thinking": False}).json()["choices"][0]["message"]
    assert message["content"].strip() and "reasoning_content" not in message


@pytest.mark.parametrize("kwargs, words", [
    ({"enable_thinking": "yes"}, "enable_thinking must be true or false"),
    ({"reasoning_effort": "high"}, "'reasoning_effort' are not taken here"),
])
def test_api_refuses_template_settings_it_cannot_honour(api, kwargs, words):
    r = ask(api, chat_template_kwargs=kwargs)
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert r.json()["error"]["param"].startswith("chat_template_kwargs")


# ---- a remote server that sends reasoning_content apart --------------------------------------
class FakeReasoningServer(http.server.BaseHTTPRequestHandler):
    """A fake OpenAI-compatible server (a real HTTP server, canned answers) that streams its
    thinking as `reasoning_content` deltas, as vLLM and llama.cpp's server do; it records what it was
    asked."""

    bodies: list = []
    DELTAS = [{"role": "assistant"}, {"reasoning_content": "The user"}, {"reasoning_content": " greets me."},
              {"content": "Hello"}, {"content": " there!"}]

    def do_GET(self):
        data = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                       "owned_by": "x"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
        for i, delta in enumerate(self.DELTAS):
            finish = "stop" if i == len(self.DELTAS) - 1 else None
            self._event({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        self._event({**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, data):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def remote():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeReasoningServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeReasoningServer.bodies = []
    manager = ModelManager()
    manager.load(ModelSpec(name="r", backend="openai", model="auto",
                           base_url=f"http://127.0.0.1:{server.server_address[1]}/v1"))
    yield manager
    manager.unload()
    server.shutdown()


def test_a_servers_reasoning_content_becomes_thinking(remote):
    reply = remote.reply(HELLO, GenerationParams(thinking=True)).wait()
    assert (reply.reasoning, reply.text, reply.finish_reason) == ("The user greets me.", "Hello there!", "stop")
    [body] = FakeReasoningServer.bodies
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and "continue_final_message" not in body
    remote.reply(HELLO, GenerationParams()).wait()
    assert "chat_template_kwargs" not in FakeReasoningServer.bodies[-1]  # the template's default


def test_a_remote_continuation_asks_the_server_to_continue(remote):
    reply = remote.reply([*HELLO, Message("assistant", "Hel")], GenerationParams(thinking=True)).wait()
    assert reply.continued and reply.text == "Hello there!"
    body = FakeReasoningServer.bodies[-1]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["chat_template_kwargs"] == {"enable_thinking": False}  # llama.cpp's server refuses prefill with it


# ---- the page: a folded "Thinking" message, never sent back ---------------------------------
def test_the_page_folds_the_thinking_and_does_not_send_it_back(fake, tmp_path):
    from ui.chat import clean_history, to_messages, unmark
    from ui.conversations import empty_book
    from ui.handlers import Handlers
    from web.state import StateDir

    handlers = Handlers(fake, {}, {}, state=StateDir(tmp_path))
    book = empty_book()
    values = [0.7, 0.9, 40, 0, 64, 1.0, False, -1, "", "default"]
    *_, last = handlers.respond("Hi", [], "", *values, True, book)
    chat = last[1]
    assert [m["role"] for m in chat] == ["user", "assistant", "assistant"]
    thought, answer = chat[1], chat[2]
    assert thought["metadata"]["title"] == "Thinking" and thought["metadata"]["status"] == "done"
    assert thought["content"] == "The user greets me.\n" and isinstance(thought["metadata"]["duration"], float)
    assert unmark(answer["content"]) == "Hello there!" and "tokens" in answer["content"]  # with its numbers
    # Kept in the conversation (a reload shows it), left out of what the model reads next turn.
    assert clean_history(chat)[1]["metadata"]["id"] == "thinking"
    assert [m.content for m in to_messages(clean_history(chat), "")] == ["Hi", "Hello there!"]
    conv = book["convs"][book["current"]]
    from chat import conversations as cv
    assert [unmark(m["content"]) for m in cv.messages(conv)] == ["Hi", "The user greets me.\n", "Hello there!"]
    # The next turn follows the same tree (no new branch from the thinking message).
    *_, again = handlers.respond("And?", clean_history(chat), "", *values, True, book)
    assert len(cv.forks(conv)) == 0 and len(cv.messages(conv)) == 6
