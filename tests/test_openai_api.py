"""The OpenAI-compatible API on the launched app, driven by the official `openai` client."""

import json
import time

import httpx
import openai
import pytest

from conftest import RunningApp

pytestmark = pytest.mark.timeout(180)
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def keyed_app():
    app = RunningApp("--api-key", "test-key", "--concurrency", "1")
    yield app
    app.stop()


@pytest.fixture
def client(keyed_app):
    return openai.OpenAI(base_url=keyed_app.url + "/v1", api_key="test-key", max_retries=0)


def test_models_lists_the_loaded_preset(client):
    assert [m.id for m in client.models.list()] == ["smollm2-llamacpp"]


def test_whole_completion_with_usage(client):
    r = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, temperature=0, max_tokens=48)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 3


def test_streamed_completion_arrives_in_pieces(client):
    stream = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for event in stream:
        if event.usage:
            usage = event.usage
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 3 and "Paris" in "".join(pieces)
    assert finish == "stop" and usage.completion_tokens > 3


def test_sampling_fields_and_extensions_are_honoured(client):
    r = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=3, seed=1,
                                       temperature=0.7, top_p=0.9, stop=["\n"],
                                       extra_body={"top_k": 20, "repetition_penalty": 1.1})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    again = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=3, seed=1,
                                           temperature=0.7, top_p=0.9, stop=["\n"],
                                           extra_body={"top_k": 20, "repetition_penalty": 1.1})
    assert again.choices[0].message.content == r.choices[0].message.content


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"model": "gpt-4"}, 404, "not loaded here"),
        ({"temperature": -1}, 400, "temperature"),
        ({"n": 2}, 400, "answers 1 at a time"),  # this app takes one reply at a time (--concurrency 1)
        ({"n": 5}, 400, "n must be from 1 to 4"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": []}, 400, "at least one"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "the assistant's for the model to continue it"),
        ({"extra_body": {"chat_template_kwargs": {"enable_thinking": 1}}}, 400, "enable_thinking must be"),
    ],
)
def test_errors_use_openai_shape_and_status(client, kwargs, status, words):
    args = {"model": "smollm2-llamacpp", "messages": PARIS, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == status and words in err.value.message


def test_a_final_assistant_message_is_continued(client):
    r = client.chat.completions.create(model="smollm2-llamacpp", temperature=0, max_tokens=8, messages=[
        *PARIS, {"role": "assistant", "content": "The capital of France is"}])
    assert r.choices[0].message.content.lstrip().startswith("Paris")  # the new text only, as llama.cpp's server


def test_wrong_key_is_401(keyed_app):
    bad = openai.OpenAI(base_url=keyed_app.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_dropped_client_frees_the_engine(keyed_app, client):
    with httpx.stream("POST", keyed_app.url + "/v1/chat/completions", headers={"Authorization": "Bearer test-key"},
                      json={"messages": [{"role": "user", "content": "Write a very long story."}],
                            "stream": True, "max_tokens": 3000, "temperature": 0}, timeout=30) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i > 10:
                break  # leaving the block closes the connection mid-reply
    start = time.monotonic()
    r = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content and time.monotonic() - start < 10


def test_no_model_loaded_is_503(app):
    from gradio_client import Client

    gc = Client(app.url, verbose=False)
    gc.predict(api_name="/unload")
    try:
        c = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
        assert list(c.models.list()) == []
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="smollm2-llamacpp", messages=PARIS)
        assert err.value.status_code == 503 and "No model is loaded" in err.value.message
    finally:
        gc.predict(choice="smollm2-llamacpp", custom="", backend="llamacpp", api_name="/load")


def test_a_whole_completion_whose_client_goes_away_stops_the_engine(keyed_app, client):
    with pytest.raises(httpx.ReadTimeout):  # the client gives up, and closes the connection
        httpx.post(keyed_app.url + "/v1/chat/completions", headers={"Authorization": "Bearer test-key"},
                   json={"messages": [{"role": "user", "content": "Write a very long story."}],
                         "max_tokens": 3000, "temperature": 0}, timeout=1.5)
    start = time.monotonic()  # one reply at a time here: a runaway one would hold the engine ~30 s
    r = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content and time.monotonic() - start < 10


def _calculator_few_shot():
    """A few worked examples, so the 135M model writes a real call (as an agent framework's
    history would hold them: assistant tool_calls, then tool results)."""
    messages = [{"role": "system", "content": "You are a helpful assistant with a calculator tool."}]
    for i, (q, e, r) in enumerate([("What is 2+3?", "2+3", "5"), ("What is 10*4?", "10*4", "40")]):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": e})}}
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": r},
                     {"role": "assistant", "content": f"{e} = {r}."}]
    return messages


