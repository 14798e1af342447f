"""The Python interfaces Confab grew from, end to end on real models."""

import pytest

from confab import ChatModel

pytestmark = pytest.mark.timeout(300)
PROMPT = "<human>: What is the capital of France? Answer in one sentence.\n<bot>:"


@pytest.fixture(scope="module")
def chat_model():
    model = ChatModel("embedded")
    yield model
    model.close()


def test_chatmodel_streams_the_bot_reply_without_the_prompt(chat_model):
    pieces = []
    text = chat_model.do_inference(PROMPT, max_new_tokens=64, do_sample=False, temperature=0.7, top_k=40,
                                   stream_callback=pieces.append)
    assert text and text == "".join(pieces) and len(pieces) > 1
    assert "<human>" not in text and PROMPT not in text


def test_chatmodel_stops_at_the_next_human_turn(chat_model):
    # A prompt that invites the model to write both sides of a dialogue.
    prompt = ("<human>: Hi!\n<bot>: Hello! How can I help?\n<human>: Tell me a joke.\n<bot>: Why did the cat "
              "sit on the computer? To keep an eye on the mouse!\n<human>: Another one.\n<bot>:")
    text = chat_model.do_inference(prompt, max_new_tokens=200, do_sample=True, temperature=0.9, top_k=40)
    assert "<human>:" not in text


def test_chatmodel_on_transformers_with_openchatkit_arguments(tiny_model_dir):
    model = ChatModel(str(tiny_model_dir), gpu_id=0, max_memory={0: "1GiB", "cpu": "4GiB"})
    try:
        text = model.do_inference("<human>: hello there\n<bot>:", max_new_tokens=8, do_sample=False,
                                  temperature=1.0, top_k=0)
        assert isinstance(text, str) and "<human>:" not in text
        assert model.manager.describe()["backend"] == "transformers"
    finally:
        model.close()


# ---- NanoLLM: ChatHistory, bot_function, BotFunctions ------------------------------------------
from backends.base import ParamError  # noqa: E402
from backends.manager import ModelManager  # noqa: E402
from chat.tools import load_tools_dir  # noqa: E402
from confab import BotFunctions, ChatHistory, bot_function  # noqa: E402
from confab._models import spec_for  # noqa: E402
from conftest import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def embedded():
    """One embedded model shared by the classes below (each also accepts a path or preset)."""
    manager = ModelManager()
    manager.load(spec_for("embedded", n_ctx=4096))
    yield manager
    manager.unload()


