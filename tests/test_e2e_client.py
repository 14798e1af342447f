"""End to end: the launched app on the embedded model, driven through gradio_client."""

import concurrent.futures
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.timeout(180)


def text_of(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def reply_texts(outputs):
    """The assistant text after each streamed update, in order."""
    return [text_of(o[1][-1]) for o in outputs if o[1] and o[1][-1]["role"] == "assistant"]


def test_reply_streams_piece_by_piece(app):
    client = Client(app.url, verbose=False)
    job = client.submit(message="What is the capital of France? Answer in one sentence.", history=[],
                        system_prompt="", do_sample=False, api_name="/respond")
    outputs = list(job)
    texts = reply_texts(outputs)
    assert len(set(texts)) >= 4, texts  # several distinct partial replies arrived
    for shorter, longer in zip(texts, texts[1:]):
        assert longer.startswith(shorter)
    final = outputs[-1]
    assert "Paris" in texts[-1]
    assert "tok/s" in final[2] and "first token" in final[2]
    assert [m["role"] for m in final[1]] == ["user", "assistant"]


def test_cancel_mid_stream_frees_the_engine(app):
    client = Client(app.url, verbose=False)
    job = client.submit(message="Write a very long story about a dragon and a knight.", history=[],
                        system_prompt="", do_sample=False, max_new_tokens=3000, repetition_penalty=1.0,
                        api_name="/respond")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    # 3000 tokens would take ~30 s at ~100 tok/s; a freed engine answers the next question at once.
    start = time.monotonic()
    result = Client(app.url, verbose=False).predict(
        message="What is the capital of France? Answer in one sentence.", history=[], system_prompt="",
        do_sample=False, api_name="/respond")
    assert "Paris" in text_of(result[1][-1])
    assert time.monotonic() - start < 12


def test_two_concurrent_clients_stay_apart(app):
    questions = {"a": "What is the capital of France? Answer in one sentence.",
                 "b": "Name a primary colour. One word."}

    def chat(key):
        client = Client(app.url, verbose=False)
        first = client.predict(message=questions[key], history=[], system_prompt=f"session {key}",
                               do_sample=False, max_new_tokens=48, api_name="/respond")
        return first[1]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        saved = dict(zip(questions, pool.map(chat, questions)))
    for key, messages in saved.items():
        users = [text_of(m) for m in messages if m["role"] == "user"]
        assert users == [questions[key]]
        assert messages[-1]["role"] == "assistant" and text_of(messages[-1])


def test_history_is_continued_and_undo_and_clear_work(app):
    client = Client(app.url, verbose=False)
    out = client.predict(message="Hi! My name is Ada.", history=[], system_prompt="", do_sample=False,
                         max_new_tokens=32, api_name="/respond")
    out = client.predict(message="What is my name?", history=out[1], system_prompt="", do_sample=False,
                         max_new_tokens=32, api_name="/respond")
    assert [m["role"] for m in out[1]] == ["user", "assistant", "user", "assistant"]
    first_reply = out[1][1]
    text, history, saved, *_ = client.predict(history=out[1], system_prompt="", api_name="/undo")
    assert text == {"text": "What is my name?", "files": []} and len(history) == 2  # back in the message box
    regen = client.predict(history=history, system_prompt="", api_name="/regenerate")
    assert len(regen[1]) == 2 and regen[1][-1]["role"] == "assistant"
    # The earlier reply is kept: the new one is version 2 of 2, with ‹ › under it.
    labels = [o.get("label") for o in regen[1][-1].get("options") or []]
    assert labels == ["‹", "2 / 2", "›"], regen[1][-1]
    assert first_reply["content"] == history[1]["content"]
    assert client.predict(system_prompt="", api_name="/clear")[1] == []


def test_bad_input_gets_a_message_and_the_server_keeps_serving(app):
    client = Client(app.url, verbose=False)
    with pytest.raises(AppError, match="top_p|minimum value"):  # Gradio's slider bounds answer first
        client.predict(message="hi", history=[], system_prompt="", top_p=0, api_name="/respond")
    with pytest.raises(AppError, match="seed must be from 0.*Sampling panel"):
        client.predict(message="hi", history=[], system_prompt="", seed=-5, api_name="/respond")
    with pytest.raises(AppError, match="No model file or folder at /nope/model.gguf"):
        client.predict(choice="smollm2-llamacpp", custom="/nope/model.gguf", backend="llamacpp", api_name="/load")
    # A failed load keeps the model that was loaded: the next question is answered by it.
    ok = client.predict(message="Say hi.", history=[], system_prompt="", max_new_tokens=16, api_name="/respond")
    assert text_of(ok[1][-1]) and "SmolLM2" in ok[2]


def test_export_and_import_round_trip(app, tmp_path):
    from gradio_client import handle_file

    client = Client(app.url, verbose=False)
    history = [{"role": role, "content": [{"type": "text", "text": text}]}
               for role, text in [("user", "hello"), ("assistant", "hi there")]]
    path = client.predict(history=history, system_prompt="Be kind", api_name="/export")
    restored, system, *_ = client.predict(file=handle_file(path), api_name="/import")
    assert system == "Be kind" and [text_of(m) for m in restored] == ["hello", "hi there"]
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict(file=handle_file(str(bad)), api_name="/import")


@pytest.mark.timeout(300)
def test_switch_to_the_transformers_preset_and_back(app):
    client = Client(app.url, verbose=False)
    status = client.predict(choice="smollm2-transformers", custom="", backend="transformers", api_name="/load")[0]
    assert "transformers" in status
    out = client.predict(message="What is the capital of France? Answer in one sentence.", history=[],
                         system_prompt="", do_sample=False, max_new_tokens=32, api_name="/respond")
    assert "Paris" in text_of(out[1][-1]) and "transformers" in out[2]
    status = client.predict(choice="smollm2-llamacpp", custom="", backend="llamacpp", api_name="/load")[0]
    assert "llamacpp" in status
    assert client.predict(api_name="/unload").startswith("No model loaded")
    with pytest.raises(AppError, match="No model is loaded"):
        client.predict(message="hi", history=[], system_prompt="", api_name="/respond")
    client.predict(choice="smollm2-llamacpp", custom="", backend="llamacpp", api_name="/load")


@pytest.mark.timeout(300)
def test_remote_server_url_in_the_model_box_streams_into_the_ui(app):
    import sys

    from backends.locate import embedded_gguf
    from backends.server import ManagedServer, free_port

    port = free_port()
    server = ManagedServer([sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
                            "--port", str(port), "--n_ctx", "2048"], f"http://127.0.0.1:{port}/v1", 120)
    server.start()
    try:
        client = Client(app.url, verbose=False)
        status = client.predict(choice="__custom__", custom=f"http://127.0.0.1:{port}", backend="transformers",
                                api_name="/load")[0]
        assert "openai" in status and f"remote http://127.0.0.1:{port}/v1" in status
        outputs = list(client.submit(message="What is the capital of France? Answer in one sentence.", history=[],
                                     system_prompt="", do_sample=False, max_new_tokens=48, api_name="/respond"))
        assert len(set(reply_texts(outputs))) >= 3 and "Paris" in reply_texts(outputs)[-1]
    finally:
        client.predict(choice="smollm2-llamacpp", custom="", backend="llamacpp", api_name="/load")
        server.stop()


def test_a_waiting_user_sees_their_place_in_line(app):
    """The shared app runs one reply at a time: a second user is told one reply is ahead."""
    first = Client(app.url, verbose=False).submit(
        message="Write a long story about a lighthouse keeper.", history=[], system_prompt="",
        do_sample=False, max_new_tokens=400, repetition_penalty=1.0, api_name="/respond")
    deadline = time.monotonic() + 30
    while len(first.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = list(Client(app.url, verbose=False).submit(
        message="Say hi.", history=[], system_prompt="", max_new_tokens=8, api_name="/respond"))
    first.cancel()
    statuses = [o[2] for o in second if isinstance(o[2], str)]
    assert any("Waiting for the model: 1 reply ahead of yours" in s for s in statuses), statuses
    assert text_of(second[-1][1][-1])