def test_an_agent_loop_with_client_side_tools(client):
    from chat.tools import load_tools_dir
    from conftest import ROOT

    calculator = load_tools_dir(ROOT / "tools")["calculator"]
    messages = [*_calculator_few_shot(), {"role": "user", "content": "What is 12*7?"}]
    first = client.chat.completions.create(model="smollm2-llamacpp", messages=messages, temperature=0,
                                           max_tokens=60, tools=[calculator.schema()])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments == {"expression": "12*7"} and "<tool_call>" not in (choice.message.content or "")
    result = calculator.invoke(arguments)  # the client runs its own tool
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = client.chat.completions.create(model="smollm2-llamacpp", messages=messages, temperature=0,
                                           max_tokens=40, tools=[calculator.schema()])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content.strip()
    assert not final.choices[0].message.tool_calls

    stream = client.chat.completions.create(model="smollm2-llamacpp", messages=messages[:-2], temperature=0,
                                            max_tokens=60, tools=[calculator.schema()], stream=True)
    chunks = list(stream)
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert [tc.function.name for tc in streamed] == ["calculator"]
    assert json.loads(streamed[0].function.arguments) == {"expression": "12*7"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_bad_tools_and_tool_choice_are_named(client):
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\] must be"):
        client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, tools=[{"type": "web"}])
    with pytest.raises(openai.BadRequestError, match="tool_choice names 'nope'"):
        client.chat.completions.create(
            model="smollm2-llamacpp", messages=PARIS, tool_choice={"type": "function", "function": {"name": "nope"}},
            tools=[{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}])
    huge = [{"type": "function", "function": {"name": "f", "description": "x" * 200_000}}]
    with pytest.raises(openai.BadRequestError, match="tools.*--max-message-chars"):
        client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, tools=huge)
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].tool_calls must be"):
        client.chat.completions.create(model="smollm2-llamacpp", messages=[
            PARIS[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}, PARIS[0]])


# ---- what agents and evaluation tools send ----------------------------------------------------
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["captain", "cook", "clerk"]},
        "ship": {"type": "object", "properties": {"name": {"type": "string"}, "crew": {"type": "integer"}},
                 "required": ["name", "crew"]},
    },
    "required": ["name", "role", "ship"],
}