def test_chat_history_keeps_the_conversation(embedded):
    chat = ChatHistory(embedded, system_prompt="You are terse.")
    chat.append("user", "Hi")
    chat.append("bot", "Hello!")
    chat.append(role="user", msg="Bye")
    assert chat.to_messages() == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert len(chat) == 3 and chat[-1] == {"role": "user", "content": "Bye"}
    assert chat.pop(2) == [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    session = chat.session_id
    chat.reset()
    assert chat.to_messages() == [{"role": "system", "content": "You are terse."}] and chat.session_id != session
    chat.reset(system_prompt="Be kind.")
    assert chat.system_prompt == "Be kind."
    with pytest.raises(ParamError, match="Unknown message role 'wizard'"):
        chat.append("wizard", "abracadabra")
    with pytest.raises(ParamError, match="already loaded"):
        ChatHistory(embedded, chat_template="chatml")


def test_chat_history_generates_and_reuses_the_cache_between_turns(embedded):
    chat = ChatHistory(embedded, system_prompt="Answer in one short sentence.", max_new_tokens=40, do_sample=False)
    chat.append("user", "What is the capital of France?")
    reply = chat.generate()
    assert "Paris" in reply and chat[-1] == {"role": "assistant", "content": reply}
    first = chat.usage
    chat.append("user", "And of Italy?")
    pieces = list(chat.generate(streaming=True))
    assert len(pieces) > 1 and chat[-1]["content"] == "".join(pieces)
    # Turn 2 reads only what is new: the whole of turn 1 is served from the engine's cache.
    assert chat.usage.cached_tokens >= first.prompt_tokens + first.completion_tokens - 2


def test_chat_history_on_transformers_reuses_its_session_cache(tiny_model_dir):
    chat = ChatHistory(str(tiny_model_dir), max_new_tokens=6, do_sample=False)
    try:
        chat.append("user", "hello there")
        chat.generate()
        assert chat.usage.cached_tokens == 0
        chat.append("user", "and again")
        chat.generate()
        assert chat.usage.cached_tokens > 0
        assert chat.manager.describe()["backend"] == "transformers"
    finally:
        chat.close()


def test_stopping_a_streamed_reply_keeps_what_was_said(embedded):
    chat = ChatHistory(embedded, max_new_tokens=200, do_sample=False)
    chat.append("user", "Write a long story about a dragon.")
    stream = chat.generate(streaming=True)
    said = "".join(next(stream) for _ in range(5))
    stream.close()
    assert chat[-1] == {"role": "assistant", "content": said}


@bot_function
def TIME() -> str:
    """The time now, as H:MM."""
    return "4:20"


def test_bot_functions_docs_and_dispatch():
    functions = BotFunctions()
    assert "TIME" in functions.tools and TIME in list(functions)
    assert "- TIME(): The time now, as H:MM." in functions.generate_docs()
    [step] = functions.dispatch("It is `TIME()` now.")
    assert step.ok and step.output == "4:20"
    [bad] = functions.dispatch('`TIME("now", "please")`')
    assert not bad.ok and "takes 0 arguments" in bad.output


def test_chat_history_runs_bot_functions_the_model_calls(embedded):
    calc = load_tools_dir(ROOT / "tools")["calculator"]
    chat = ChatHistory(embedded, system_prompt="You are a helpful assistant with a calculator tool.",
                       functions=BotFunctions([calc]), max_new_tokens=60, do_sample=False)
    for q, e, r in [("What is 2+3?", "2+3", "5"), ("What is 10*4?", "10*4", "40")]:
        call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>' % e
        chat.append("user", q), chat.append("bot", call), chat.append("environment", r), chat.append("bot", f"{e} = {r}.")
    chat.append("user", "What is 12*7?")
    reply = chat.generate()
    assert [(s.call.name, s.call.arguments, s.output) for s in chat.steps] == [("calculator", {"expression": "12*7"}, "84")]
    roles = [m["role"] for m in chat.to_messages()[-4:]]
    assert roles == ["user", "assistant", "tool", "assistant"] and chat[-2] == {"role": "tool", "content": "84"}
    assert chat[-1]["content"] == reply and "<tool_call>" not in reply


# ---- swarm_models: BaseLLM --------------------------------------------------------------------------
import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from confab import BaseLLM  # noqa: E402


def test_base_llm_runs_and_measures(embedded):
    llm = BaseLLM(embedded, max_tokens=24, do_sample=False, system_prompt="Answer in one short sentence.")
    reply = llm("What is the capital of France?")
    assert "Paris" in reply and llm.run("What is the capital of France?") == reply  # greedy: same answer
    m = llm.metrics()
    assert m["time_to_first_token"] > 0 and m["tokens_per_second"] > 0 and m["completion_tokens"] > 1
    assert m["generation_time"] >= m["time_to_first_token"] and llm.get_generation_time() == m["generation_time"]
    assert llm.get_num_tokens("hello world") >= 2
    assert llm.run("Count to ten.", max_tokens=3)  # per-call overrides
    assert llm.last_usage.completion_tokens == 3


def test_base_llm_abatch_run_is_concurrent(embedded, monkeypatch):
    spans, real_stream = [], embedded.stream

    def timed(*args, **kwargs):
        start = None
        for chunk in real_stream(*args, **kwargs):
            if chunk.text and start is None:
                start = time.perf_counter()
            yield chunk
        spans.append((start, time.perf_counter()))

    monkeypatch.setattr(embedded, "stream", timed)
    llm = BaseLLM(embedded, max_tokens=32, do_sample=False)
    tasks = [f"Write a long story about a {animal}." for animal in ("cat", "dog", "owl", "fox")]
    replies = asyncio.run(llm.abatch_run(tasks))
    assert len(replies) == 4 and all(replies) and len(set(replies)) == 4
    # Every reply had produced its first token before any reply ended: they ran together.
    assert max(s for s, _ in spans) < min(e for _, e in spans)
    spans.clear()
    # batch_run: one after another, answers in order. (Not compared with abatch_run's text: greedy
    # decoding of 4 sequences at once rounds differently from 1 and may diverge after a while.)
    france, story = llm.batch_run(["What is the capital of France? Answer in one sentence.", tasks[1]])
    assert "Paris" in france and "Paris" not in story and story
    assert spans[0][1] <= spans[1][0]


def test_base_llm_chat_keeps_history_and_checkpoints(embedded, tmp_path):
    llm = BaseLLM(embedded, max_tokens=24, do_sample=False, temperature=0.3)
    first = llm.chat("My name is Ada. Say hello to me.")
    llm.chat("What is my name?")
    assert [m["role"] for m in llm.history] == ["user", "assistant"] * 2 and llm.history[1]["content"] == first
    assert llm.chat("Say hi.", history=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert llm.chat("What did I say?", history="User: I like tea.")
    assert len(llm.history) == 4  # explicit histories are not added to the object's own
    path = llm.save_checkpoint(tmp_path / "ckpt")
    state = json.loads(path.read_text())
    assert state["settings"]["temperature"] == 0.3 and state["history"] == llm.history
    other = BaseLLM(embedded)
    other.load_checkpoint(path)
    assert other.history == llm.history and other.temperature == 0.3 and other.max_tokens == 24
    path.write_text('{"settings": {"temperature": -4}, "history": []}')
    with pytest.raises(ParamError, match="temperature must be 0 or more"):
        other.load_checkpoint(path)
    assert other.temperature == 0.3  # a bad checkpoint changes nothing
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ParamError, match="not a BaseLLM checkpoint"):
        other.load_checkpoint(tmp_path / "junk.json")


def test_base_llm_logging_resources_and_bad_settings(embedded, tmp_path, caplog):
    llm = BaseLLM(embedded, max_tokens=8, num_beams=4)
    assert "num_beams have no effect" in caplog.text
    llm.enable_logging(tmp_path / "model.log")
    llm.log_event("starting", "warning")
    llm.run("Hi")
    llm.disable_logging()
    log = (tmp_path / "model.log").read_text()
    assert "WARNING starting" in log and "INFO generated" in log and "tokens_per_second" in log
    usage = llm.track_resource_utilization()
    assert 0 <= usage["cpu_percent"] <= 100 * 64 and usage["process_rss_mb"] > 50 and "gpu_memory_mb" in usage
    with pytest.raises(ParamError, match="unknown settings wizardry"):
        BaseLLM(embedded, wizardry=True)
    with pytest.raises(ParamError, match="top_p must be above 0"):
        BaseLLM(embedded, top_p=0)
    with pytest.raises(ParamError, match="event_type must be"):
        llm.log_event("x", "loud")