def test_structured_output_follows_a_nested_schema_with_enums(client):
    """The engine samples under a grammar made from the schema: the reply parses and validates,
    whatever the small model would have written."""
    import jsonschema

    ask = [{"role": "user", "content": "Describe a sailor called Anna who is a cook on a ship."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="smollm2-llamacpp", messages=ask, max_tokens=200, seed=seed,
                                           temperature=0.8, response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        reply = json.loads(r.choices[0].message.content)
        jsonschema.validate(reply, PERSON)
    # json_object: any JSON object, streamed as well.
    stream = client.chat.completions.create(model="smollm2-llamacpp", messages=ask, max_tokens=200, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    text = "".join(e.choices[0].delta.content or "" for e in stream if e.choices)
    assert isinstance(json.loads(text), dict)


def test_penalties_are_taken_and_fields_nothing_here_reads_are_refused_by_name(client, keyed_app):
    r = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=8, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=1.0, user="u1", store=False,
                                       metadata={"run": "7"})
    assert r.choices[0].message.content
    base = {"model": "smollm2-llamacpp", "messages": PARIS, "max_tokens": 4}
    for extra, field in (({"logit_bias": {"42": 5}}, "logit_bias"),
                         ({"logprobs": True, "top_logprobs": 21}, 'top_logprobs asks for 0 to 20'),
                         ({"max_completion_tokens": 0}, '"param":"max_completion_tokens"'),
                         ({"top_logprobs": 3}, "top_logprobs"), ({"functions": []}, "functions"),
                         ({"made_up": 1}, "made_up"), ({"presence_penalty": 3}, "presence_penalty"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
                          "schema"),
                         # A grammar whose cost every reply in the batch would pay: refused with its size.
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
                             "type": "string", "enum": [f"value number {i}" for i in range(2500)]}}}},
                          "at most 8,192")):
        r = httpx.post(keyed_app.url + "/v1/chat/completions", json={**base, **extra},
                       headers={"Authorization": "Bearer test-key"})
        assert r.status_code == 400 and field in r.text, (extra, r.text)
    # What changes nothing in the answer is taken: logprobs off, an empty logit_bias, text only.
    r = httpx.post(keyed_app.url + "/v1/chat/completions", headers={"Authorization": "Bearer test-key"},
                   json={**base, "logprobs": False, "logit_bias": {}, "modalities": ["text"], "service_tier": "auto"})
    assert r.status_code == 200, r.text


def test_one_model_can_be_retrieved_by_id(client):
    assert client.models.retrieve("smollm2-llamacpp").id == "smollm2-llamacpp"
    with pytest.raises(openai.NotFoundError, match="not loaded here"):
        client.models.retrieve("gpt-4")


def test_text_completions_read_the_prompt_as_it_is(client, keyed_app):
    """POST /v1/completions (what lm-eval and lagent's client send): the prompt without the chat
    template, continued; streamed pieces make the whole text; echo puts the prompt first."""
    prompt = "The capital of France is"
    r = client.completions.create(model="smollm2-llamacpp", prompt=prompt, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="smollm2-llamacpp", max_tokens=1, temperature=0,
                                          messages=[{"role": "user", "content": prompt}])
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens < 10 < chat.usage.prompt_tokens  # no template around it
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("length", "stop")
    assert "Paris" in r.choices[0].text and r.choices[0].text.startswith(" ")  # the leading space is kept
    pieces = [e.choices[0].text for e in client.completions.create(
        model="smollm2-llamacpp", prompt=prompt, max_tokens=8, temperature=0, stream=True) if e.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == r.choices[0].text
    echoed = client.completions.create(model="smollm2-llamacpp", prompt=[prompt], max_tokens=8, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text
    default = client.completions.create(model="smollm2-llamacpp", prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    base = {"model": "smollm2-llamacpp", "prompt": prompt, "max_tokens": 4}
    for change, field in (({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                          ({"prompt": ""}, "prompt"), ({"prompt": None}, "prompt"), ({"suffix": "end."}, "suffix"),
                          ({"best_of": 2}, "best_of"), ({"logprobs": 21}, "logprobs"), ({"n": 2}, "n"),
                          ({"made_up": 1}, "made_up"), ({"max_tokens": 0}, '"param":"max_tokens"')):
        r = httpx.post(keyed_app.url + "/v1/completions", json={**base, **change},
                       headers={"Authorization": "Bearer test-key"})
        assert r.status_code == 400 and field in r.text, (change, r.text)
    r = httpx.post(keyed_app.url + "/v1/completions", json=base)
    assert r.status_code == 401  # the door guards it like the rest of /v1


def test_n_choices_take_at_most_half_of_the_engines_places():
    """One request's choices leave the other half of the engine for other people."""
    app = RunningApp("--concurrency", "4")
    try:
        body = {"model": "smollm2-llamacpp", "messages": PARIS, "max_tokens": 2}
        r = httpx.post(app.url + "/v1/chat/completions", json={**body, "n": 2}, timeout=120)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        r = httpx.post(app.url + "/v1/chat/completions", json={**body, "n": 3}, timeout=120)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most half" in r.text, r.text
    finally:
        app.stop()


def test_n_choices_are_written_at_once_each_its_own(tmp_path):
    """n > 1 where the engine batches (llama.cpp): n replies side by side, choice i sampled with
    seed + i, streamed with their own index and finish, usage counting the prompt once."""
    app = RunningApp()
    try:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0)
        story = [{"role": "user", "content": "Write one sentence about a cat."}]
        r = client.chat.completions.create(model="smollm2-llamacpp", messages=story, n=3, seed=7, temperature=1.0,
                                           max_tokens=24)
        assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content for c in r.choices)
        assert len({c.message.content for c in r.choices}) > 1  # three seeds, not one answer three times
        greedy = client.chat.completions.create(model="smollm2-llamacpp", messages=story, max_tokens=24,
                                                temperature=0)
        assert r.usage.prompt_tokens == greedy.usage.prompt_tokens
        assert 24 < r.usage.completion_tokens <= 3 * 24  # every choice's tokens, not the first's alone
        texts, finished = {0: "", 1: ""}, {}
        for event in client.chat.completions.create(model="smollm2-llamacpp", messages=story, n=2, temperature=0,
                                                    max_tokens=24, stream=True):
            for c in event.choices:
                texts[c.index] += c.delta.content or ""
                if c.finish_reason:
                    finished[c.index] = c.finish_reason
        assert set(finished) == {0, 1}  # each choice streams whole, under its own index
        assert texts[0] == texts[1] == greedy.choices[0].message.content
        done = client.completions.create(model="smollm2-llamacpp", prompt="Cats are", n=2, seed=3, temperature=1.0,
                                         max_tokens=8)
        assert [c.index for c in done.choices] == [0, 1] and all(c.text for c in done.choices)
    finally:
        app.stop()


def test_each_choice_samples_with_its_own_seed():
    from api.openai_api import each_choice
    from backends.base import GenerationParams

    seeded = each_choice(GenerationParams(seed=2**63 - 1), 3)
    assert [p.seed for p in seeded] == [2**63 - 1, 0, 1]  # seed + i, within the seed's range
    assert [p.seed for p in each_choice(GenerationParams(), 2)] == [None, None]  # random each


def test_logprobs_of_each_token_and_its_likeliest_alternatives(client):
    """llama.cpp's logits, log-softmaxed: greedy picks the likeliest, the tokens spell the text
    (whole and streamed), the legacy completions shape has offsets into the text."""
    import math

    r = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"repetition_penalty": 1.0})
    tokens = r.choices[0].logprobs.content
    assert len(tokens) == r.usage.completion_tokens or len(tokens) == r.usage.completion_tokens - 1  # less an end
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == r.choices[0].message.content
    for t in tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy: the top one
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1.0001
    streamed = []
    for event in client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=12,
                                                temperature=0, logprobs=True, stream=True,
                                                extra_body={"repetition_penalty": 1.0}):
        for c in event.choices:
            streamed += c.logprobs.content if c.logprobs and c.logprobs.content else []
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert all(t.top_logprobs == [] for t in streamed)  # logprobs alone: no alternatives
    plain = client.chat.completions.create(model="smollm2-llamacpp", messages=PARIS, max_tokens=4)
    assert plain.choices[0].logprobs is None
    done = client.completions.create(model="smollm2-llamacpp", prompt="The capital of France is", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp, text = done.choices[0].logprobs, done.choices[0].text
    assert "".join(lp.tokens) == text and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(alts) == 2 and max(alts.values()) >= lp_ for alts, lp_ in zip(lp.top_logprobs, lp.token_logprobs))
    # lm-eval's loglikelihood asks for the prompt's logprobs this way: refused, never answered with none.
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model="smollm2-llamacpp", prompt="Paris is", max_tokens=1, logprobs=1, echo=True)
    with pytest.raises(openai.BadRequestError, match="must fit the model's context"):  # a 400, not a broken stream
        client.completions.create(model="smollm2-llamacpp", prompt="word " * 9000, max_tokens=8, stream=True)


def test_streams_past_the_reader_threads_wait_for_one_and_a_dropped_stream_frees_its_own(fake, monkeypatch):
    """Streamed replies are read by a bounded pool of threads (api/openai_api.py PUMPS), not one
    `to_thread` call per token: a stream past the pool waits for a thread, then streams whole, and
    a client that goes away mid-reply stops its reply and gives its thread back."""
    import asyncio

    import api.openai_api as api
    from backends.base import GenerationParams, Message

    monkeypatch.setattr(api, "PUMPS", api.DaemonPool(1, "test-stream"))
    words = "one two three four five six seven eight nine ten"
    monkeypatch.setattr(fake._backend, "script", words)
    monkeypatch.setattr(fake._backend, "piece", 5)  # 10 pieces, one a step
    monkeypatch.setattr(fake._backend, "step_delay", 0.05)
    params = GenerationParams(max_new_tokens=100, do_sample=False)

    def completion(who: str):
        return api.Completion([fake.reply([Message("user", "Count.")], params, who)], "fake")

    def texts(events: list[str]) -> str:
        return "".join(json.loads(e[5:])["choices"][0]["delta"].get("content", "")
                       for e in events if e.startswith("data: {") and '"choices": [{' in e)

    async def both() -> tuple[list[str], list[str], float]:
        async def read(c) -> list[str]:
            return [e async for e in c.events(include_usage=False)]

        start = time.monotonic()
        first, second = await asyncio.gather(read(completion("a")), read(completion("b")))
        return first, second, time.monotonic() - start

    first, second, took = asyncio.run(both())
    assert texts(first) == texts(second) == words and first[-1] == second[-1] == "data: [DONE]\n\n"
    assert took >= 2 * 10 * 0.05 * 0.9  # one thread: the second stream waited for the first to end

    async def dropped() -> None:
        c = completion("c")
        events = c.events(include_usage=False)
        async for event in events:
            if texts([event]):
                break  # the first piece came
        fake._backend.closed.clear()
        await events.aclose()  # what Starlette does when the client goes away

    asyncio.run(dropped())
    assert fake._backend.closed.wait(2)  # the reply stopped generating
    steps = fake._backend.steps
    time.sleep(0.3)
    assert fake._backend.steps == steps
    start = time.monotonic()
    again = asyncio.run(both())  # the dropped stream's thread came back: both stream again
    assert texts(again[0]) == words and time.monotonic() - start < 10


def test_the_stream_pool_runs_at_most_its_size_at_once_on_daemon_threads():
    """Daemons, so a stream still being read never holds a stopped server's exit; bounded, so
    many streams never make many threads; every job runs, in turn."""
    import threading

    from api.openai_api import DaemonPool

    pool, lock, gate = DaemonPool(2, "test-pool"), threading.Lock(), threading.Event()
    running, most, done, daemons = [0], [0], [], []

    def job(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        daemons.append(threading.current_thread().daemon)
        gate.wait(5)
        with lock:
            running[0] -= 1
            done.append(i)

    for i in range(5):
        pool.submit(job, i)
    time.sleep(0.3)
    assert running[0] == 2 and not done  # two at once; three wait their turn
    gate.set()
    deadline = time.monotonic() + 5
    while len(done) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == list(range(5)) and most[0] == 2 and all(daemons)
    assert pool._threads == 2 and pool._free == 2 and pool._queued == 0  # both idle now, nothing owed


def test_a_server_stopped_mid_stream_exits_at_once():
    """SIGTERM while an API reply streams: the process ends in seconds (its stream readers are
    daemons; a pool Python's exit waits for would hold it until the reply ended)."""
    import signal

    app = RunningApp()
    try:
        with httpx.stream("POST", app.url + "/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "Write a very long story."}],
                                "stream": True, "max_tokens": 3000, "temperature": 0}) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i > 10:
                    break
            start = time.monotonic()
            app.proc.send_signal(signal.SIGTERM)
            app.proc.wait(20)
        assert time.monotonic() - start < 10, app.log_path.read_text()[-2000:]
    finally:
        app.stop()
